"""Speed and memory of ms_deform_attn on CPU: reference vs torch.compile(reference) vs the C++ kernel.

    python benchmarks/bench_ms_deform_attn.py            # markdown table (~15 s; ~1 min more the
                                                         # first time, while torch.compile builds)
    python benchmarks/bench_ms_deform_attn.py --device cuda [--dtypes float32 bfloat16] [--runs 20]
                                                         # on the GPU, + Triton (benchmarks/_cuda_bench.py)
    python -m pytest benchmarks/bench_ms_deform_attn.py --benchmark-only

Shapes (fp32, torch.set_num_threads(2)):
* train: D-FINE-L training, B=4, Q=500, M=8 heads, D=32, levels 80x80/40x40/20x20, points [3, 6, 3];
* infer: the same model at inference, B=1, Q=300.

Time is the median wall time of several calls. The three backends of one row take turns
(reference, compile, cpp, reference, ...: 5 rounds, in each one untimed call to warm the caches,
then 2 timed ones), so that load from other processes on a shared machine hits all of them alike
and the ratios stay meaningful; within a turn the caches are warm, as in pytest-benchmark. "fwd+bwd" is one forward
plus torch.autograd.grad of all three differentiable inputs.

Peak extra memory: the call runs under torch.profiler.profile(activities=[CPU], profile_memory=True).
Every CPU allocation and free is recorded as an Allocation event with a signed byte count (read from
the profiler's event tree; the per-op memory columns of prof.events() would count nested ops twice);
sorting these by time and taking the running sum gives the bytes allocated during the call at every moment (inputs
were allocated before profiling started, so they are not in it). Its maximum minus the bytes of the
results still alive at the end (the output, and for fwd+bwd the three gradients) is the "extra memory
beyond inputs, output and gradients": the intermediates a backend needs. The method is validated in
``_check_memory_method``: a function that allocates a known 8 MiB temporary besides its output
must report 8 MiB extra.

Allocator: by default the script runs the way train.py does, with glibc told to keep freed memory
(dfine.deploy.cpu.retain_freed_memory; `--malloc default` to not). With glibc's defaults every
tensor over 32 MiB is a fresh mmap, so each call page-faults in its gradient of value (34 MiB at the
training shape) again: that costs about 10 ms per call on this machine, for every backend, and is
an allocator effect rather than kernel work. The table header names the allocator in use.

Reading the numbers: on this 2-core CPU torch.compile(reference) is slower than the eager reference
(inductor's generated code for the grid_sample decomposition does not vectorise well here). Timings
on a shared machine vary by about +-30%, so run it twice.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _fdr_bench_utils
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from dfine.ops import extension_available
from dfine.ops.ms_deform_attn import ms_deform_attn, ms_deform_attn_reference

from _fdr_bench_utils import times_ms_in_turns  # noqa: E402

THREADS = 2
LEVELS = [(80, 80), (40, 40), (20, 20)]
POINTS = [3, 6, 3]
SHAPES = {
    "train": dict(B=4, Q=500, M=8, D=32),
    "infer": dict(B=1, Q=300, M=8, D=32),
}


def make_inputs(B, Q, M, D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in LEVELS)
    P = sum(POINTS)
    value = torch.randn(B, S, M, D, generator=gen)
    loc = torch.rand(B, Q, M, P, 2, generator=gen)
    attn = torch.rand(B, Q, M, P, generator=gen).softmax(-1)
    return value, loc, attn


def reference_fn(value, loc, attn):
    return ms_deform_attn_reference(value, LEVELS, loc, attn, POINTS)


_SHAPES_TENSOR = torch.tensor(LEVELS, dtype=torch.int64)


def cpp_fn(value, loc, attn):
    return ms_deform_attn(value, _SHAPES_TENSOR.to(value.device), loc, attn, POINTS, backend="cpp")


def triton_fn(value, loc, attn):
    return ms_deform_attn(value, _SHAPES_TENSOR.to(value.device), loc, attn, POINTS, backend="triton")


_compiled = {}


def compiled_reference_fn(value, loc, attn):
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(reference_fn, dynamic=False)
    return _compiled["fn"](value, loc, attn)


BACKENDS = {"reference": reference_fn, "compile(reference)": compiled_reference_fn, "cpp": cpp_fn}


def forward_only(fn, inputs):
    with torch.no_grad():
        return [fn(*inputs)]


def forward_backward(fn, inputs):
    leaves = [t.requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    return [out, *grads]


MODES = {"fwd": forward_only, "fwd+bwd": forward_backward}


def median_times(calls, rounds=5, per_round=2):
    """Median wall time in seconds of every ``calls[name]()``; the calls take turns (see the module
    docstring and ``_fdr_bench_utils.times_ms_in_turns``)."""
    return {name: ms / 1e3 for name, ms in times_ms_in_turns(calls, rounds, per_round).items()}


def peak_extra_bytes(call):
    """Peak bytes allocated during ``call()`` beyond the tensors it returns (see the module docstring)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        results = call()
    allocations = []  # (time, signed bytes): + for an allocation, - for a free

    def walk(node):
        if node.tag == _EventType.Allocation:
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    running = peak = 0
    for _, size in sorted(allocations):
        running += size
        peak = max(peak, running)
    kept = sum(t.numel() * t.element_size() for t in results)
    return max(0, peak - kept)


def _check_memory_method():
    """A known 8 MiB temporary must be measured as 8 MiB of extra memory."""

    def call():
        tmp = torch.ones(2 * 1024 * 1024)  # 8 MiB, freed before returning
        out = torch.empty(1024)
        out.fill_(float(tmp[0]))
        del tmp
        return [out]

    extra = peak_extra_bytes(call)
    assert abs(extra - 8 * 1024 * 1024) < 64 * 1024, f"memory method broken: measured {extra} bytes"


def measure(shape_name, mode):
    """{backend: (median seconds, peak extra bytes)} for one shape and pass."""
    inputs = make_inputs(**SHAPES[shape_name])
    run = MODES[mode]

    def make_call(fn):
        return lambda: run(fn, [t.detach() for t in inputs])

    calls = {backend: make_call(fn) for backend, fn in BACKENDS.items()}
    seconds = median_times(calls)
    return {backend: (seconds[backend], peak_extra_bytes(call)) for backend, call in calls.items()}


def main_cuda(args, device):
    """The --device cuda table: every variant in every dtype (benchmarks/_cuda_bench.py)."""
    from _cuda_bench import cuda_table, describe_device

    fns = {"reference": reference_fn, "compile(reference)": compiled_reference_fn, "cpp": cpp_fn,
           "triton": triton_fn}
    cache = {}

    def make_call(shape_name, mode, variant, dtype):
        key = (shape_name, dtype)
        if key not in cache:
            cache.clear()  # one shape's inputs on the GPU at a time
            cache[key] = [t.to(device=device, dtype=dtype) for t in make_inputs(**SHAPES[shape_name])]
        inputs, fn, run = cache[key], fns[variant], MODES[mode]
        return lambda: run(fn, [t.detach() for t in inputs])

    print(f"ms_deform_attn on {describe_device(device)}; levels {LEVELS}, points {POINTS}, M=8, D=32")
    print("train: B=4, Q=500; infer: B=1, Q=300. Time = median of CUDA-event times; memory = peak allocated "
          "during the call (outputs and gradients included).\n")
    cuda_table([(s, m) for s in args.shapes for m in MODES], make_call, device, args.dtypes, args.variants, args.runs)


def main(argv=None):
    from _cuda_bench import device_from_args
    from _fdr_bench_utils import apply_allocator, parse_args

    def shapes_option(parser):
        parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES),
                            help="with --device cuda: the shapes (rows)")

    args = parse_args(argv, description=__doc__.split("\n")[0], extra=shapes_option)
    device = device_from_args(args)
    if device.type == "cuda":
        return main_cuda(args, device)
    allocator = apply_allocator(args.malloc)
    torch.set_num_threads(THREADS)
    if not extension_available():
        raise SystemExit("dfine._C is not built: python setup.py build_ext --inplace")
    _check_memory_method()
    rows = []
    for shape_name in SHAPES:
        for mode in MODES:
            rows.append((shape_name, mode, measure(shape_name, mode)))
    print(f"ms_deform_attn on CPU, fp32, {THREADS} threads; levels {LEVELS}, points {POINTS}, M=8, D=32")
    print("train: B=4, Q=500; infer: B=1, Q=300. Time = median; memory = peak extra beyond inputs/outputs/grads.")
    print(f"allocator: {allocator}\n")
    print(
        "| shape | pass | reference ms | compile(ref) ms | cpp ms | cpp vs ref | cpp vs compile | "
        "ref extra MiB | compile extra MiB | cpp extra MiB | cpp/ref memory |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    mib = 1024.0 * 1024.0
    for shape_name, mode, r in rows:
        (t_ref, m_ref), (t_cmp, m_cmp), (t_cpp, m_cpp) = r["reference"], r["compile(reference)"], r["cpp"]
        print(
            f"| {shape_name} | {mode} | {t_ref * 1e3:.1f} | {t_cmp * 1e3:.1f} | {t_cpp * 1e3:.2f} | "
            f"{t_ref / t_cpp:.1f}x | {t_cmp / t_cpp:.1f}x | {m_ref / mib:.1f} | {m_cmp / mib:.1f} | "
            f"{m_cpp / mib:.2f} | {m_cpp / max(m_ref, 1):.3f} |"
        )


# ------------------------------------------------------------------------------------------------
# pytest-benchmark cases: python -m pytest benchmarks/bench_ms_deform_attn.py --benchmark-only


@pytest.fixture(autouse=True)
def _two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_ms_deform_attn_speed(benchmark, backend, mode, shape_name):
    if backend == "cpp" and not extension_available():
        pytest.skip("dfine._C is not built")
    inputs = make_inputs(**SHAPES[shape_name])
    fn, run = BACKENDS[backend], MODES[mode]
    benchmark(lambda: run(fn, [t.detach() for t in inputs]))


if __name__ == "__main__":
    main()
