"""Check every fused op and backend on this machine against its reference op.

    python -m dfine.ops.compare                          # realistic D-FINE shapes, CPU
    python -m dfine.ops.compare --quick                  # small shapes, a few seconds
    python -m dfine.ops.compare --device cuda            # on the GPU: float32 and bfloat16, with torch.compile

For each op, backend and dtype: the max absolute and max relative error of the output and of every
gradient (relative = max |fused - reference| / max |reference|, so near-zero entries do not blow it
up), then a timing table: forward+backward milliseconds of the fused op, the reference and (``--compile``,
the default on CUDA) ``torch.compile(reference)``, one column group per dtype. Half-precision runs are
compared with the reference in float64 on the same (rounded) values. On CUDA the times come from CUDA events
(``dfine.ops.timing``). Backends: "cpp" when dfine._C is built (with CUDA kernels for this GPU, on CUDA);
"triton" on CUDA, and on CPU only under TRITON_INTERPRET=1 (the interpreter: small shapes, its speed means
nothing). A (backend, dtype) a kernel does not take is listed with the kernel's error instead of numbers.

To add an op, write one function ``<op>_case(backend, quick, device, dtype, compile_reference) -> Comparison``
(build inputs, then call :func:`compare_callables`) and append it to :data:`OP_CASES` with its backends.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from dfine.ops import _backend
from dfine.ops.ms_deform_attn import ms_deform_attn, ms_deform_attn_reference
from dfine.ops.timing import DTYPES, device_or_exit, median_ms

HALF_DTYPES = (torch.float16, torch.bfloat16)


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
    fused_ms: float = float("nan")  # forward+backward, median
    reference_ms: float = float("nan")
    compiled_ms: float = float("nan")  # torch.compile(reference); nan when not measured
    device: str = "cpu"
    dtype: str = "float32"
    failure: Optional[str] = None  # the error of a (backend, dtype) the fused op does not take

    @property
    def speedup(self) -> float:
        """reference time / fused time, forward+backward."""
        return self.reference_ms / self.fused_ms


def _errors(name: str, fused: torch.Tensor, reference: torch.Tensor) -> TensorError:
    if reference.numel() == 0:
        return TensorError(name, 0.0, 0.0)
    diff = (fused.double() - reference.double()).abs().max().item()
    scale = reference.double().abs().max().item()
    return TensorError(name, diff, diff / scale if scale > 0 else diff)


def _as_float64(inputs: Dict[str, object]) -> Dict[str, object]:
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


def compare_callables(
    op: str,
    backend: str,
    shape: str,
    reference_fn: Callable[..., torch.Tensor],
    fused_fn: Callable[..., torch.Tensor],
    inputs: Dict[str, torch.Tensor],
    differentiable: Sequence[str],
    repeats: int = 3,
    device="cpu",
    compile_reference: bool = False,
) -> Comparison:
    """Run both callables on ``inputs`` (keyword arguments), compare output and gradients of the
    ``differentiable`` inputs for the same random output gradient, and time forward+backward (also of
    ``torch.compile(reference_fn)`` with ``compile_reference``). Half-precision inputs: the reference runs in
    float64 on the same values."""
    dtype = next((v.dtype for k, v in inputs.items() if k in differentiable), torch.float32)

    def forward_backward(fn, values):
        leaves = {k: (v.detach().clone().requires_grad_() if k in differentiable else v) for k, v in values.items()}
        outs = fn(**leaves)
        outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
        gen = torch.Generator().manual_seed(0)
        # one fixed random output gradient per floating output (integer outputs carry no gradient), the same
        # values (rounded to the case's dtype) for the fused op and the reference
        pairs = [(o, torch.randn(o.shape, generator=gen, dtype=torch.float64).to(dtype).to(o.dtype).to(o.device))
                 for o in outs if o.is_floating_point()]
        wanted = [leaves[k] for k in differentiable]
        if any(o.numel() for o, _ in pairs):
            grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
            grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wanted)]
        else:
            grads = [torch.zeros_like(w) for w in wanted]
        return [o.detach() for o, _ in pairs], dict(zip(differentiable, grads))

    result = Comparison(op, backend, shape, device=str(torch.device(device).type),
                        dtype=str(dtype).replace("torch.", ""))
    try:
        outs, grads = forward_backward(fused_fn, inputs)
    except (RuntimeError, TypeError, NotImplementedError) as err:  # a dtype the kernel does not take
        result.failure = str(err).strip().splitlines()[0][:160]
        return result
    truth = _as_float64(inputs) if dtype in HALF_DTYPES else inputs
    ref_outs, ref_grads = forward_backward(reference_fn, truth)
    for i, (out, ref_out) in enumerate(zip(outs, ref_outs)):
        result.errors.append(_errors("out" if len(outs) == 1 else f"out{i}", out, ref_out))
    for name in differentiable:
        result.errors.append(_errors(f"grad_{name}", grads[name], ref_grads[name]))
    result.reference_ms = median_ms(lambda: forward_backward(reference_fn, inputs), device, repeats)
    result.fused_ms = median_ms(lambda: forward_backward(fused_fn, inputs), device, repeats)
    if compile_reference:
        compiled = torch.compile(reference_fn, dynamic=False)
        # the warm-up call compiles (forward and backward graphs)
        result.compiled_ms = median_ms(lambda: forward_backward(compiled, inputs), device, repeats, warmup=2)
    return result


def _slow(backend: str, device) -> bool:
    """Triton under the interpreter: small shapes, one timed call (its time means nothing)."""
    return backend == "triton" and (torch.device(device).type == "cpu" or _backend.triton_interpret())


# ------------------------------------------------------------------------------------------------
# One function per op.


def ms_deform_attn_case(backend: str, quick: bool, device="cpu", dtype=torch.float32,
                        compile_reference: bool = False) -> Comparison:
    small = quick or _slow(backend, device)
    if small:
        B, Q, M, D, levels, points = 2, 8, 2, 8, [(8, 8), (4, 4), (2, 2)], [3, 6, 3]
    elif torch.device(device).type == "cuda":  # D-FINE-L training: B=4, 300 + 200 denoising queries
        B, Q, M, D, levels, points = 4, 500, 8, 32, [(80, 80), (40, 40), (20, 20)], [3, 6, 3]
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
    inputs = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}

    def reference_fn(**kw):
        return ms_deform_attn_reference(**kw, num_points_list=points)

    def fused_fn(**kw):
        return ms_deform_attn(**kw, num_points_list=points, backend=backend)

    shape = f"B={B} Q={Q} M={M} D={D} levels={levels} points={points}"
    return compare_callables(
        "ms_deform_attn", backend, shape, reference_fn, fused_fn, inputs,
        differentiable=("value", "sampling_locations", "attention_weights"),
        repeats=1 if _slow(backend, device) else (10 if torch.device(device).type == "cuda" else 3),
        device=device, compile_reference=compile_reference and not small,
    )


def _hook_case(module_name: str, op: str):
    """Case function for an op whose module provides ``compare_cases(rows=..., dtype=..., device=...)`` returning
    ``(name, fn, reference_fn, args, kwargs)`` with the differentiable args requiring grad."""

    def case(backend: str, quick: bool, device="cpu", dtype=torch.float32, compile_reference: bool = False):
        module = importlib.import_module(module_name)
        small = quick or _slow(backend, device)
        options = {"dtype": dtype, "device": device}
        if small:
            options["rows"] = 64
        cases = module.compare_cases(**options)
        name, fn, reference_fn, args, kwargs = next(c for c in cases if c[0] == op)
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
        repeats = 1 if _slow(backend, device) else (20 if torch.device(device).type == "cuda" else 5)
        return compare_callables(op, backend, shape, reference_call, fused_call, inputs, differentiable,
                                 repeats=repeats, device=device, compile_reference=compile_reference and not small)

    return case


# (op name, case function, backends it has)
OP_CASES: List[Tuple[str, Callable[..., Comparison], Tuple[str, ...]]] = [
    ("ms_deform_attn", ms_deform_attn_case, ("cpp", "triton")),
    ("fdr_decode", _hook_case("dfine.ops.fdr", "fdr_decode"), ("cpp", "triton")),
    ("fgl_loss", _hook_case("dfine.ops.golsd_losses", "fgl_loss"), ("cpp", "triton")),
    ("ddf_loss", _hook_case("dfine.ops.golsd_losses", "ddf_loss"), ("cpp", "triton")),
]


def available_backends(device="cpu") -> List[str]:
    """The fused backends that run tensors of ``device`` here."""
    device = torch.device(device)
    found = []
    if device.type == "cuda":
        if _backend.extension_has_cuda() and _backend.cuda_arch_problem(device) is None:
            found.append("cpp")
        if _backend.triton_available():
            found.append("triton")
        return found
    if _backend.extension_available():
        found.append("cpp")
    if _backend.triton_available() and _backend.triton_interpret():
        found.append("triton")
    return found


def run_comparisons(quick: bool = False, backends: Sequence[str] | None = None, ops: Sequence[str] | None = None,
                    device="cpu", dtypes: Sequence[torch.dtype] = (torch.float32,), compile_reference: bool = False):
    backends = available_backends(device) if backends is None else list(backends)
    results = []
    for op, case, op_backends in OP_CASES:
        if ops is not None and op not in ops:
            continue
        for backend in backends:
            if backend not in op_backends:
                continue
            for dtype in dtypes:
                if dtype in HALF_DTYPES and _slow(backend, device):
                    continue  # the CPU kernels and the interpreter runs are float32/float64
                results.append(case(backend, quick, device=device, dtype=dtype, compile_reference=compile_reference))
    return results


def format_table(results: Sequence[Comparison]) -> str:
    """The errors: one row per op, backend, dtype and tensor."""
    lines = [
        "| op | backend | device | dtype | shape | tensor | max abs err | max rel err | fwd+bwd speed vs reference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        head = f"| {r.op} | {r.backend} | {r.device} | {r.dtype} | {r.shape} |"
        if r.failure is not None:
            lines.append(f"{head} - | n/a | n/a | {r.failure} |")
            continue
        # the Triton interpreter's timing says nothing about the kernel
        speed = "n/a (interpreter)" if _slow(r.backend, r.device) else f"{r.speedup:.1f}x"
        for e in r.errors:
            lines.append(f"{head} {e.name} | {e.max_abs:.2e} | {e.max_rel:.2e} | {speed} |")
    return "\n".join(lines)


def _ms(value: float) -> str:
    return "-" if value != value else f"{value:.3f}"  # nan: not measured


def format_timing_table(results: Sequence[Comparison]) -> str:
    """Forward+backward milliseconds: one row per op and backend, one column group per dtype (fused, reference,
    torch.compile(reference), fused speed-up over each)."""
    dtypes = list(dict.fromkeys(r.dtype for r in results))
    header = ["op", "backend", "device"]
    for d in dtypes:
        header += [f"{d} fused ms", f"{d} reference ms", f"{d} compile(ref) ms", f"{d} vs ref", f"{d} vs compile"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows: Dict[Tuple[str, str, str], Dict[str, Comparison]] = {}
    for r in results:
        rows.setdefault((r.op, r.backend, r.device), {})[r.dtype] = r
    for (op, backend, device), by_dtype in rows.items():
        cells = [op, backend, device]
        for d in dtypes:
            r = by_dtype.get(d)
            if r is None or r.failure is not None:
                cells += ["n/a"] * 5
            elif _slow(backend, device):
                cells += ["n/a (interpreter)"] * 5
            else:
                vs_compile = "-" if r.compiled_ms != r.compiled_ms else f"{r.compiled_ms / r.fused_ms:.2f}x"
                cells += [_ms(r.fused_ms), _ms(r.reference_ms), _ms(r.compiled_ms), f"{r.speedup:.2f}x", vs_compile]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on cpu; float32 bfloat16 on cuda")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time torch.compile(reference) (default: on for cuda, off for cpu)")
    args = parser.parse_args(argv)
    device = device_or_exit(args.device)
    cuda = device.type == "cuda"
    dtypes = [DTYPES[d] for d in (args.dtypes or (["float32", "bfloat16"] if cuda else ["float32"]))]
    compile_reference = cuda if args.compile is None else args.compile
    if not cuda:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    backends = available_backends(device)
    if not backends:
        hint = (_backend.cuda_arch_problem(device) if cuda and _backend.extension_has_cuda() else None) or \
            "build dfine._C, or set TRITON_INTERPRET=1 for Triton on CPU"
        print(f"no fused backend available on {device} ({hint})")
        return []
    if cuda:
        print(f"device: {torch.cuda.get_device_name(device)} (compute capability "
              f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}), torch {torch.__version__}")
    results = run_comparisons(quick=args.quick, backends=backends, device=device, dtypes=dtypes,
                              compile_reference=compile_reference)
    print(format_table(results))
    print()
    print(format_timing_table(results))
    return results


if __name__ == "__main__":
    main()
