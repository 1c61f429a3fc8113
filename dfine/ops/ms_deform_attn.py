"""Multi-scale deformable attention with a per-level number of sampling points.

``ms_deform_attn`` is the public entry point. ``ms_deform_attn_reference`` is the definition of
truth (plain PyTorch, ``F.grid_sample``); the fused backends must agree with it:

* ``cpp``    - ``torch.ops.dfine.ms_deform_attn_forward/backward`` from ``csrc/ms_deform_attn/``
               (C++ on CPU tensors, CUDA on CUDA tensors), registered in C++ with ``TORCH_LIBRARY``,
               autograd included (``csrc/ms_deform_attn/autograd/``); the fake kernels are here;
* ``triton`` - ``torch.ops.dfine.ms_deform_attn_triton``, kernels and autograd in
               ``dfine/kernels/ms_deform_attn.py``.

This module holds the reference, the argument checks and the dispatch.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F

from dfine.kernels import ms_deform_attn as _triton_kernels  # noqa: F401  (defines the dfine::*_triton ops)
from dfine.ops._backend import extension_available, resolve_backend, symbolic_shapes

__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "ms_deform_attn_discrete", "check_ms_deform_attn_inputs"]

_OP = "ms_deform_attn"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights, num_points_list):
    """Plain-PyTorch multi-scale deformable attention (shapes as in :func:`ms_deform_attn`)."""
    B, S, M, D = value.shape
    _, Q, _, P, _ = sampling_locations.shape
    if symbolic_shapes() and not isinstance(spatial_shapes, torch.Tensor):
        shapes = [(h, w) for h, w in spatial_shapes]  # traced sizes stay graph values (dynamic ONNX H, W)
    else:
        shapes = _shapes_as_list(spatial_shapes)
    # [B, S, M, D] -> [B*M, D, S], then one [B*M, D, H, W] map per level.
    value = value.permute(0, 2, 3, 1).reshape(B * M, D, S)
    level_values = value.split([h * w for h, w in shapes], dim=-1)
    # grid_sample wants [-1, 1] coordinates: x_pix = (g + 1) / 2 * W - 0.5 = loc * W - 0.5.
    grids = (2 * sampling_locations - 1).permute(0, 2, 1, 3, 4).reshape(B * M, Q, P, 2)
    level_grids = grids.split(list(num_points_list), dim=2)
    sampled = []
    for (h, w), v, g in zip(shapes, level_values, level_grids):
        sampled.append(
            F.grid_sample(
                v.reshape(B * M, D, h, w), g, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )  # [B*M, D, Q, P_l]
    sampled = torch.cat(sampled, dim=-1)  # [B*M, D, Q, P]
    weights = attention_weights.permute(0, 2, 1, 3).reshape(B * M, 1, Q, P)
    out = (sampled * weights).sum(-1)  # [B*M, D, Q]
    return out.reshape(B, M * D, Q).transpose(1, 2).contiguous()


def ms_deform_attn_discrete(value, spatial_shapes, sampling_locations, attention_weights, num_points_list):
    """The published ``cross_attn_method: discrete``: each point reads the one cell it rounds to (no
    bilinear interpolation, no ``GridSample``: a gather, for runtimes without it). Shapes as in
    :func:`ms_deform_attn`.

    Per level of size ``(H, W)``: ``x = int64(loc_x * W + 0.5)``, ``y = int64(loc_y * H + 0.5)``, both
    clamped to ``[0, H - 1]`` - the published code clamps x by H too (on a map wider than tall, columns
    ``x >= H`` are never read). Kept for checkpoint compatibility. Where the published code would index
    past a map taller than wide (``x >= W``) x is also clamped to ``W - 1`` (there it has no result).
    The rounded coordinates carry no gradient (the published model freezes ``sampling_offsets``);
    ``value`` and ``attention_weights`` get theirs."""
    if isinstance(value, torch.Tensor) and torch.is_autocast_enabled(value.device.type):
        value, sampling_locations, attention_weights = (
            t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
            for t in (value, sampling_locations, attention_weights)
        )
        with torch.autocast(value.device.type, enabled=False):
            return ms_deform_attn_discrete(value, spatial_shapes, sampling_locations, attention_weights,
                                           num_points_list)
    if symbolic_shapes() and not isinstance(spatial_shapes, torch.Tensor):
        shapes = [(h, w) for h, w in spatial_shapes]  # traced sizes stay graph values (dynamic ONNX H, W)
        num_points_list = [int(p) for p in num_points_list]
    else:
        _, num_points_list = check_ms_deform_attn_inputs(
            value, spatial_shapes, sampling_locations, attention_weights, num_points_list)
        shapes = _shapes_as_list(spatial_shapes)
    B, S, M, D = value.shape
    _, Q, _, P, _ = sampling_locations.shape
    value = value.permute(0, 2, 3, 1).reshape(B * M, D, S)
    level_values = value.split([h * w for h, w in shapes], dim=-1)
    locations = sampling_locations.permute(0, 2, 1, 3, 4).reshape(B * M, Q, P, 2)
    level_locations = locations.split(num_points_list, dim=2)
    sampled = []
    for (h, w), v, loc in zip(shapes, level_values, level_locations):
        # int64() truncates toward zero; after the clamp at 0 that is the same as floor
        x = (loc[..., 0] * w + 0.5).to(torch.int64)
        y = (loc[..., 1] * h + 0.5).to(torch.int64)
        y = _clamp_upper(y.clamp(min=0), h - 1)
        x = _clamp_upper(_clamp_upper(x.clamp(min=0), h - 1), w - 1)  # h - 1: the published clamp
        index = (y * w + x).reshape(B * M, 1, -1).expand(-1, D, -1)  # flat cell of each point
        sampled.append(v.gather(2, index).reshape(B * M, D, Q, -1))  # [B*M, D, Q, P_l]
    sampled = torch.cat(sampled, dim=-1)
    weights = attention_weights.permute(0, 2, 1, 3).reshape(B * M, 1, Q, P)
    out = (sampled * weights).sum(-1)
    return out.reshape(B, M * D, Q).transpose(1, 2).contiguous()


def _clamp_upper(index: torch.Tensor, bound):
    # ``bound`` is a traced size (a tensor) while exporting with dynamic H, W, else an int
    if isinstance(bound, torch.Tensor):
        return torch.minimum(index, bound.to(index.dtype))
    return index.clamp(max=bound)


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    num_points_list: Sequence[int],
    backend: str = "auto",
) -> torch.Tensor:
    """Sample ``value`` bilinearly at learned points of every level and sum with attention weights.

    Args:
        value: ``[B, S, M, D]``, ``S = sum(H_l * W_l)``, levels flattened row-major, level 0 first.
        spatial_shapes: ``[L, 2]`` int64 tensor of ``(H_l, W_l)``, or a list of ``(H, W)`` pairs.
        sampling_locations: ``[B, Q, M, P, 2]`` ``(x, y)`` normalised to ``[0, 1]``,
            ``P = sum(num_points_list)``, points grouped by level in level order.
        attention_weights: ``[B, Q, M, P]``.
        num_points_list: ``L`` ints, the number of points sampled on each level.
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"triton"`` (see ``dfine.ops._backend``).

    Returns:
        ``[B, Q, M * D]``. Sampling is ``grid_sample(align_corners=False, padding_mode="zeros")``:
        pixel ``x = loc_x * W - 0.5``, corners outside the map contribute zero. A NaN or ``±inf``
        location samples NaN (as ``grid_sample`` on CPU tensors). Under autocast the op computes and
        returns float32.
    """
    if isinstance(value, torch.Tensor) and torch.is_autocast_enabled(value.device.type):
        # mixed precision: like grid_sample, the op runs in float32 (autocast's fp32 policy), so
        # bf16/fp16 activations and fp32 sampling locations can meet here
        value, sampling_locations, attention_weights = (
            t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
            for t in (value, sampling_locations, attention_weights)
        )
        with torch.autocast(value.device.type, enabled=False):
            return ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights, num_points_list, backend)
    if (symbolic_shapes() and not isinstance(spatial_shapes, torch.Tensor)
            and resolve_backend(backend, value.device, _OP) == "reference"):
        # export tracing: the checks would turn the traced (H, W) of every level into constants
        return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights,
                                        list(num_points_list))
    spatial_shapes, num_points_list = check_ms_deform_attn_inputs(
        value, spatial_shapes, sampling_locations, attention_weights, num_points_list
    )
    which = resolve_backend(backend, value.device, _OP)
    if which == "reference":
        return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights, num_points_list)
    if which == "cpp":
        return torch.ops.dfine.ms_deform_attn_forward(
            value, spatial_shapes, sampling_locations, attention_weights, num_points_list
        )
    return torch.ops.dfine.ms_deform_attn_triton(value, spatial_shapes, sampling_locations, attention_weights, num_points_list)


# --------------------------------------------------------------------------------------------
# Input checks: every backend gets the same clear errors.


def _shapes_as_list(spatial_shapes) -> List[List[int]]:
    if isinstance(spatial_shapes, torch.Tensor):
        return [[int(h), int(w)] for h, w in spatial_shapes.tolist()]
    return [[int(h), int(w)] for h, w in spatial_shapes]


def check_ms_deform_attn_inputs(value, spatial_shapes, sampling_locations, attention_weights, num_points_list):
    """Validate the arguments; return ``spatial_shapes`` as an int64 tensor on value's device and
    ``num_points_list`` as a list of ints. Raises ``TypeError``/``ValueError`` naming the argument."""
    for name, t in (
        ("value", value),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{_OP}: {name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                f"got {t.dtype}"
            )
    if value.dim() != 4:
        raise ValueError(f"{_OP}: value must have shape [B, S, M, D] (4 dims), got {tuple(value.shape)}")
    B, S, M, D = value.shape
    if sampling_locations.dim() != 5 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"{_OP}: sampling_locations must have shape [B, Q, M, P, 2], got {tuple(sampling_locations.shape)}"
        )
    Q, P = sampling_locations.shape[1], sampling_locations.shape[3]
    if tuple(sampling_locations.shape[:3]) != (B, Q, M) or sampling_locations.shape[0] != B:
        raise ValueError(
            f"{_OP}: sampling_locations must have shape [B={B}, Q, M={M}, P, 2] to match value "
            f"[B, S, M, D]={tuple(value.shape)}, got {tuple(sampling_locations.shape)}"
        )
    if tuple(attention_weights.shape) != (B, Q, M, P):
        raise ValueError(
            f"{_OP}: attention_weights must have shape [B, Q, M, P]={(B, Q, M, P)}, "
            f"got {tuple(attention_weights.shape)}"
        )
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if t.dtype != value.dtype:
            raise TypeError(f"{_OP}: {name} has dtype {t.dtype} but value has {value.dtype}; they must match")
        if t.device != value.device:
            raise ValueError(f"{_OP}: {name} is on {t.device} but value is on {value.device}; they must match")

    if isinstance(num_points_list, torch.Tensor) or not isinstance(num_points_list, (list, tuple)):
        raise TypeError(f"{_OP}: num_points_list must be a list of ints, got {type(num_points_list).__name__}")
    num_points_list = [int(p) for p in num_points_list]
    if len(num_points_list) == 0 or any(p < 1 for p in num_points_list):
        raise ValueError(f"{_OP}: num_points_list must be a non-empty list of ints >= 1, got {num_points_list}")
    if sum(num_points_list) != P:
        raise ValueError(
            f"{_OP}: sum(num_points_list)={sum(num_points_list)} must equal P={P}, the number of points in "
            f"sampling_locations [B, Q, M, P, 2]"
        )

    L = len(num_points_list)
    if isinstance(spatial_shapes, torch.Tensor):
        if spatial_shapes.dtype != torch.int64:
            raise TypeError(f"{_OP}: spatial_shapes must be an int64 tensor, got {spatial_shapes.dtype}")
        if spatial_shapes.device != value.device:
            raise ValueError(
                f"{_OP}: spatial_shapes is on {spatial_shapes.device} but value is on {value.device}; "
                "they must match (or pass a list of (H, W) pairs)"
            )
        shapes_tensor = spatial_shapes
        shapes_list = None if torch.compiler.is_compiling() else _shapes_as_list(spatial_shapes)
    else:
        try:
            shapes_list = _shapes_as_list(spatial_shapes)
        except (TypeError, ValueError):
            raise TypeError(f"{_OP}: spatial_shapes must be an [L, 2] int64 tensor or a list of (H, W) pairs")
        shapes_tensor = torch.tensor(shapes_list, dtype=torch.int64, device=value.device).reshape(-1, 2)
    if tuple(shapes_tensor.shape) != (L, 2):
        raise ValueError(
            f"{_OP}: spatial_shapes must have shape [L, 2] with L=len(num_points_list)={L}, "
            f"got {tuple(shapes_tensor.shape)}"
        )
    if shapes_list is not None:
        if any(h < 1 or w < 1 for h, w in shapes_list):
            raise ValueError(f"{_OP}: every (H, W) in spatial_shapes must be >= 1, got {shapes_list}")
        if sum(h * w for h, w in shapes_list) != S:
            raise ValueError(
                f"{_OP}: spatial_shapes {shapes_list} sum to {sum(h * w for h, w in shapes_list)} positions "
                f"but value has S={S} (value is [B, S, M, D]={tuple(value.shape)})"
            )
    return shapes_tensor, num_points_list


# --------------------------------------------------------------------------------------------
# Fake (meta) kernels of the C++/CUDA ops, for torch.compile and torch.export (the kernels and
# their autograd are registered in C++ by dfine._C, csrc/ms_deform_attn/).


def _register_cpp_fakes():
    @torch.library.register_fake("dfine::ms_deform_attn_forward")
    def _forward_fake(value, spatial_shapes, sampling_locations, attention_weights, num_points_list):
        B, _, M, D = value.shape
        return value.new_empty((B, sampling_locations.shape[1], M * D))

    @torch.library.register_fake("dfine::ms_deform_attn_backward")
    def _backward_fake(grad_output, value, spatial_shapes, sampling_locations, attention_weights, num_points_list):
        return (
            torch.empty_like(value, memory_format=torch.contiguous_format),
            torch.empty_like(sampling_locations, memory_format=torch.contiguous_format),
            torch.empty_like(attention_weights, memory_format=torch.contiguous_format),
        )


# Guarded on the op itself: a build may carry other ops' kernels but not this one's.
if extension_available() and hasattr(torch.ops.dfine, "ms_deform_attn_forward"):
    _register_cpp_fakes()
