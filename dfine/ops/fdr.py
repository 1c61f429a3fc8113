"""Fine-grained Distribution Refinement (FDR) box decoding and its training targets.

* :func:`weighting_function` - the non-uniform bin positions W(n), n = 0..reg_max (``project``).
* :func:`fdr_decode` - per edge softmax over the ``reg_max + 1`` bin logits, expectation with W
  (the distance ``d``), ``distance2bbox`` against the reference boxes, and the LQE statistics
  (top-k probabilities per edge and their mean) from the same softmax. ``fdr_decode_reference`` is
  the definition of truth; the fused backends are
  ``cpp``    - ``torch.ops.dfine.fdr_decode_forward/backward`` from ``csrc/fdr/`` (C++ on CPU
               tensors, CUDA on CUDA tensors, autograd in ``csrc/fdr/autograd/``); fake kernels here;
  ``triton`` - ``torch.ops.dfine.fdr_decode_triton``, kernels and autograd in ``dfine/kernels/fdr_decode.py``.
* :func:`fdr_targets` - ``bbox2distance`` + ``translate_gt``: the fractional target bin of every
  edge and the weights of its two neighbouring bins (no gradient, plain PyTorch only).
"""

from __future__ import annotations

import math
from typing import Tuple, Union

import torch
import torch.nn.functional as F

from dfine.kernels import fdr_decode as _triton_kernels  # noqa: F401  (defines the dfine::*_triton ops)
from dfine.ops._backend import extension_available, resolve_backend, symbolic_shapes

__all__ = [
    "weighting_function",
    "distance2bbox",
    "bbox2distance",
    "translate_gt",
    "fdr_decode",
    "fdr_decode_reference",
    "fdr_targets",
    "compare_cases",
]

_OP = "fdr_decode"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
RegScale = Union[float, int, torch.Tensor]


# --------------------------------------------------------------------------------------------
# FDR math in plain PyTorch (the published formulas).


def weighting_function(reg_max: int, up, reg_scale, dtype=None, device=None) -> torch.Tensor:
    """W(n), n = 0..reg_max: bins spaced geometrically around 0, outermost bins at -2*|up*rs| and +2*|up*rs|.

    ``up`` and ``reg_scale`` may be python numbers or tensors (the model keeps them as one-element
    parameters). Computed in ``dtype`` (default: float32, as the published model does, so the values
    agree bit for bit); returns a 1-D tensor of ``reg_max + 1`` values.
    """
    if int(reg_max) < 4 or int(reg_max) % 2:
        raise ValueError(f"weighting_function: reg_max must be an even int >= 4, got {reg_max}")
    reg_max = int(reg_max)
    if device is None:
        for v in (up, reg_scale):
            if isinstance(v, torch.Tensor):
                device = v.device
    dtype = dtype or torch.float32
    up_t = torch.as_tensor(up).to(device=device, dtype=dtype).reshape(-1)[:1].abs()
    rs_t = torch.as_tensor(reg_scale).to(device=device, dtype=dtype).reshape(-1)[:1].abs()
    ub1 = up_t * rs_t
    ub2 = ub1 * 2
    step = (ub1 + 1) ** (2 / (reg_max - 2))
    left = [-(step ** i) + 1 for i in range(reg_max // 2 - 1, 0, -1)]
    right = [step ** i - 1 for i in range(1, reg_max // 2)]
    return torch.cat([-ub2] + left + [torch.zeros_like(ub1)] + right + [ub2], 0)


def _abs_reg_scale(reg_scale: RegScale):
    if isinstance(reg_scale, torch.Tensor):
        return reg_scale.abs()
    return abs(reg_scale)


def distance2bbox(points: torch.Tensor, distance: torch.Tensor, reg_scale: RegScale) -> torch.Tensor:
    """Reference boxes ``points`` (cx, cy, w, h) moved edge-wise by ``distance`` (l, t, r, b) in units
    of w/|reg_scale| (h/|reg_scale|) -> boxes (cx, cy, w, h). ``distance == 0`` gives ``points`` back."""
    rs = _abs_reg_scale(reg_scale)
    half = 0.5 * rs
    unit_w = points[..., 2] / rs
    unit_h = points[..., 3] / rs
    x1 = points[..., 0] - (half + distance[..., 0]) * unit_w
    y1 = points[..., 1] - (half + distance[..., 1]) * unit_h
    x2 = points[..., 0] + (half + distance[..., 2]) * unit_w
    y2 = points[..., 1] + (half + distance[..., 3]) * unit_h
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)


def translate_gt(gt: torch.Tensor, project: torch.Tensor, reg_max: int) -> Tuple[torch.Tensor, ...]:
    """Fractional bin position of every distance in ``gt`` (flattened) -> (index, weight_right, weight_left).

    ``index = left + weight_right`` where ``left`` is the last bin with W <= gt and ``weight_right``
    the relative position of gt between W[left] and W[left + 1]. Below W[0] the index is 0 with all
    weight on bin 0; at or beyond W[reg_max] it is ``reg_max - 0.1`` with all weight on the right bin.
    """
    gt = gt.reshape(-1)
    values = project.to(device=gt.device, dtype=gt.dtype)
    left = (values.unsqueeze(0) <= gt.unsqueeze(1)).sum(1) - 1  # bins at or left of gt, minus one
    index = left.to(gt.dtype)
    inside = (left >= 0) & (left < reg_max)
    left_safe = left.clamp(0, reg_max - 1)
    dist_left = (gt - values[left_safe]).abs()
    dist_right = (values[left_safe + 1] - gt).abs()
    frac = dist_left / (dist_left + dist_right)
    zeros, ones = torch.zeros_like(index), torch.ones_like(index)
    index = torch.where(inside, index + frac, index)
    weight_right = torch.where(inside, frac, zeros)
    weight_left = torch.where(inside, 1.0 - frac, zeros)
    below = index < 0
    weight_right = torch.where(below, zeros, weight_right)
    weight_left = torch.where(below, ones, weight_left)
    index = torch.where(below, zeros, index)
    beyond = index >= reg_max
    weight_right = torch.where(beyond, ones, weight_right)
    weight_left = torch.where(beyond, zeros, weight_left)
    index = torch.where(beyond, torch.full_like(index, reg_max - 0.1), index)
    return index, weight_right, weight_left


def bbox2distance(points, bbox_xyxy, project, reg_scale: RegScale, reg_max: int, eps: float = 0.1):
    """Distances (l, t, r, b) from the centre of ``points`` (cx, cy, w, h) to the edges of ``bbox_xyxy``
    in units of w/|rs| (h/|rs|), minus the half box; :func:`translate_gt`; the index clamped to
    ``[0, reg_max - eps]``. Returns flattened ``(index, weight_right, weight_left)``.

    Zero-size reference boxes: the published ``+ 1e-16`` in the denominators keeps the division
    finite; widths/heights are clamped at 0 first so the denominator is never 0 or negative (a
    degenerate reference box therefore puts every edge on bin 0 or at ``reg_max - 0.1``)."""
    rs = _abs_reg_scale(reg_scale)
    w = points[..., 2].clamp(min=0)
    h = points[..., 3].clamp(min=0)
    left = (points[..., 0] - bbox_xyxy[..., 0]) / (w / rs + 1e-16) - 0.5 * rs
    top = (points[..., 1] - bbox_xyxy[..., 1]) / (h / rs + 1e-16) - 0.5 * rs
    right = (bbox_xyxy[..., 2] - points[..., 0]) / (w / rs + 1e-16) - 0.5 * rs
    bottom = (bbox_xyxy[..., 3] - points[..., 1]) / (h / rs + 1e-16) - 0.5 * rs
    four = torch.stack([left, top, right, bottom], -1)
    index, weight_right, weight_left = translate_gt(four, project, reg_max)
    index = index.clamp(min=0, max=reg_max - eps)
    return index, weight_right, weight_left


@torch.no_grad()
def fdr_targets(ref_boxes: torch.Tensor, gt_boxes_xyxy: torch.Tensor, project: torch.Tensor,
                reg_scale: RegScale, reg_max: int):
    """FGL targets of every edge: ``(target_bins, weight_left, weight_right)``, each ``[..., 4]``
    (edges l, t, r, b; flatten with ``.reshape(-1)`` to line up with ``pred_corners.reshape(-1, K+1)``).

    ``ref_boxes`` ``[..., 4]`` (cx, cy, w, h), ``gt_boxes_xyxy`` ``[..., 4]`` (x1, y1, x2, y2),
    ``project`` the ``[reg_max + 1]`` W vector of :func:`weighting_function`. fp16/bf16 inputs are
    computed in float32 (the 1e-16 of the denominators underflows in half precision). No gradient.
    """
    for name, t in (("ref_boxes", ref_boxes), ("gt_boxes_xyxy", gt_boxes_xyxy), ("project", project)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"fdr_targets: {name} must be a floating-point torch.Tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if ref_boxes.dim() < 1 or ref_boxes.shape[-1] != 4:
        raise ValueError(f"fdr_targets: ref_boxes must have shape [..., 4] (cx, cy, w, h), got {tuple(ref_boxes.shape)}")
    if gt_boxes_xyxy.shape != ref_boxes.shape:
        raise ValueError(f"fdr_targets: gt_boxes_xyxy must have the shape of ref_boxes {tuple(ref_boxes.shape)}, "
                         f"got {tuple(gt_boxes_xyxy.shape)}")
    if project.dim() != 1 or project.numel() != int(reg_max) + 1:
        raise ValueError(f"fdr_targets: project must have shape [reg_max + 1] = [{int(reg_max) + 1}], "
                         f"got {tuple(project.shape)}")
    dtype = torch.promote_types(ref_boxes.dtype, torch.float32)
    shape = ref_boxes.shape
    index, weight_right, weight_left = bbox2distance(
        ref_boxes.to(dtype), gt_boxes_xyxy.to(dtype), project.to(dtype), reg_scale, int(reg_max)
    )
    return index.reshape(shape), weight_left.reshape(shape), weight_right.reshape(shape)


# --------------------------------------------------------------------------------------------
# fdr_decode: reference and dispatch.


def fdr_decode_reference(pred_corners, project, ref_boxes, reg_scale: RegScale, lqe_topk: int = 4):
    """Plain-PyTorch :func:`fdr_decode` (the published Integral + distance2bbox + LQE statistics)."""
    bins = project.shape[0]
    prob = F.softmax(pred_corners.reshape(*pred_corners.shape[:-1], 4, bins), dim=-1)
    distance = F.linear(prob.reshape(-1, bins), project.to(prob.dtype)).reshape(*pred_corners.shape[:-1], 4)
    boxes = distance2bbox(ref_boxes, distance, reg_scale)
    top = prob.topk(lqe_topk, dim=-1).values
    stats = torch.cat([top, top.mean(dim=-1, keepdim=True)], dim=-1)
    return boxes, stats


def _reg_scale_float(reg_scale: RegScale) -> float:
    if isinstance(reg_scale, torch.Tensor):
        if reg_scale.numel() < 1:
            raise ValueError("fdr_decode: reg_scale tensor is empty")
        return float(reg_scale.reshape(-1)[0])
    return float(reg_scale)


def check_fdr_decode_inputs(pred_corners, project, ref_boxes, reg_scale, lqe_topk):
    for name, t in (("pred_corners", pred_corners), ("project", project), ("ref_boxes", ref_boxes)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{_OP}: {name} must be a floating-point tensor (float16, bfloat16, float32 or "
                            f"float64), got {t.dtype}")
    if project.dim() != 1 or project.shape[0] < 2:
        raise ValueError(f"{_OP}: project must have shape [K+1] (the W vector), got {tuple(project.shape)}")
    bins = project.shape[0]
    if pred_corners.dim() < 1 or pred_corners.shape[-1] != 4 * bins:
        raise ValueError(f"{_OP}: pred_corners must have shape [..., 4*(K+1)] = [..., {4 * bins}] to match "
                         f"project [K+1]=[{bins}], got {tuple(pred_corners.shape)}")
    if tuple(ref_boxes.shape) != tuple(pred_corners.shape[:-1]) + (4,):
        raise ValueError(f"{_OP}: ref_boxes must have shape {tuple(pred_corners.shape[:-1]) + (4,)} "
                         f"([..., 4] with the leading dims of pred_corners), got {tuple(ref_boxes.shape)}")
    if ref_boxes.dtype != pred_corners.dtype:
        raise TypeError(f"{_OP}: ref_boxes has dtype {ref_boxes.dtype} but pred_corners has "
                        f"{pred_corners.dtype}; they must match")
    for name, t in (("project", project), ("ref_boxes", ref_boxes)):
        if t.device != pred_corners.device:
            raise ValueError(f"{_OP}: {name} is on {t.device} but pred_corners is on {pred_corners.device}")
    if isinstance(lqe_topk, bool) or not isinstance(lqe_topk, int) or not 1 <= lqe_topk <= min(bins, 8):
        raise ValueError(f"{_OP}: lqe_topk must be an int in [1, min(K+1, 8)] = [1, {min(bins, 8)}], got {lqe_topk!r}")
    if bins > 64:
        raise ValueError(f"{_OP}: at most 64 bins per edge are supported (K+1 = {bins})")
    if not isinstance(reg_scale, (int, float, torch.Tensor)) or isinstance(reg_scale, bool):
        raise TypeError(f"{_OP}: reg_scale must be a python number or a one-element tensor, got "
                        f"{type(reg_scale).__name__}")


def fdr_decode(pred_corners: torch.Tensor, project: torch.Tensor, ref_boxes: torch.Tensor,
               reg_scale: RegScale, lqe_topk: int = 4, backend: str = "auto"):
    """Decode FDR corner logits into boxes and LQE statistics in one pass.

    Args:
        pred_corners: ``[..., 4*(K+1)]`` bin logits per edge, edges in order left, top, right, bottom.
        project: ``[K+1]`` the W vector (:func:`weighting_function`); it gets no gradient.
        ref_boxes: ``[..., 4]`` (cx, cy, w, h) reference boxes (the leading dims of ``pred_corners``).
        reg_scale: python number or one-element tensor; ``|reg_scale|`` is used.
        lqe_topk: number of top probabilities per edge in the statistics (1..8).
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"triton"``.

    Returns:
        ``boxes`` ``[..., 4]`` (cx, cy, w, h) and ``lqe_stats`` ``[..., 4, lqe_topk + 1]`` (top-k
        probabilities per edge, descending, then their mean). Gradients flow to ``pred_corners``
        through both outputs and to ``ref_boxes``. The fused kernels take fp16/bf16 tensors as they are
        (``project`` in their dtype, as the reference uses it): they compute in float32 and write
        outputs and gradients in the input dtype.
    """
    if isinstance(pred_corners, torch.Tensor) and torch.is_autocast_enabled(pred_corners.device.type):
        # mixed precision: the softmax-expectation runs in float32 (autocast's policy for softmax),
        # every backend alike, so the reference's linear is not lowered to bf16/fp16 either
        pred_corners, ref_boxes = (
            t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16) else t
            for t in (pred_corners, ref_boxes)
        )
        with torch.autocast(pred_corners.device.type, enabled=False):
            return fdr_decode(pred_corners, project, ref_boxes, reg_scale, lqe_topk, backend)
    if symbolic_shapes() and resolve_backend(backend, pred_corners.device, _OP) == "reference":
        # export tracing: no shape checks (they would read traced sizes back into Python)
        return fdr_decode_reference(pred_corners, project, ref_boxes, reg_scale, lqe_topk)
    check_fdr_decode_inputs(pred_corners, project, ref_boxes, reg_scale, lqe_topk)
    which = resolve_backend(backend, pred_corners.device, _OP)
    if which == "reference":
        return fdr_decode_reference(pred_corners, project, ref_boxes, reg_scale, lqe_topk)
    lead = pred_corners.shape[:-1]
    corners2 = pred_corners.reshape(-1, pred_corners.shape[-1])
    ref2 = ref_boxes.reshape(-1, 4)
    proj = project.to(pred_corners.dtype)
    rs = _reg_scale_float(reg_scale)
    if which == "cpp":
        boxes, stats, _ = torch.ops.dfine.fdr_decode_forward(corners2, proj, ref2, rs, lqe_topk)
    else:
        boxes, stats, _ = torch.ops.dfine.fdr_decode_triton(corners2, proj, ref2, rs, lqe_topk)
    return boxes.reshape(*lead, 4), stats.reshape(*lead, 4, lqe_topk + 1)


# --------------------------------------------------------------------------------------------
# Fake (meta) kernels of the C++/CUDA ops, for torch.compile and torch.export (the kernels and
# their autograd are registered in C++ by dfine._C, csrc/fdr/).


def _register_cpp_fakes():
    @torch.library.register_fake("dfine::fdr_decode_forward")
    def _forward_fake(pred_corners, project, ref_boxes, reg_scale, lqe_topk):
        rows = pred_corners.shape[0]
        return (
            pred_corners.new_empty((rows, 4)),
            pred_corners.new_empty((rows, 4, lqe_topk + 1)),
            pred_corners.new_empty((rows, 4, lqe_topk), dtype=torch.uint8),
        )

    @torch.library.register_fake("dfine::fdr_decode_backward")
    def _backward_fake(grad_boxes, grad_stats, pred_corners, project, ref_boxes, topk_index, reg_scale, lqe_topk):
        return torch.empty_like(pred_corners), torch.empty_like(ref_boxes)


if extension_available() and hasattr(torch.ops.dfine, "fdr_decode_forward"):
    _register_cpp_fakes()


# --------------------------------------------------------------------------------------------
# Inputs for `python -m dfine.ops.compare`.


def compare_cases(rows: int = 4 * 500, reg_max: int = 32, seed: int = 0, dtype=torch.float32, device="cpu"):
    """Realistic random inputs of :func:`fdr_decode` (one decoder layer of D-FINE-L by default:
    B=4 x (300 + 200) queries): returns a list of ``(name, fn, args, kwargs)`` where
    ``fn(*args, backend=..., **kwargs)`` is the op, ``fdr_decode_reference`` its reference with the
    same args, and the outputs are ``(boxes, lqe_stats)``; differentiable args have requires_grad."""
    gen = torch.Generator().manual_seed(seed)
    project = weighting_function(reg_max, 0.5, 4.0).to(dtype=dtype, device=device)
    corners = (torch.randn(rows, 4 * (reg_max + 1), generator=gen) * 3).to(dtype=dtype, device=device)
    centre = torch.rand(rows, 2, generator=gen) * 0.8 + 0.1
    size = torch.rand(rows, 2, generator=gen) * 0.4 + 0.02
    ref = torch.cat([centre, size], -1).to(dtype=dtype, device=device)
    corners.requires_grad_(True)
    ref.requires_grad_(True)
    return [("fdr_decode", fdr_decode, fdr_decode_reference, (corners, project, ref, 4.0), {"lqe_topk": 4})]
