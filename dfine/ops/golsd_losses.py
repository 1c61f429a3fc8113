"""GO-LSD localisation losses of D-FINE: Fine-grained Localization (FGL) and Decoupled
Distillation Focal (DDF) losses over the ``K+1`` bin logits of every box edge.

* :func:`fgl_loss` - per row ``CE(pred, floor(t)) * wl + CE(pred, floor(t) + 1) * wr``, times ``weight``;
* :func:`ddf_loss` - per row ``T^2 * KL(softmax(teacher / T) || softmax(pred / T))``, times ``weight``.

``fgl_loss_reference`` / ``ddf_loss_reference`` are the definitions of truth. Fused backends compute
one row per pass (softmax, loss and, in backward, its gradient) and return the per-row losses; the
reduction is applied afterwards by the same Python code for every backend:
``cpp`` - ``torch.ops.dfine.{fgl,ddf}_loss_forward/backward/total`` from ``csrc/fdr/`` (C++ on CPU
tensors, CUDA on CUDA tensors, autograd in ``csrc/fdr/autograd/``); ``triton`` -
``torch.ops.dfine.{fgl,ddf}_loss_triton``, kernels and autograd in ``dfine/kernels/golsd_losses.py``.
This module holds the references, the argument checks and the dispatch (and the C++ ops' fakes).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from dfine.kernels import golsd_losses as _triton_kernels  # noqa: F401  (defines the dfine::*_triton ops)
from dfine.ops._backend import extension_available, resolve_backend, resolved_to_cpp, symbolic_shapes

__all__ = ["fgl_loss", "fgl_loss_reference", "ddf_loss", "ddf_loss_reference", "compare_cases"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("none", "sum", "mean")


def _reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    """``none`` -> [N]; ``sum`` -> scalar; ``mean`` -> scalar, 0 (not NaN) for N = 0."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / max(rows.shape[0], 1)


# --------------------------------------------------------------------------------------------
# References.


def fgl_left_bin(target_bins: torch.Tensor, bins: int) -> torch.Tensor:
    """The left bin of every target: ``target.long()`` (truncation, as published), kept inside
    ``[0, bins - 2]`` so that the right bin exists (valid targets lie in [0, K - 0.1] already).
    Clamped before the conversion too, so that targets beyond int64 (1e30, inf) take the last bin
    on every platform (a NaN target takes bin 0, as in the fused kernels)."""
    return target_bins.clamp(0, bins - 2).long().clamp(0, bins - 2)


def fgl_loss_reference(pred_corners, target_bins, weight_left, weight_right, weight=None, reduction="sum"):
    """Plain-PyTorch :func:`fgl_loss` (the published ``unimodal_distribution_focal_loss``)."""
    bins = pred_corners.shape[-1]
    left = fgl_left_bin(target_bins.reshape(-1), bins)
    rows = F.cross_entropy(pred_corners, left, reduction="none") * weight_left.reshape(-1) + F.cross_entropy(
        pred_corners, left + 1, reduction="none"
    ) * weight_right.reshape(-1)
    if weight is not None:
        rows = rows * weight.reshape(-1)
    return _reduce(rows, reduction)


def ddf_loss_reference(pred_corners, teacher_corners, weight=None, temperature=5.0, reduction="none"):
    """Plain-PyTorch :func:`ddf_loss`: ``T^2 * sum_j p_j (log p_j - log q_j)`` with ``p`` the teacher's
    and ``q`` the student's softmax at temperature ``T``; terms with ``p_j = 0`` count 0 (xlogy).
    Written with the difference of the two log-softmaxes so that teacher == student gives exactly 0.
    A NaN teacher row (NaN or +inf logits) gives a NaN loss, not 0: only ``p_j == 0`` is skipped."""
    log_q = F.log_softmax(pred_corners / temperature, dim=-1)
    log_p = F.log_softmax(teacher_corners.detach() / temperature, dim=-1)
    p = log_p.exp()
    terms = torch.where(p == 0, torch.zeros_like(p), p * (log_p - log_q))
    rows = (temperature ** 2) * terms.sum(-1)
    if weight is not None:
        rows = weight.reshape(-1) * rows
    return _reduce(rows, reduction)


# --------------------------------------------------------------------------------------------
# Input checks.


def _check_pred(op, pred_corners):
    if not isinstance(pred_corners, torch.Tensor):
        raise TypeError(f"{op}: pred_corners must be a torch.Tensor, got {type(pred_corners).__name__}")
    if pred_corners.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: pred_corners must be a floating-point tensor, got {pred_corners.dtype}")
    if pred_corners.dim() != 2 or not 2 <= pred_corners.shape[1] <= 64:
        raise ValueError(f"{op}: pred_corners must have shape [N, K+1] with 2 <= K+1 <= 64, "
                         f"got {tuple(pred_corners.shape)}")


def _row_args(op, pred_corners, named):
    """The per-row arguments ``named`` (``(name, tensor, optional), ...``) checked in one pass: each a
    floating-point tensor with N = ``pred_corners.shape[0]`` elements on pred_corners' device (None
    if optional). Returned as they are."""
    n = pred_corners.shape[0]
    device = pred_corners.device
    out = []
    for name, t, optional in named:
        if t is None and optional:
            out.append(None)
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        t_dtype = t.dtype
        if t_dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t_dtype}")
        if t.numel() != n:
            raise ValueError(f"{op}: {name} must have N={n} elements (one per row of pred_corners "
                             f"{tuple(pred_corners.shape)}), got shape {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but pred_corners is on {device}")
        out.append(t)
    return out


def _check_reduction(op, reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _compute_dtype(pred_corners, others):
    """The dtype the fused kernels get: PyTorch's promotion of pred_corners and the other tensors,
    as in the reference (float32 targets of fp16/bf16 logits stay float32: rounding a target bin to
    16 bits could move its left bin). All-fp16 or all-bf16 inputs go to the kernels as they are;
    they load 16-bit values and compute in float32."""
    dtype = pred_corners.dtype
    for t in others:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _flat_as(tensors, dtype):
    return [None if t is None else _as(t if t.dim() == 1 else t.reshape(-1), dtype) for t in tensors]


def _as(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)


def _keep_gradient(pred_corners, compiling: bool) -> bool:
    """Whether the fused forward should also write d(row loss)/d(pred) (backward then only scales
    it, in place). Not under torch.compile, whose graphs must not mutate saved tensors."""
    return pred_corners.requires_grad and torch.is_grad_enabled() and not compiling


def _reduce_in_op(which, reduction, dtype, pred_corners, compiling: bool) -> bool:
    """Whether a "sum"/"mean" loss comes from the C++ ``*_loss_total`` op, which reduces the rows
    itself (one autograd node, no reduction dispatched from Python; the same values and gradients).
    Eager mode only: traced graphs (torch.compile, export) keep the per-row op and ``_reduce``, whose
    sizes stay symbolic. Half-precision inputs too, whose rows are reduced in their own dtype."""
    return (which == "cpp" and reduction != "none" and dtype == pred_corners.dtype and not compiling
            and not symbolic_shapes())


def _straight_to_cpp(pred_corners, reduction, backend) -> bool:
    """Whether a call can go straight to the C++ op, before any Python check: the common case of
    training (a float32/float64 tensor, eager mode, a backend already resolved to the extension).
    The op checks its arguments itself (shapes, dtypes, devices); if it rejects them, the full
    Python checks run and name the bad argument. The Python checks cost about as much as the op
    on small inputs, and ~5% of a one-layer FGL forward+backward."""
    return (type(pred_corners) is torch.Tensor and pred_corners.dtype in _CPP_DTYPES and reduction in REDUCTIONS
            and resolved_to_cpp(backend, pred_corners.device) and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing())


_CPP_DTYPES = (torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# Public ops.


def fgl_loss(pred_corners: torch.Tensor, target_bins: torch.Tensor, weight_left: torch.Tensor,
             weight_right: torch.Tensor, weight: Optional[torch.Tensor] = None, reduction: str = "sum",
             backend: str = "auto") -> torch.Tensor:
    """Fine-grained Localization loss.

    Args:
        pred_corners: ``[N, K+1]`` bin logits (one row per box edge).
        target_bins: ``N`` float bin positions in ``[0, K - 0.1]`` (any shape with N elements); the
            left bin is ``target.long()`` (kept in ``[0, K-1]``), the right bin the next one.
        weight_left, weight_right: ``N`` weights of the two bins (from :func:`dfine.ops.fdr_targets`).
        weight: optional ``N`` per-row factor (the IoU of the box, repeated for its 4 edges).
        reduction: ``"none"`` (``[N]``), ``"sum"`` or ``"mean"`` (0 for N = 0). The published criterion
            divides the sum by the number of boxes itself.

    Gradients flow to ``pred_corners`` (and to ``weight`` if it requires grad); the targets get none.
    """
    if _straight_to_cpp(pred_corners, reduction, backend):
        keep = pred_corners.requires_grad and torch.is_grad_enabled()
        try:
            if reduction == "none":
                return torch.ops.dfine.fgl_loss_forward(pred_corners, target_bins, weight_left, weight_right,
                                                        weight, keep)[0]
            return torch.ops.dfine.fgl_loss_total(pred_corners, target_bins, weight_left, weight_right, weight,
                                                  keep, reduction == "mean")[0]
        except (RuntimeError, TypeError):
            pass  # the checks below name the bad argument, or the same call raises again
    op = "fgl_loss"
    _check_pred(op, pred_corners)
    _check_reduction(op, reduction)
    which = resolve_backend(backend, pred_corners.device, op)
    rows = (("target_bins", target_bins, False), ("weight_left", weight_left, False),
            ("weight_right", weight_right, False), ("weight", weight, True))
    if which == "reference":
        _row_args(op, pred_corners, rows)
        return fgl_loss_reference(pred_corners, target_bins, weight_left, weight_right, weight, reduction)
    row_tensors = _row_args(op, pred_corners, rows)
    dtype = _compute_dtype(pred_corners, row_tensors)
    compiling = torch.compiler.is_compiling()
    args = (_as(pred_corners, dtype), *_flat_as(row_tensors, dtype), _keep_gradient(pred_corners, compiling))
    if _reduce_in_op(which, reduction, dtype, pred_corners, compiling):
        return torch.ops.dfine.fgl_loss_total(*args, reduction == "mean")[0]
    op = torch.ops.dfine.fgl_loss_forward if which == "cpp" else torch.ops.dfine.fgl_loss_triton
    rows, _ = op(*args)
    return _reduce(_as(rows, pred_corners.dtype), reduction)


def ddf_loss(pred_corners: torch.Tensor, teacher_corners: torch.Tensor, weight: Optional[torch.Tensor] = None,
             temperature: float = 5.0, reduction: str = "none", backend: str = "auto") -> torch.Tensor:
    """Decoupled Distillation Focal loss, per row ``T^2 * KL(softmax(teacher/T) || softmax(pred/T))``.

    Args:
        pred_corners: ``[N, K+1]`` student bin logits.
        teacher_corners: ``[N, K+1]`` teacher bin logits; no gradient flows to them.
        weight: optional ``N`` per-row factor.
        temperature: ``T > 0``.
        reduction: ``"none"`` (``[N]``, the default: the criterion splits matched/unmatched rows),
            ``"sum"`` or ``"mean"`` (0 for N = 0).

    Bins whose teacher probability is 0 contribute 0; teacher == student gives exactly 0.
    """
    if (_straight_to_cpp(pred_corners, reduction, backend) and isinstance(temperature, float) and temperature > 0):
        keep = pred_corners.requires_grad and torch.is_grad_enabled()
        try:
            teacher = teacher_corners.detach()
            if reduction == "none":
                return torch.ops.dfine.ddf_loss_forward(pred_corners, teacher, weight, temperature, keep)[0]
            return torch.ops.dfine.ddf_loss_total(pred_corners, teacher, weight, temperature, keep,
                                                  reduction == "mean")[0]
        except (RuntimeError, TypeError, AttributeError):
            pass  # the checks below name the bad argument, or the same call raises again
    op = "ddf_loss"
    _check_pred(op, pred_corners)
    if not isinstance(teacher_corners, torch.Tensor) or teacher_corners.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: teacher_corners must be a floating-point torch.Tensor, got "
                        f"{getattr(teacher_corners, 'dtype', type(teacher_corners).__name__)}")
    if teacher_corners.shape != pred_corners.shape:
        raise ValueError(f"{op}: teacher_corners must have the shape of pred_corners {tuple(pred_corners.shape)}, "
                         f"got {tuple(teacher_corners.shape)}")
    if teacher_corners.device != pred_corners.device:
        raise ValueError(f"{op}: teacher_corners is on {teacher_corners.device} but pred_corners is on "
                         f"{pred_corners.device}")
    _check_reduction(op, reduction)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"{op}: temperature must be a positive number, got {temperature!r}")
    which = resolve_backend(backend, pred_corners.device, op)
    if which == "reference":
        _row_args(op, pred_corners, (("weight", weight, True),))
        return ddf_loss_reference(pred_corners, teacher_corners, weight, temperature, reduction)
    row_tensors = _row_args(op, pred_corners, (("weight", weight, True),))
    dtype = _compute_dtype(pred_corners, [teacher_corners, *row_tensors])
    compiling = torch.compiler.is_compiling()
    args = (_as(pred_corners, dtype), _as(teacher_corners.detach(), dtype), *_flat_as(row_tensors, dtype),
            float(temperature), _keep_gradient(pred_corners, compiling))
    if _reduce_in_op(which, reduction, dtype, pred_corners, compiling):
        return torch.ops.dfine.ddf_loss_total(*args, reduction == "mean")[0]
    op = torch.ops.dfine.ddf_loss_forward if which == "cpp" else torch.ops.dfine.ddf_loss_triton
    rows, _ = op(*args)
    return _reduce(_as(rows, pred_corners.dtype), reduction)


# --------------------------------------------------------------------------------------------
# Fake (meta) kernels of the C++/CUDA ops, for torch.compile and torch.export (the kernels and
# their autograd are registered in C++ by dfine._C, csrc/fdr/).


def _forward_fake(pred, *args):
    compute_grad = args[-1]
    grad = torch.empty_like(pred) if compute_grad else pred.new_empty((0,))
    return pred.new_empty((pred.shape[0],)), grad


def _grad_fake(grad_rows, pred, *args):
    return torch.empty_like(pred)


def _total_fake(pred, *args):
    compute_grad = args[-2]
    return pred.new_empty(()), torch.empty_like(pred) if compute_grad else pred.new_empty((0,))


def _register_cpp_fakes():
    for name in ("fgl_loss_forward", "ddf_loss_forward"):
        torch.library.register_fake(f"dfine::{name}")(_forward_fake)
    for name in ("fgl_loss_total", "ddf_loss_total"):
        torch.library.register_fake(f"dfine::{name}")(_total_fake)
    for name in ("fgl_loss_backward", "ddf_loss_backward"):
        torch.library.register_fake(f"dfine::{name}")(_grad_fake)


if extension_available() and hasattr(torch.ops.dfine, "fgl_loss_forward"):
    _register_cpp_fakes()


# --------------------------------------------------------------------------------------------
# Inputs for `python -m dfine.ops.compare`.


def compare_cases(rows: int = 4 * 500 * 4, reg_max: int = 32, seed: int = 0, dtype=torch.float32, device="cpu"):
    """Realistic random inputs of both losses (one decoder layer of D-FINE-L: 4 x 500 queries x 4
    edges). Returns a list of ``(name, fn, reference_fn, args, kwargs)``; ``fn(*args, backend=...,
    **kwargs)`` and ``reference_fn(*args, **kwargs)`` return the loss; pred_corners requires grad."""
    gen = torch.Generator().manual_seed(seed)
    bins = reg_max + 1
    pred = (torch.randn(rows, bins, generator=gen) * 3).to(dtype=dtype, device=device).requires_grad_(True)
    teacher = (torch.randn(rows, bins, generator=gen) * 3).to(dtype=dtype, device=device)
    target = (torch.rand(rows, generator=gen) * (reg_max - 0.1)).to(dtype=dtype, device=device)
    weight_right = (target - target.floor()).clamp(0, 1)
    weight_left = 1 - weight_right
    iou = torch.rand(rows, generator=gen).to(dtype=dtype, device=device)
    return [
        ("fgl_loss", fgl_loss, fgl_loss_reference, (pred, target, weight_left, weight_right, iou), {"reduction": "sum"}),
        ("ddf_loss", ddf_loss, ddf_loss_reference, (pred, teacher, iou), {"temperature": 5.0, "reduction": "sum"}),
    ]
