"""Benchmark of fdr_decode at D-FINE-L training shapes (CPU, fp32, 2 threads).

One decoder layer decodes B=4 images x (300 + 200 denoising) queries = 2000 boxes of 4 edges x 33
bins (8000 edge rows); the decoder runs six layers (six calls, one backward). Variants: the plain
PyTorch reference, torch.compile(reference) and the C++ kernel.

    python benchmarks/bench_fdr_decode.py                      # markdown table
    python benchmarks/bench_fdr_decode.py --malloc default     # glibc's default allocator settings
    python benchmarks/bench_fdr_decode.py --device cuda        # on the GPU: fp32/bf16, + Triton (_cuda_bench.py)
    python -m pytest benchmarks/bench_fdr_decode.py --benchmark-only
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch  # noqa: E402

from _fdr_bench_utils import (  # noqa: E402
    apply_allocator, cpp_available, _check_peak_memory, markdown_table, parse_args, peak_memory_bytes, setup_threads,
    times_ms_in_turns,
)
from dfine.ops import fdr_decode, fdr_decode_reference, weighting_function  # noqa: E402

BATCH, QUERIES, REG_MAX, LAYERS = 4, 300 + 200, 32, 6
REG_SCALE = 4.0


def make_inputs(layers: int, seed: int = 0, device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)

    def put(t):
        return t.to(device=device, dtype=dtype)

    project = put(weighting_function(REG_MAX, 0.5, REG_SCALE))
    corners = [put(torch.randn(BATCH, QUERIES, 4 * (REG_MAX + 1), generator=gen) * 3).requires_grad_(True)
               for _ in range(layers)]
    centre = torch.rand(BATCH, QUERIES, 2, generator=gen) * 0.8 + 0.1
    size = torch.rand(BATCH, QUERIES, 2, generator=gen) * 0.4 + 0.02
    ref = put(torch.cat([centre, size], -1))
    grad_boxes = put(torch.randn(BATCH, QUERIES, 4, generator=gen))
    grad_stats = put(torch.randn(BATCH, QUERIES, 4, 5, generator=gen))
    return corners, project, ref, grad_boxes, grad_stats


_compiled = {}


def decode_fn(variant: str):
    if variant == "reference":
        return lambda c, p, r: fdr_decode_reference(c, p, r, REG_SCALE, 4)
    if variant == "compiled":
        if "fn" not in _compiled:
            _compiled["fn"] = torch.compile(lambda c, p, r: fdr_decode_reference(c, p, r, REG_SCALE, 4))
        return _compiled["fn"]
    backend = "triton" if variant == "triton" else "cpp"
    return lambda c, p, r: fdr_decode(c, p, r, REG_SCALE, 4, backend=backend)


def forward_only(variant, inputs):
    corners, project, ref, _, _ = inputs
    fn = decode_fn(variant)

    def run():
        with torch.no_grad():
            return [fn(c, project, ref) for c in corners]

    return run


def forward_backward(variant, inputs):
    corners, project, ref, grad_boxes, grad_stats = inputs
    fn = decode_fn(variant)

    def run():
        outputs, grads = [], []
        for c in corners:
            boxes, stats = fn(c, project, ref)
            outputs += [boxes, stats]
            grads += [grad_boxes, grad_stats]
        return torch.autograd.grad(outputs, corners, grads)

    return run


VARIANTS = ["reference", "compiled", "cpp"]


def _require(variant):
    if variant == "cpp" and not cpp_available():
        pytest.skip("dfine._C is not built")


@pytest.mark.parametrize("variant", VARIANTS)
def test_fdr_decode_forward_backward_one_layer(benchmark, variant):
    _require(variant)
    setup_threads()
    run = forward_backward(variant, make_inputs(1))
    run()  # compile outside the timing
    benchmark(run)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fdr_decode_forward_one_layer(benchmark, variant):
    _require(variant)
    setup_threads()
    run = forward_only(variant, make_inputs(1))
    run()
    benchmark(run)


def main_cuda(args, device):
    """The --device cuda table: every variant in every dtype (benchmarks/_cuda_bench.py)."""
    from _cuda_bench import cuda_table, describe_device

    names = {"reference": "reference", "compile(reference)": "compiled", "cpp": "cpp", "triton": "triton"}
    shapes = {f"1 layer ({BATCH * QUERIES} boxes)": 1, f"{LAYERS} layers ({LAYERS * BATCH * QUERIES} boxes)": LAYERS}
    modes = {"fwd": forward_only, "fwd+bwd": forward_backward}
    cache = {}

    def make_call(shape, mode, variant, dtype):
        key = (shape, dtype)
        if key not in cache:
            cache.clear()
            cache[key] = make_inputs(shapes[shape], device=device, dtype=dtype)
        return modes[mode](names[variant], cache[key])

    print(f"fdr_decode on {describe_device(device)}, K+1 = {REG_MAX + 1} bins, lqe_topk = 4\n")
    cuda_table([(s, m) for s in shapes for m in modes], make_call, device, args.dtypes, args.variants, args.runs)


def main(argv=None):
    from _cuda_bench import device_from_args

    args = parse_args(argv, description=__doc__.split("\n")[0])
    device = device_from_args(args)
    if device.type == "cuda":
        return main_cuda(args, device)
    allocator = apply_allocator(args.malloc)
    setup_threads()
    _check_peak_memory()
    variants = [v for v in VARIANTS if v != "cpp" or cpp_available()]
    rows = []
    for layers in (1, LAYERS):
        inputs = make_inputs(layers)
        fwd = {v: forward_only(v, inputs) for v in variants}
        fwd_bwd = {v: forward_backward(v, inputs) for v in variants}
        t_fwd, t_fwd_bwd = times_ms_in_turns(fwd), times_ms_in_turns(fwd_bwd)
        base = {}
        for variant in variants:
            m_fwd, m_fwd_bwd = peak_memory_bytes(fwd[variant]), peak_memory_bytes(fwd_bwd[variant])
            if variant == "reference":
                base = dict(m_fwd_bwd=m_fwd_bwd)
            rows.append([
                f"{layers} layer{'s' if layers > 1 else ''} ({layers * BATCH * QUERIES} boxes)", variant,
                f"{t_fwd[variant]:.2f}", f"{t_fwd_bwd[variant]:.2f}", f"{t_fwd['reference'] / t_fwd[variant]:.2f}x",
                f"{t_fwd_bwd['reference'] / t_fwd_bwd[variant]:.2f}x", f"{m_fwd / 2**20:.2f}",
                f"{m_fwd_bwd / 2**20:.2f}", f"{m_fwd_bwd / base['m_fwd_bwd']:.2f}",
            ])
    print(f"fdr_decode, CPU fp32, {torch.get_num_threads()} threads, K+1 = {REG_MAX + 1} bins, lqe_topk = 4; "
          f"allocator: {allocator}; time = median, the variants timed in turns\n")
    print(markdown_table(
        ["shape", "variant", "fwd ms", "fwd+bwd ms", "fwd speed-up", "fwd+bwd speed-up", "fwd peak MiB",
         "fwd+bwd peak MiB", "fwd+bwd memory / reference"], rows))


if __name__ == "__main__":
    main()
