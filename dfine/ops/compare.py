"""Check every fused op and backend on this machine against its reference op.

    python -m dfine.ops.compare            # realistic D-FINE shapes
    python -m dfine.ops.compare --quick    # small shapes, a few seconds

For each op and backend: the max absolute and max relative error of the output and of every
gradient (relative = max |fused - reference| / max |reference|, so near-zero entries do not blow it
up), and how many times faster forward+backward runs than the reference. Backends: "cpp" when
dfine._C is built; "triton" only under TRITON_INTERPRET=1 (on CPU it runs in the interpreter, so its
shapes are always the small ones and its speed ratio means nothing).

To add an op, write one function ``<op>_case(backend, quick) -> Comparison`` (build inputs, then
call :func:`compare_callables`) and append it to :data:`OP_CASES` with the backends it has.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from dfine.ops import _backend
from dfine.ops.ms_deform_attn import ms_deform_attn, ms_deform_attn_reference


@dataclass
class TensorError:
    name: str  # "out" or "grad_<input>"
    max_abs: float
    max_rel: float


@dataclass
class Comparison:
    op: str
    backend: str
    shape: str
    errors: List[TensorError] = field(default_factory=list)
    speedup: float = float("nan")  # reference time / fused time, forward+backward


def _errors(name: str, fused: torch.Tensor, reference: torch.Tensor) -> TensorError:
    if reference.numel() == 0:
        return TensorError(name, 0.0, 0.0)
    diff = (fused.double() - reference.double()).abs().max().item()
    scale = reference.double().abs().max().item()
    return TensorError(name, diff, diff / scale if scale > 0 else diff)


def _median_seconds(call: Callable[[], object], repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare_callables(
    op: str,
    backend: str,
    shape: str,
    reference_fn: Callable[..., torch.Tensor],
    fused_fn: Callable[..., torch.Tensor],
    inputs: Dict[str, torch.Tensor],
    differentiable: Sequence[str],
    repeats: int = 3,
) -> Comparison:
    """Run both callables on ``inputs`` (keyword arguments), compare output and gradients of the
    ``differentiable`` inputs for the same random output gradient, and time forward+backward."""

    def forward_backward(fn):
        leaves = {k: (v.detach().clone().requires_grad_() if k in differentiable else v) for k, v in inputs.items()}
        outs = fn(**leaves)
        outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
        gen = torch.Generator().manual_seed(0)
        # one fixed random output gradient per floating output (integer outputs carry no gradient)
        pairs = [(o, torch.randn(o.shape, generator=gen, dtype=o.dtype)) for o in outs if o.is_floating_point()]
        wanted = [leaves[k] for k in differentiable]
        if any(o.numel() for o, _ in pairs):
            grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
            grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wanted)]
        else:
            grads = [torch.zeros_like(w) for w in wanted]
        return [o.detach() for o, _ in pairs], dict(zip(differentiable, grads))

    outs, grads = forward_backward(fused_fn)
    ref_outs, ref_grads = forward_backward(reference_fn)
    result = Comparison(op, backend, shape)
    for i, (out, ref_out) in enumerate(zip(outs, ref_outs)):
        result.errors.append(_errors("out" if len(outs) == 1 else f"out{i}", out, ref_out))
    for name in differentiable:
        result.errors.append(_errors(f"grad_{name}", grads[name], ref_grads[name]))
    ref_time = _median_seconds(lambda: forward_backward(reference_fn), repeats)
    fused_time = _median_seconds(lambda: forward_backward(fused_fn), repeats)
    result.speedup = ref_time / fused_time
    return result


# ------------------------------------------------------------------------------------------------
# One function per op.


def ms_deform_attn_case(backend: str, quick: bool) -> Comparison:
    small = quick or backend == "triton"
    if small:
        B, Q, M, D, levels, points = 2, 8, 2, 8, [(8, 8), (4, 4), (2, 2)], [3, 6, 3]
    else:  # D-FINE-L at inference
        B, Q, M, D, levels, points = 1, 300, 8, 32, [(80, 80), (40, 40), (20, 20)], [3, 6, 3]
    gen = torch.Generator().manual_seed(0)
    S, P = sum(h * w for h, w in levels), sum(points)
    inputs = {
        "value": torch.randn(B, S, M, D, generator=gen),
        "spatial_shapes": torch.tensor(levels, dtype=torch.int64),
        "sampling_locations": torch.rand(B, Q, M, P, 2, generator=gen) * 1.2 - 0.1,
        "attention_weights": torch.rand(B, Q, M, P, generator=gen).softmax(-1),
    }

    def reference_fn(**kw):
        return ms_deform_attn_reference(**kw, num_points_list=points)

    def fused_fn(**kw):
        return ms_deform_attn(**kw, num_points_list=points, backend=backend)

    shape = f"B={B} Q={Q} M={M} D={D} levels={levels} points={points}"
    return compare_callables(
        "ms_deform_attn", backend, shape, reference_fn, fused_fn, inputs,
        differentiable=("value", "sampling_locations", "attention_weights"),
        repeats=1 if backend == "triton" else 3,  # the interpreter is slow and its timing meaningless
    )


def _hook_case(module_name: str, op: str):
    """Case function for an op whose module provides ``compare_cases(rows=...)`` returning
    ``(name, fn, reference_fn, args, kwargs)`` with the differentiable args requiring grad."""

    def case(backend: str, quick: bool) -> Comparison:
        import importlib

        module = importlib.import_module(module_name)
        small = quick or backend == "triton"
        rows = 64 if small else None
        cases = module.compare_cases(**({"rows": rows} if rows else {}))
        name, fn, reference_fn, args, kwargs = next(c for c in cases if c[0] == op)
        import inspect

        keys = list(inspect.signature(reference_fn).parameters)[: len(args)]
        inputs = dict(zip(keys, args))
        differentiable = [k for k, a in inputs.items() if isinstance(a, torch.Tensor) and a.requires_grad]
        for k in differentiable:
            inputs[k] = inputs[k].detach()

        def reference_call(**kw):
            return reference_fn(*[kw[k] for k in keys], **kwargs)

        def fused_call(**kw):
            return fn(*[kw[k] for k in keys], backend=backend, **kwargs)

        first = args[0]
        shape = f"rows={first.shape[0]} bins={first.shape[-1]}"
        return compare_callables(op, backend, shape, reference_call, fused_call, inputs, differentiable,
                                 repeats=1 if backend == "triton" else 5)

    return case


# (op name, case function, backends it has)
OP_CASES: List[Tuple[str, Callable[[str, bool], Comparison], Tuple[str, ...]]] = [
    ("ms_deform_attn", ms_deform_attn_case, ("cpp", "triton")),
    ("fdr_decode", _hook_case("dfine.ops.fdr", "fdr_decode"), ("cpp", "triton")),
    ("fgl_loss", _hook_case("dfine.ops.golsd_losses", "fgl_loss"), ("cpp", "triton")),
    ("ddf_loss", _hook_case("dfine.ops.golsd_losses", "ddf_loss"), ("cpp", "triton")),
]


def available_backends() -> List[str]:
    found = []
    if _backend.extension_available():
        found.append("cpp")
    if _backend.triton_available() and _backend.triton_interpret():
        found.append("triton")
    return found


def run_comparisons(quick: bool = False, backends: Sequence[str] | None = None, ops: Sequence[str] | None = None):
    backends = available_backends() if backends is None else list(backends)
    results = []
    for op, case, op_backends in OP_CASES:
        if ops is not None and op not in ops:
            continue
        for backend in backends:
            if backend in op_backends:
                results.append(case(backend, quick))
    return results


def format_table(results: Sequence[Comparison]) -> str:
    lines = [
        "| op | backend | shape | tensor | max abs err | max rel err | fwd+bwd speed vs reference |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        # the Triton interpreter's timing says nothing about the kernel
        speed = "n/a (interpreter)" if r.backend == "triton" and r.speedup < 1 else f"{r.speedup:.1f}x"
        for e in r.errors:
            lines.append(
                f"| {r.op} | {r.backend} | {r.shape} | {e.name} | {e.max_abs:.2e} | {e.max_rel:.2e} | {speed} |"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    backends = available_backends()
    if not backends:
        print("no fused backend available (build dfine._C, or set TRITON_INTERPRET=1 for Triton on CPU)")
        return []
    results = run_comparisons(quick=args.quick, backends=backends)
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
