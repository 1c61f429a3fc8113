"""Benchmark of the GO-LSD losses fgl_loss and ddf_loss at D-FINE-L training shapes (CPU, fp32,
2 threads), plus the accuracy of their fp32 values against an fp64 computation.

One decoder layer has B=4 images x (300 + 200 denoising) queries x 4 edges = 8000 rows of 33 bins;
six layers = six calls and one backward. Variants: the plain PyTorch reference,
torch.compile(reference) and the C++ kernel. "peak MiB" is the most memory held at once during the
call beyond its inputs (outputs and the gradients of pred_corners included); "extra MiB" is that peak
minus the gradients the call returns (6 x 8000 x 33 floats = 6.0 MiB for six layers), i.e. the memory
a variant needs beyond inputs, outputs and gradients (the measure of the kernel issues).

    python benchmarks/bench_golsd_losses.py                    # markdown table
    python benchmarks/bench_golsd_losses.py --malloc default   # glibc's default allocator settings
    python benchmarks/bench_golsd_losses.py --device cuda      # on the GPU: fp32/bf16, + Triton (_cuda_bench.py)
    python -m pytest benchmarks/bench_golsd_losses.py --benchmark-only
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
from dfine.ops import ddf_loss, ddf_loss_reference, fgl_loss, fgl_loss_reference  # noqa: E402

BATCH, QUERIES, REG_MAX, LAYERS = 4, 300 + 200, 32, 6
# Rounds of timing turns (see times_ms_in_turns). A one-layer call takes 0.15-1.5 ms, so 5 rounds
# sample a few tens of milliseconds of a shared machine's load; 12 spread the samples of every
# variant over more of it, and the ratios of one run vary less from run to run.
ROUNDS = 12
ROWS = BATCH * QUERIES * 4


def make_inputs(layers: int, seed: int = 0, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    bins = REG_MAX + 1
    preds = [(torch.randn(ROWS, bins, generator=gen, dtype=torch.float64) * 3).to(device, dtype).requires_grad_(True)
             for _ in range(layers)]
    teacher = (torch.randn(ROWS, bins, generator=gen, dtype=torch.float64) * 3).to(device, dtype)
    target = (torch.rand(ROWS, generator=gen, dtype=torch.float64) * (REG_MAX - 0.1)).to(device, dtype)
    weight_right = target - target.floor()
    weight_left = 1 - weight_right
    weight = torch.rand(ROWS, generator=gen, dtype=torch.float64).to(device, dtype)
    return dict(preds=preds, teacher=teacher, target=target, wl=weight_left, wr=weight_right, weight=weight)


def _fgl(variant):
    if variant == "reference":
        return lambda p, x: fgl_loss_reference(p, x["target"], x["wl"], x["wr"], x["weight"], reduction="sum")
    if variant in ("cpp", "triton"):
        return lambda p, x: fgl_loss(p, x["target"], x["wl"], x["wr"], x["weight"], reduction="sum", backend=variant)
    fn = torch.compile(lambda p, t, wl, wr, w: fgl_loss_reference(p, t, wl, wr, w, reduction="sum"))
    return lambda p, x: fn(p, x["target"], x["wl"], x["wr"], x["weight"])


def _ddf(variant):
    if variant == "reference":
        return lambda p, x: ddf_loss_reference(p, x["teacher"], x["weight"], 5.0, reduction="sum")
    if variant in ("cpp", "triton"):
        return lambda p, x: ddf_loss(p, x["teacher"], x["weight"], 5.0, reduction="sum", backend=variant)
    fn = torch.compile(lambda p, t, w: ddf_loss_reference(p, t, w, 5.0, reduction="sum"))
    return lambda p, x: fn(p, x["teacher"], x["weight"])


LOSSES = {"fgl_loss": _fgl, "ddf_loss": _ddf}
VARIANTS = ["reference", "compiled", "cpp"]
_cache = {}


def loss_fn(name, variant):
    key = (name, variant)
    if key not in _cache:
        _cache[key] = LOSSES[name](variant)
    return _cache[key]


def forward_only(name, variant, inputs):
    fn = loss_fn(name, variant)

    def run():
        with torch.no_grad():
            return sum(fn(p, inputs) for p in inputs["preds"])

    return run


def forward_backward(name, variant, inputs):
    fn = loss_fn(name, variant)

    def run():
        total = sum(fn(p, inputs) for p in inputs["preds"])
        return torch.autograd.grad(total, inputs["preds"])

    return run


def _require(variant):
    if variant == "cpp" and not cpp_available():
        pytest.skip("dfine._C is not built")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_forward_backward_one_layer(benchmark, name, variant):
    _require(variant)
    setup_threads()
    run = forward_backward(name, variant, make_inputs(1))
    run()
    benchmark(run)


def accuracy_rows():
    """Relative error of the fp32 'sum' loss of each variant against the fp64 reference."""
    x32 = make_inputs(1)
    x64 = make_inputs(1, dtype=torch.float64)
    rows = []
    for name in LOSSES:
        exact = loss_fn(name, "reference")(x64["preds"][0].detach(), x64).item()
        for variant in [v for v in ("reference", "cpp") if v != "cpp" or cpp_available()]:
            got = loss_fn(name, variant)(x32["preds"][0].detach(), x32).double().item()
            rows.append([name, variant, f"{exact:.10g}", f"{got:.10g}", f"{abs(got - exact) / abs(exact):.2e}"])
    return rows


def main_cuda(args, device):
    """The --device cuda table: every variant in every dtype (benchmarks/_cuda_bench.py)."""
    from _cuda_bench import cuda_table, describe_device

    names = {"reference": "reference", "compile(reference)": "compiled", "cpp": "cpp", "triton": "triton"}
    layers = {"1 layer": 1, f"{LAYERS} layers": LAYERS}
    modes = {"fwd": forward_only, "fwd+bwd": forward_backward}
    cache = {}

    def make_call(shape, mode, variant, dtype):
        loss, count = shape.split(", ")
        key = (count, dtype)
        if key not in cache:
            cache.clear()
            cache[key] = make_inputs(layers[count], dtype=dtype, device=device)
        return modes[mode](loss, names[variant], cache[key])

    print(f"GO-LSD losses on {describe_device(device)}, {ROWS} rows of {REG_MAX + 1} bins per layer, "
          "reduction='sum'\n")
    rows = [(f"{loss}, {count}", m) for loss in LOSSES for count in layers for m in modes]
    cuda_table(rows, make_call, device, args.dtypes, args.variants, args.runs)


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
    for name in LOSSES:
        for layers in (1, LAYERS):
            inputs = make_inputs(layers)
            fwd = {v: forward_only(name, v, inputs) for v in variants}
            fwd_bwd = {v: forward_backward(name, v, inputs) for v in variants}
            t_fwd, t_fwd_bwd = times_ms_in_turns(fwd, ROUNDS), times_ms_in_turns(fwd_bwd, ROUNDS)
            base = {}
            for variant in variants:
                m_fwd_bwd, kept = peak_memory_bytes(fwd_bwd[variant], return_kept=True)
                extra = max(m_fwd_bwd - kept, 0)
                if variant == "reference":
                    base = dict(m_fwd_bwd=m_fwd_bwd, extra=extra)
                rows.append([
                    name, f"{layers} x {ROWS} rows", variant, f"{t_fwd[variant]:.2f}", f"{t_fwd_bwd[variant]:.2f}",
                    f"{t_fwd['reference'] / t_fwd[variant]:.2f}x",
                    f"{t_fwd_bwd['reference'] / t_fwd_bwd[variant]:.2f}x",
                    f"{m_fwd_bwd / 2**20:.2f}", f"{m_fwd_bwd / base['m_fwd_bwd']:.2f}",
                    f"{extra / 2**20:.2f}", f"{extra / max(base['extra'], 1):.3f}",
                ])
    print(f"GO-LSD losses, CPU fp32, {torch.get_num_threads()} threads, 33 bins, reduction='sum'; "
          f"allocator: {allocator}; time = median, the variants timed in turns\n")
    print(markdown_table(
        ["loss", "shape", "variant", "fwd ms", "fwd+bwd ms", "fwd speed-up", "fwd+bwd speed-up",
         "fwd+bwd peak MiB", "peak / reference", "fwd+bwd extra MiB", "extra / reference"], rows))
    print("\nfp32 loss value vs fp64 reference (one layer, reduction='sum')\n")
    print(markdown_table(["loss", "variant", "fp64 value", "fp32 value", "relative error"], accuracy_rows()))


if __name__ == "__main__":
    main()
