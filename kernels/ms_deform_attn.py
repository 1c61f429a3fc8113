"""Triton kernels of multi-scale deformable attention with a per-level number of points.

Kernels, launchers and the ``dfine::ms_deform_attn_triton`` torch.library op with its autograd
(use ``dfine.ops.ms_deform_attn(..., backend="triton")``):

* :func:`ms_deform_attn_forward_triton`  -> ``out [B, Q, M*D]``
* :func:`ms_deform_attn_backward_triton` -> ``(grad_value, grad_sampling_locations, grad_attention_weights)``

Semantics are those of ``ms_deform_attn_reference``: bilinear sampling as
``F.grid_sample(align_corners=False, padding_mode="zeros")`` (pixel ``x = loc_x * W - 0.5``,
corners outside the map contribute zero, no clamping to the border), weighted by the attention
weights and summed over all points of all levels.

Layout of the work: one program per (block of ``BLOCK_Q`` queries, batch ``b``, head ``m``); it
holds a ``[BLOCK_Q, BLOCK_D]`` tile (``BLOCK_D`` = next power of two >= D, masked) and loops over
the ``P`` points. The level of each point comes from a small int32 table ``point_level [P]``, and
the level's ``(H, W)`` and first flat position from ``spatial_shapes [L, 2]`` and
``level_start [L]``, so any split of points over levels (D-FINE uses [3, 6, 3] or [6, 6]) is one
compiled kernel. Arithmetic is in fp32 for fp16/bf16/fp32 inputs and in fp64 for fp64 inputs.

Backward: the gradients of the attention weights and of the sampling locations belong to one
(b, q, m, p) each, so they are reduced over D in-kernel (``tl.sum``) and stored directly. The value
gradient is scattered to the four corners with ``tl.atomic_add`` into an fp32 (fp64 for fp64
inputs) buffer, cast to value's dtype at the end. On a GPU the order of those atomic additions is
not fixed, so ``grad_value`` is not bit-for-bit deterministic between runs (differences at the
rounding level of the accumulation dtype).

Deterministic backward (under ``torch.use_deterministic_algorithms(True)``, which ``train.py
--deterministic`` sets): the same kernel, with ``DETERMINISTIC`` set, writes for every corner of
every point its coefficient ``attn * bilinear weight`` and its value row ``(b * S + s) * M + m``
(the key) instead of the atomic adds. The keys are sorted (stable: entries of one row keep their
(b, q, m, p, corner) order) and a gather kernel, one program per value row, sums ``coefficient *
grad_out`` over the row's entries in that order and writes ``grad_value`` once, in value's dtype.
The order depends only on the inputs, so the result is the same bits from run to run, for any
launch configuration. The same scheme as the CUDA kernel (csrc/ms_deform_attn/cuda/coalesced.h).

Non-finite values propagate as in the reference (``F.grid_sample`` on CPU tensors): a NaN or ``±inf``
location samples NaN, a non-finite attention weight makes even a point outside the map NaN
(``inf * 0``), and so does a non-finite upstream gradient for the point's gradients.

Testing and speed: the kernels use only standard ``tl`` operations. On this project's CPU-only CI
they run under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors) and are checked against
the reference in ``tests/ops/test_ms_deform_attn_triton.py``. Their speed is only meaningful on CUDA
machines, so they are benchmarked only there (no benchmark is run or recorded on CPU).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from ._triton import HAS_TRITON, TYPE_NAMES, autotuned, compile_for_cuda, cuda_signature, jit_function, launch_config, tl, triton

__all__ = ["ms_deform_attn_forward_triton", "ms_deform_attn_backward_triton", "ms_deform_attn_triton"]

# Work per program without autotuning (the interpreter; the first guess): at most this many
# elements in the [BLOCK_Q, BLOCK_D] tile.
_MAX_TILE = 1024
_MAX_BLOCK_Q = 64
# Candidates timed on the GPU: queries per program and warps, tiles of at most _MAX_TUNED_TILE.
_Q_TILE_CONFIGS = [launch_config({"BLOCK_Q": q}, warps) for q, warps in
                   ((8, 2), (16, 4), (32, 4), (64, 4), (64, 8))] if HAS_TRITON else []
_MAX_TUNED_TILE = 4096


def _default_block_q(Q: int, D: int) -> int:
    block_d = triton.next_power_of_2(max(D, 1))
    return min(triton.next_power_of_2(max(Q, 1)), _MAX_BLOCK_Q, max(1, _MAX_TILE // block_d))


def _default_meta(named: dict) -> dict:
    return {"BLOCK_Q": _default_block_q(named["Q"], named["D"])}


def _fitting_q_tiles(configs, named: dict):
    """The candidates whose tile fits the call: BLOCK_Q * BLOCK_D <= _MAX_TUNED_TILE and no more
    query rows than the next power of two of Q (at least 8); the smallest if none does."""
    block_d, most_q = named["BLOCK_D"], max(8, triton.next_power_of_2(max(named["Q"], 1)))
    fit = [c for c in configs if c.kwargs["BLOCK_Q"] * block_d <= _MAX_TUNED_TILE and c.kwargs["BLOCK_Q"] <= most_q]
    return fit or [min(configs, key=lambda c: (c.kwargs["BLOCK_Q"], c.num_warps))]


def _q_tile_grid(Q: int, B: int, M: int):
    return lambda meta: (triton.cdiv(Q, meta["BLOCK_Q"]) * B * M,)


@triton.jit
def _corner_weights_and_indices(loc_ptr, loc_off, q_mask, H, W, ACC: tl.constexpr):
    """Pixel coordinates of one point for a block of queries, split into the integer top-left
    corner and the fractional parts (grid_sample's align_corners=False convention)."""
    loc_x = tl.load(loc_ptr + loc_off, mask=q_mask, other=0.0).to(ACC)
    loc_y = tl.load(loc_ptr + loc_off + 1, mask=q_mask, other=0.0).to(ACC)
    w_f = W.to(ACC)
    h_f = H.to(ACC)
    x = loc_x * w_f - 0.5
    y = loc_y * h_f - 0.5
    # A NaN or +-inf coordinate samples NaN, as in the reference: its fraction is NaN (so are the
    # corner weights: masked loads give 0, and 0 * NaN = NaN), and it is moved off the map before
    # the integer conversion.
    x_finite = tl.abs(x) < float("inf")
    y_finite = tl.abs(y) < float("inf")
    x = tl.where(x_finite, x, -2.0)
    y = tl.where(y_finite, y, -2.0)
    # Keep far-away (or huge) coordinates in a small range before the integer conversion: every
    # corner of a point left of -1 or right of W is outside the map either way, so the result
    # (zero contribution, zero gradient) does not change.
    x = tl.minimum(tl.maximum(x, -2.0), w_f + 1.0)
    y = tl.minimum(tl.maximum(y, -2.0), h_f + 1.0)
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    lx = tl.where(x_finite, x - x0f, float("nan"))
    ly = tl.where(y_finite, y - y0f, float("nan"))
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    return x0, y0, lx, ly


@autotuned(_Q_TILE_CONFIGS, key=["D", "P"], default=_default_meta, prune=_fitting_q_tiles)
@triton.jit
def _ms_deform_attn_fwd_kernel(
    value_ptr,  # [B, S, M, D] contiguous
    shapes_ptr,  # [L, 2] int64 (H, W)
    level_start_ptr,  # [L] int64
    point_level_ptr,  # [P] int32
    loc_ptr,  # [B, Q, M, P, 2] contiguous
    attn_ptr,  # [B, Q, M, P] contiguous
    out_ptr,  # [B, Q, M*D] contiguous
    S,
    Q,
    M,
    D,
    P,
    ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # 1-D grid (CUDA caps grid axes 1 and 2 at 65535): query blocks of one (b, m) are adjacent,
    # so neighbouring programs read the same value slice.
    num_q_blocks = tl.cdiv(Q, BLOCK_Q)
    pid = tl.program_id(0)
    pid_q = pid % num_q_blocks
    pid_bm = pid // num_q_blocks
    b = (pid_bm // M).to(tl.int64)
    m = (pid_bm % M).to(tl.int64)

    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < Q
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    q64 = q.to(tl.int64)
    # Offset of (b, q, m, point 0) in the [B, Q, M, P] weights; locations use twice that.
    bqm = (b * Q + q64) * M + m
    value_base = value_ptr + b * S * M * D + m * D + d[None, :]

    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC)
    for p in range(P):
        lvl = tl.load(point_level_ptr + p)
        H = tl.load(shapes_ptr + 2 * lvl)
        W = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(level_start_ptr + lvl)
        pt_off = bqm * P + p
        attn = tl.load(attn_ptr + pt_off, mask=q_mask, other=0.0).to(ACC)
        x0, y0, lx, ly = _corner_weights_and_indices(loc_ptr, pt_off * 2, q_mask, H, W, ACC)
        hx = 1.0 - lx
        hy = 1.0 - ly
        x1 = x0 + 1
        y1 = y0 + 1
        in_x0 = (x0 >= 0) & (x0 < W)
        in_x1 = (x1 >= 0) & (x1 < W)
        in_y0 = q_mask & (y0 >= 0) & (y0 < H)
        in_y1 = q_mask & (y1 >= 0) & (y1 < H)
        # Flat position of the top-left corner in the level; only dereferenced where valid.
        pos00 = start + y0.to(tl.int64) * W + x0.to(tl.int64)
        row = W  # one pixel down

        ok = (in_y0 & in_x0)[:, None] & d_mask[None, :]
        v = tl.load(value_base + (pos00 * M * D)[:, None], mask=ok, other=0.0).to(ACC)
        sampled = (hy * hx)[:, None] * v
        ok = (in_y0 & in_x1)[:, None] & d_mask[None, :]
        v = tl.load(value_base + ((pos00 + 1) * M * D)[:, None], mask=ok, other=0.0).to(ACC)
        sampled += (hy * lx)[:, None] * v
        ok = (in_y1 & in_x0)[:, None] & d_mask[None, :]
        v = tl.load(value_base + ((pos00 + row) * M * D)[:, None], mask=ok, other=0.0).to(ACC)
        sampled += (ly * hx)[:, None] * v
        ok = (in_y1 & in_x1)[:, None] & d_mask[None, :]
        v = tl.load(value_base + ((pos00 + row + 1) * M * D)[:, None], mask=ok, other=0.0).to(ACC)
        sampled += (ly * lx)[:, None] * v

        acc += attn[:, None] * sampled

    out_off = ((b * Q + q64) * M * D + m * D)[:, None] + d[None, :]
    out_mask = q_mask[:, None] & d_mask[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _store_entry(coef_ptr, key_ptr, entry, coef, pos, inside, b, m, S, M, no_key, q_mask):
    """Deterministic pass 1: the coefficient of one corner of a block of points and its value row
    (b * S + pos) * M + m, or no_key (sorts last, never gathered) for corners outside the map."""
    tl.store(coef_ptr + entry, coef, mask=q_mask)
    key = tl.where(inside, (b * S + pos) * M + m, no_key)
    tl.store(key_ptr + entry, key.to(tl.int64), mask=q_mask)


@triton.jit
def _ms_deform_attn_gather_kernel(
    grad_out_ptr,  # [B, Q, M*D] contiguous
    coef_ptr,  # [B*Q*M*P*4] ACC
    order_ptr,  # [B*Q*M*P*4] int64: the entries sorted by key (stable)
    starts_ptr,  # [B*S*M + 1] int64: first sorted entry of every value row
    grad_value_ptr,  # [B, S, M, D] contiguous, value's dtype
    D,
    P,
    ACC: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Deterministic pass 2: one program per value row (b, s, m) sums coefficient * grad_out row over
    the row's entries, in the sorted order, and stores the row once."""
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    first = tl.load(starts_ptr + row)
    last = tl.load(starts_ptr + row + 1)
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for e in range(first, last):
        entry = tl.load(order_ptr + e)
        coef = tl.load(coef_ptr + entry)
        bqm = entry // (4 * P)
        go = tl.load(grad_out_ptr + bqm * D + d, mask=d_mask, other=0.0).to(ACC)
        acc += coef * go
    tl.store(grad_value_ptr + row * D + d, acc.to(grad_value_ptr.dtype.element_ty), mask=d_mask)


@autotuned(_Q_TILE_CONFIGS, key=["D", "P", "DETERMINISTIC"], default=_default_meta, prune=_fitting_q_tiles,
           reset_to_zero=["grad_value_ptr"])
@triton.jit
def _ms_deform_attn_bwd_kernel(
    grad_out_ptr,  # [B, Q, M*D] contiguous
    value_ptr,  # [B, S, M, D] contiguous
    shapes_ptr,  # [L, 2] int64 (H, W)
    level_start_ptr,  # [L] int64
    point_level_ptr,  # [P] int32
    loc_ptr,  # [B, Q, M, P, 2] contiguous
    attn_ptr,  # [B, Q, M, P] contiguous
    grad_value_ptr,  # [B, S, M, D] contiguous, ACC dtype, zero-initialised (atomic adds; unused if DETERMINISTIC)
    grad_loc_ptr,  # [B, Q, M, P, 2] contiguous
    grad_attn_ptr,  # [B, Q, M, P] contiguous
    coef_ptr,  # DETERMINISTIC: [B, Q, M, P, 4] ACC, attn * corner weight
    key_ptr,  # DETERMINISTIC: [B, Q, M, P, 4] int64, value row of the corner, or no_key outside the map
    no_key,  # B * S * M
    S,
    Q,
    M,
    D,
    P,
    ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
):
    # 1-D grid (CUDA caps grid axes 1 and 2 at 65535): query blocks of one (b, m) are adjacent,
    # so neighbouring programs read the same value slice.
    num_q_blocks = tl.cdiv(Q, BLOCK_Q)
    pid = tl.program_id(0)
    pid_q = pid % num_q_blocks
    pid_bm = pid // num_q_blocks
    b = (pid_bm // M).to(tl.int64)
    m = (pid_bm % M).to(tl.int64)

    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < Q
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    q64 = q.to(tl.int64)
    bqm = (b * Q + q64) * M + m
    tile_mask = q_mask[:, None] & d_mask[None, :]
    value_offset = b * S * M * D + m * D + d[None, :]
    value_base = value_ptr + value_offset
    grad_value_base = grad_value_ptr + value_offset

    go_off = ((b * Q + q64) * M * D + m * D)[:, None] + d[None, :]
    grad_out = tl.load(grad_out_ptr + go_off, mask=tile_mask, other=0.0).to(ACC)

    for p in range(P):
        lvl = tl.load(point_level_ptr + p)
        H = tl.load(shapes_ptr + 2 * lvl)
        W = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(level_start_ptr + lvl)
        pt_off = bqm * P + p
        attn = tl.load(attn_ptr + pt_off, mask=q_mask, other=0.0).to(ACC)
        x0, y0, lx, ly = _corner_weights_and_indices(loc_ptr, pt_off * 2, q_mask, H, W, ACC)
        hx = 1.0 - lx
        hy = 1.0 - ly
        x1 = x0 + 1
        y1 = y0 + 1
        in_x0 = (x0 >= 0) & (x0 < W)
        in_x1 = (x1 >= 0) & (x1 < W)
        in_y0 = q_mask & (y0 >= 0) & (y0 < H)
        in_y1 = q_mask & (y1 >= 0) & (y1 < H)
        pos00 = start + y0.to(tl.int64) * W + x0.to(tl.int64)
        row = W
        # d(out)/d(value at a corner) = attn * corner weight; scale grad_out once.
        grad_sampled = attn[:, None] * grad_out

        # Corner (x0, y0): weight hx*hy, d/dx = -hy, d/dy = -hx.
        off = (pos00 * M * D)[:, None]
        ok = (in_y0 & in_x0)[:, None] & d_mask[None, :]
        v = tl.load(value_base + off, mask=ok, other=0.0).to(ACC)
        sampled = (hy * hx)[:, None] * v
        dx = -hy[:, None] * v
        dy = -hx[:, None] * v
        if DETERMINISTIC:
            _store_entry(coef_ptr, key_ptr, pt_off * 4, attn * hy * hx, pos00, in_y0 & in_x0, b, m, S, M, no_key,
                         q_mask)
        else:
            tl.atomic_add(grad_value_base + off, (hy * hx)[:, None] * grad_sampled, mask=ok)
        # Corner (x1, y0): weight lx*hy, d/dx = hy, d/dy = -lx.
        off = ((pos00 + 1) * M * D)[:, None]
        ok = (in_y0 & in_x1)[:, None] & d_mask[None, :]
        v = tl.load(value_base + off, mask=ok, other=0.0).to(ACC)
        sampled += (hy * lx)[:, None] * v
        dx += hy[:, None] * v
        dy -= lx[:, None] * v
        if DETERMINISTIC:
            _store_entry(coef_ptr, key_ptr, pt_off * 4 + 1, attn * hy * lx, pos00 + 1, in_y0 & in_x1, b, m, S, M,
                         no_key, q_mask)
        else:
            tl.atomic_add(grad_value_base + off, (hy * lx)[:, None] * grad_sampled, mask=ok)
        # Corner (x0, y1): weight hx*ly, d/dx = -ly, d/dy = hx.
        off = ((pos00 + row) * M * D)[:, None]
        ok = (in_y1 & in_x0)[:, None] & d_mask[None, :]
        v = tl.load(value_base + off, mask=ok, other=0.0).to(ACC)
        sampled += (ly * hx)[:, None] * v
        dx -= ly[:, None] * v
        dy += hx[:, None] * v
        if DETERMINISTIC:
            _store_entry(coef_ptr, key_ptr, pt_off * 4 + 2, attn * ly * hx, pos00 + row, in_y1 & in_x0, b, m, S, M,
                         no_key, q_mask)
        else:
            tl.atomic_add(grad_value_base + off, (ly * hx)[:, None] * grad_sampled, mask=ok)
        # Corner (x1, y1): weight lx*ly, d/dx = ly, d/dy = lx.
        off = ((pos00 + row + 1) * M * D)[:, None]
        ok = (in_y1 & in_x1)[:, None] & d_mask[None, :]
        v = tl.load(value_base + off, mask=ok, other=0.0).to(ACC)
        sampled += (ly * lx)[:, None] * v
        dx += ly[:, None] * v
        dy += lx[:, None] * v
        if DETERMINISTIC:
            _store_entry(coef_ptr, key_ptr, pt_off * 4 + 3, attn * ly * lx, pos00 + row + 1, in_y1 & in_x1, b, m, S,
                         M, no_key, q_mask)
        else:
            tl.atomic_add(grad_value_base + off, (ly * lx)[:, None] * grad_sampled, mask=ok)

        grad_attn = tl.sum(grad_out * sampled, axis=1)
        # x = loc_x * W - 0.5, so d/d(loc_x) = W * d/dx (and H for y).
        grad_x = tl.sum(grad_sampled * dx, axis=1) * W.to(ACC)
        grad_y = tl.sum(grad_sampled * dy, axis=1) * H.to(ACC)
        tl.store(grad_attn_ptr + pt_off, grad_attn.to(grad_attn_ptr.dtype.element_ty), mask=q_mask)
        tl.store(grad_loc_ptr + pt_off * 2, grad_x.to(grad_loc_ptr.dtype.element_ty), mask=q_mask)
        tl.store(grad_loc_ptr + pt_off * 2 + 1, grad_y.to(grad_loc_ptr.dtype.element_ty), mask=q_mask)


# --------------------------------------------------------------------------------------------
# Host-side wrappers.


def _accumulation_dtype(dtype: torch.dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _level_tables(spatial_shapes: torch.Tensor, num_points_list: Sequence[int], device):
    """int64 (H, W) per level, int64 first flat position per level, int32 level of every point."""
    shapes = spatial_shapes.to(device=device, dtype=torch.int64).contiguous()
    sizes = shapes[:, 0] * shapes[:, 1]
    level_start = (torch.cumsum(sizes, 0) - sizes).contiguous()
    counts = [int(n) for n in num_points_list]
    point_level = torch.repeat_interleave(
        torch.arange(len(counts), dtype=torch.int32), torch.tensor(counts, dtype=torch.int64)
    ).to(device)
    return shapes, level_start, point_level


def ms_deform_attn_forward_triton(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    num_points_list: List[int],
) -> torch.Tensor:
    """``[B, S, M, D]`` values sampled at ``[B, Q, M, P, 2]`` locations -> ``[B, Q, M*D]``."""
    B, S, M, D = value.shape
    Q, P = sampling_locations.shape[1], sampling_locations.shape[3]
    if B * Q * M * D == 0:
        return value.new_zeros((B, Q, M * D))
    value = value.contiguous()
    sampling_locations = sampling_locations.contiguous()
    attention_weights = attention_weights.contiguous()
    shapes, level_start, point_level = _level_tables(spatial_shapes, num_points_list, value.device)
    out = value.new_empty((B, Q, M * D))
    _, acc = _accumulation_dtype(value.dtype)
    _ms_deform_attn_fwd_kernel[_q_tile_grid(Q, B, M)](
        value, shapes, level_start, point_level, sampling_locations, attention_weights, out,
        S, Q, M, D, P,
        ACC=acc, BLOCK_D=triton.next_power_of_2(D),
    )
    return out


def ms_deform_attn_backward_triton(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    num_points_list: List[int],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`ms_deform_attn_forward_triton` w.r.t. value, sampling_locations and
    attention_weights, given ``grad_output [B, Q, M*D]``. ``grad_value`` is accumulated with atomics
    (order not deterministic on GPU), or, under ``torch.use_deterministic_algorithms(True)``, by the
    two-pass gather (the same bits from run to run)."""
    B, S, M, D = value.shape
    Q, P = sampling_locations.shape[1], sampling_locations.shape[3]
    if B * Q * M * D == 0:
        return (
            torch.zeros_like(value, memory_format=torch.contiguous_format),
            torch.zeros_like(sampling_locations, memory_format=torch.contiguous_format),
            torch.zeros_like(attention_weights, memory_format=torch.contiguous_format),
        )
    grad_output = grad_output.contiguous()
    value = value.contiguous()
    sampling_locations = sampling_locations.contiguous()
    attention_weights = attention_weights.contiguous()
    shapes, level_start, point_level = _level_tables(spatial_shapes, num_points_list, value.device)
    acc_torch, acc = _accumulation_dtype(value.dtype)
    grad_loc = torch.empty_like(sampling_locations)
    grad_attn = torch.empty_like(attention_weights)
    block_d = triton.next_power_of_2(D)
    deterministic = torch.are_deterministic_algorithms_enabled()
    if deterministic:
        entries = B * Q * M * P * 4
        coef = torch.empty(entries, dtype=acc_torch, device=value.device)
        key = torch.empty(entries, dtype=torch.int64, device=value.device)
        grad_value_acc = coef  # not written (no atomics in pass 1)
    else:
        grad_value_acc = torch.zeros(value.shape, dtype=acc_torch, device=value.device)
        coef, key = grad_value_acc, shapes  # not written (typed like the deterministic buffers)
    value_rows = B * S * M
    _ms_deform_attn_bwd_kernel[_q_tile_grid(Q, B, M)](
        grad_output, value, shapes, level_start, point_level, sampling_locations, attention_weights,
        grad_value_acc, grad_loc, grad_attn, coef, key, value_rows,
        S, Q, M, D, P,
        ACC=acc, BLOCK_D=block_d, DETERMINISTIC=deterministic,
    )
    if not deterministic:
        return grad_value_acc.to(value.dtype), grad_loc, grad_attn
    sorted_keys, order = torch.sort(key, stable=True)
    starts = torch.searchsorted(sorted_keys, torch.arange(value_rows + 1, device=value.device))
    grad_value = torch.empty_like(value)  # contiguous; every element is written
    _ms_deform_attn_gather_kernel[(value_rows,)](
        grad_output, coef, order, starts, grad_value, D, P, ACC=acc, BLOCK_D=block_d,
    )
    return grad_value, grad_loc, grad_attn


# --------------------------------------------------------------------------------------------
# The torch.library ops (``dfine::ms_deform_attn_triton`` and its backward) and their autograd.


@torch.library.custom_op("dfine::ms_deform_attn_triton", mutates_args=())
def ms_deform_attn_triton(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    num_points_list: List[int],
) -> torch.Tensor:
    return ms_deform_attn_forward_triton(value, spatial_shapes, sampling_locations, attention_weights, num_points_list)


@ms_deform_attn_triton.register_fake
def _(value, spatial_shapes, sampling_locations, attention_weights, num_points_list):
    B, _, M, D = value.shape
    return value.new_empty((B, sampling_locations.shape[1], M * D))


@torch.library.custom_op("dfine::ms_deform_attn_triton_backward", mutates_args=())
def ms_deform_attn_triton_backward(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    num_points_list: List[int],
) -> List[torch.Tensor]:
    return list(
        ms_deform_attn_backward_triton(
            grad_output, value, spatial_shapes, sampling_locations, attention_weights, num_points_list
        )
    )


@ms_deform_attn_triton_backward.register_fake
def _(grad_output, value, spatial_shapes, sampling_locations, attention_weights, num_points_list):
    return [torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)]


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, sampling_locations, attention_weights, num_points_list = inputs
    ctx.save_for_backward(value, spatial_shapes, sampling_locations, attention_weights)
    ctx.num_points_list = num_points_list


def _backward(ctx, grad_output):
    value, spatial_shapes, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = torch.ops.dfine.ms_deform_attn_triton_backward(
        grad_output, value, spatial_shapes, sampling_locations, attention_weights, ctx.num_points_list
    )
    return grad_value, None, grad_loc, grad_attn, None


ms_deform_attn_triton.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Ahead-of-time lowering check (no GPU needed): compile both kernels for a CUDA target.


def compile_kernels_for_cuda(dtypes=(torch.float32, torch.float64), capability: int = 80, block_d: int = 32,
                             tuned_configs: bool = False, queries: int = 300):
    """Compile the forward kernel, both backward kernels (atomic and deterministic pass 1) and the
    gather kernel to PTX and cubin for ``sm_<capability>`` without a GPU, proving they lower for
    CUDA. Must run with ``TRITON_INTERPRET`` unset (the interpreter replaces ``@triton.jit``
    functions). Returns ``{(dtype name, kernel name): PTX size in bytes}``, the deterministic
    backward named ``_ms_deform_attn_bwd_kernel[deterministic]``. With ``tuned_configs`` the forward
    and backward kernels are compiled once per autotuning candidate that fits ``block_d`` and
    ``queries`` (named ``...[BLOCK_Q=16,warps=4]``) instead of once with the default tile."""
    sizes = {"S": "i32", "Q": "i32", "M": "i32", "D": "i32", "P": "i32"}
    tables = {"shapes_ptr": "*i64", "level_start_ptr": "*i64", "point_level_ptr": "*i32"}
    if tuned_configs:
        tiles = [({"BLOCK_Q": c.kwargs["BLOCK_Q"]}, c.num_warps, f"[BLOCK_Q={c.kwargs['BLOCK_Q']},warps={c.num_warps}]")
                 for c in _fitting_q_tiles(_Q_TILE_CONFIGS, {"BLOCK_D": block_d, "Q": queries})]
    else:
        tiles = [({"BLOCK_Q": max(1, _MAX_TILE // block_d)}, 4, "")]
    result = {}
    for dtype in dtypes:
        name = TYPE_NAMES[str(dtype).replace("torch.", "")]
        acc_torch, acc = _accumulation_dtype(dtype)
        acc_name = TYPE_NAMES[str(acc_torch).replace("torch.", "")]
        types = {**sizes, **tables, "no_key": "i32", "key_ptr": "*i64", "order_ptr": "*i64", "starts_ptr": "*i64",
                 "coef_ptr": f"*{acc_name}"}
        jobs = []
        for tile, warps, suffix in tiles:
            consts = {"ACC": acc, "BLOCK_D": block_d, **tile}
            jobs += [
                (_ms_deform_attn_fwd_kernel, suffix, {**types}, consts, warps),
                (_ms_deform_attn_bwd_kernel, suffix, {**types, "grad_value_ptr": f"*{acc_name}"},
                 {**consts, "DETERMINISTIC": False}, warps),
                (_ms_deform_attn_bwd_kernel, "[deterministic]" + suffix, {**types, "grad_value_ptr": f"*{acc_name}"},
                 {**consts, "DETERMINISTIC": True}, warps),
            ]
        jobs.append((_ms_deform_attn_gather_kernel, "", types, {"ACC": acc, "BLOCK_D": block_d}, 4))
        for kernel, variant, kernel_types, constexprs, warps in jobs:
            signature = cuda_signature(kernel, kernel_types, f"*{name}")
            result[(name, jit_function(kernel).__name__ + variant)] = compile_for_cuda(
                kernel, signature, constexprs, capability, warps)
    return result
