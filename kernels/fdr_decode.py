"""Triton kernels of the FDR decode, their launchers and the ``dfine::fdr_decode_triton``
torch.library op with its autograd (``dfine.ops.fdr_decode(..., backend="triton")``).

One program handles ``BLOCK`` boxes; every edge is a ``[BLOCK, BLOCK_BINS]`` tile with the K+1
bins padded to a power of two (33 -> 64; padded bins hold -inf logits, i.e. probability 0).
Forward: softmax per edge, expectation with W, top-k probabilities (k passes of max + first index
of the max, lower bin first on ties), distance2bbox. Backward recomputes the softmax and uses the
top-k bins saved by the forward pass. ``BLOCK`` and the warps per program are autotuned on the GPU
(``ROW_TILE_CONFIGS``, once per bin count and k); the interpreter uses 32 boxes.

Dtypes: float16, bfloat16, float32 and float64 tensors. Every load is converted to the accumulation
dtype ``ACC`` (float32, float64 for float64 inputs), every store rounds once to the output's dtype.
"""

from __future__ import annotations

from typing import Tuple

import torch

from ._triton import ROW_TILE_CONFIGS, ROW_TILE_DEFAULT, autotuned, compile_row_kernels_for_cuda, row_tile_grid, tl, triton


def _block_bins(bins: int) -> int:
    return max(16, triton.next_power_of_2(bins))


def _accumulation_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _edge_softmax(z_ptr, w, rows, row_mask, bins, edge, NB: tl.constexpr, ACC: tl.constexpr):
    """Probabilities [BLOCK, BLOCK_BINS] of one edge and its expected distance [BLOCK], in ACC."""
    bin_mask = bins < NB
    ptrs = z_ptr + rows[:, None] * (4 * NB) + edge * NB + bins[None, :]
    z = tl.load(ptrs, mask=row_mask[:, None] & bin_mask[None, :], other=0.0).to(ACC)
    z = tl.where(bin_mask[None, :], z, float("-inf"))
    z_max = tl.max(z, axis=1)
    e = tl.exp(z - z_max[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    d = tl.sum(p * w[None, :], axis=1)
    return p, d


@autotuned(ROW_TILE_CONFIGS, key=["NB", "K"], default=ROW_TILE_DEFAULT)
@triton.jit
def _fdr_decode_forward_kernel(z_ptr, w_ptr, ref_ptr, box_ptr, stats_ptr, index_ptr, R, rs,
                               NB: tl.constexpr, BLOCK_BINS: tl.constexpr, K: tl.constexpr,
                               BLOCK: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < R
    bins = tl.arange(0, BLOCK_BINS)
    w = tl.load(w_ptr + bins, mask=bins < NB, other=0.0).to(ACC)
    out_ty = box_ptr.dtype.element_ty
    d_left = tl.zeros([BLOCK], dtype=ACC)
    d_top = tl.zeros([BLOCK], dtype=ACC)
    d_right = tl.zeros([BLOCK], dtype=ACC)
    d_bottom = tl.zeros([BLOCK], dtype=ACC)
    for edge in tl.static_range(4):
        p, d = _edge_softmax(z_ptr, w, rows, row_mask, bins, edge, NB, ACC)
        if edge == 0:
            d_left = d
        elif edge == 1:
            d_top = d
        elif edge == 2:
            d_right = d
        else:
            d_bottom = d
        work = tl.where(bins[None, :] < NB, p, -1.0)
        # A softmax row is NaN in every bin or in none (a NaN or +inf logit, or all -inf): its
        # top-k values are then NaN, as torch.topk's, at bin 0.
        row_sum = tl.sum(p, axis=1)
        total = tl.zeros([BLOCK], dtype=ACC)
        for i in tl.static_range(K):
            top = tl.max(work, axis=1)
            first = tl.min(tl.where(work == top[:, None], bins[None, :], BLOCK_BINS), axis=1)
            first = tl.where(row_sum == row_sum, first, 0)
            top = tl.where(row_sum == row_sum, top, row_sum)
            tl.store(stats_ptr + rows * (4 * (K + 1)) + edge * (K + 1) + i, top.to(out_ty), mask=row_mask)
            tl.store(index_ptr + rows * (4 * K) + edge * K + i, first.to(tl.uint8), mask=row_mask)
            work = tl.where(bins[None, :] == first[:, None], -2.0, work)
            total += top
        tl.store(stats_ptr + rows * (4 * (K + 1)) + edge * (K + 1) + K, (total / K).to(out_ty), mask=row_mask)
    cx = tl.load(ref_ptr + rows * 4 + 0, mask=row_mask, other=0.0).to(ACC)
    cy = tl.load(ref_ptr + rows * 4 + 1, mask=row_mask, other=0.0).to(ACC)
    bw = tl.load(ref_ptr + rows * 4 + 2, mask=row_mask, other=0.0).to(ACC)
    bh = tl.load(ref_ptr + rows * 4 + 3, mask=row_mask, other=0.0).to(ACC)
    half = 0.5 * rs
    unit_w = bw / rs
    unit_h = bh / rs
    x1 = cx - (half + d_left) * unit_w
    y1 = cy - (half + d_top) * unit_h
    x2 = cx + (half + d_right) * unit_w
    y2 = cy + (half + d_bottom) * unit_h
    tl.store(box_ptr + rows * 4 + 0, ((x1 + x2) / 2).to(out_ty), mask=row_mask)
    tl.store(box_ptr + rows * 4 + 1, ((y1 + y2) / 2).to(out_ty), mask=row_mask)
    tl.store(box_ptr + rows * 4 + 2, (x2 - x1).to(out_ty), mask=row_mask)
    tl.store(box_ptr + rows * 4 + 3, (y2 - y1).to(out_ty), mask=row_mask)


@triton.jit
def _edge_backward(gz_ptr, gstats_ptr, index_ptr, p, w, grad_d, rows, row_mask, bins, edge,
                   NB: tl.constexpr, K: tl.constexpr, ACC: tl.constexpr):
    grad_p = grad_d[:, None] * w[None, :]
    grad_mean = tl.load(gstats_ptr + rows * (4 * (K + 1)) + edge * (K + 1) + K, mask=row_mask,
                        other=0.0).to(ACC) / K
    for i in tl.static_range(K):
        g = tl.load(gstats_ptr + rows * (4 * (K + 1)) + edge * (K + 1) + i, mask=row_mask, other=0.0).to(ACC)
        idx = tl.load(index_ptr + rows * (4 * K) + edge * K + i, mask=row_mask, other=0).to(tl.int32)
        grad_p += tl.where(bins[None, :] == idx[:, None], (g + grad_mean)[:, None], 0.0)
    dot = tl.sum(p * grad_p, axis=1)
    gz = p * (grad_p - dot[:, None])
    ptrs = gz_ptr + rows[:, None] * (4 * NB) + edge * NB + bins[None, :]
    tl.store(ptrs, gz.to(gz_ptr.dtype.element_ty), mask=row_mask[:, None] & (bins[None, :] < NB))


@autotuned(ROW_TILE_CONFIGS, key=["NB", "K"], default=ROW_TILE_DEFAULT)
@triton.jit
def _fdr_decode_backward_kernel(gbox_ptr, gstats_ptr, z_ptr, w_ptr, ref_ptr, index_ptr, gz_ptr, gref_ptr, R, rs,
                                NB: tl.constexpr, BLOCK_BINS: tl.constexpr, K: tl.constexpr,
                                BLOCK: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < R
    bins = tl.arange(0, BLOCK_BINS)
    w = tl.load(w_ptr + bins, mask=bins < NB, other=0.0).to(ACC)
    out_ty = gref_ptr.dtype.element_ty
    p_left, d_left = _edge_softmax(z_ptr, w, rows, row_mask, bins, 0, NB, ACC)
    p_top, d_top = _edge_softmax(z_ptr, w, rows, row_mask, bins, 1, NB, ACC)
    p_right, d_right = _edge_softmax(z_ptr, w, rows, row_mask, bins, 2, NB, ACC)
    p_bottom, d_bottom = _edge_softmax(z_ptr, w, rows, row_mask, bins, 3, NB, ACC)
    bw = tl.load(ref_ptr + rows * 4 + 2, mask=row_mask, other=0.0).to(ACC)
    bh = tl.load(ref_ptr + rows * 4 + 3, mask=row_mask, other=0.0).to(ACC)
    g_cx = tl.load(gbox_ptr + rows * 4 + 0, mask=row_mask, other=0.0).to(ACC)
    g_cy = tl.load(gbox_ptr + rows * 4 + 1, mask=row_mask, other=0.0).to(ACC)
    g_w = tl.load(gbox_ptr + rows * 4 + 2, mask=row_mask, other=0.0).to(ACC)
    g_h = tl.load(gbox_ptr + rows * 4 + 3, mask=row_mask, other=0.0).to(ACC)
    half = 0.5 * rs
    unit_w = bw / rs
    unit_h = bh / rs
    gx1 = 0.5 * g_cx - g_w
    gx2 = 0.5 * g_cx + g_w
    gy1 = 0.5 * g_cy - g_h
    gy2 = 0.5 * g_cy + g_h
    tl.store(gref_ptr + rows * 4 + 0, (gx1 + gx2).to(out_ty), mask=row_mask)
    tl.store(gref_ptr + rows * 4 + 1, (gy1 + gy2).to(out_ty), mask=row_mask)
    tl.store(gref_ptr + rows * 4 + 2, ((gx2 * (half + d_right) - gx1 * (half + d_left)) / rs).to(out_ty),
             mask=row_mask)
    tl.store(gref_ptr + rows * 4 + 3, ((gy2 * (half + d_bottom) - gy1 * (half + d_top)) / rs).to(out_ty),
             mask=row_mask)
    _edge_backward(gz_ptr, gstats_ptr, index_ptr, p_left, w, -gx1 * unit_w, rows, row_mask, bins, 0, NB, K, ACC)
    _edge_backward(gz_ptr, gstats_ptr, index_ptr, p_top, w, -gy1 * unit_h, rows, row_mask, bins, 1, NB, K, ACC)
    _edge_backward(gz_ptr, gstats_ptr, index_ptr, p_right, w, gx2 * unit_w, rows, row_mask, bins, 2, NB, K, ACC)
    _edge_backward(gz_ptr, gstats_ptr, index_ptr, p_bottom, w, gy2 * unit_h, rows, row_mask, bins, 3, NB, K, ACC)


def fdr_decode_forward_triton(pred_corners, project, ref_boxes, reg_scale: float, lqe_topk: int):
    """pred_corners [R, 4*(K+1)], project [K+1], ref_boxes [R, 4] -> boxes [R, 4], stats [R, 4, k+1],
    top-k bins [R, 4, k] (uint8)."""
    z = pred_corners.contiguous()
    w = project.to(z.dtype).contiguous()
    ref = ref_boxes.to(z.dtype).contiguous()
    rows, bins = z.shape[0], w.shape[0]
    boxes = z.new_empty((rows, 4))
    stats = z.new_empty((rows, 4, lqe_topk + 1))
    index = torch.empty((rows, 4, lqe_topk), dtype=torch.uint8, device=z.device)
    if rows > 0:
        _fdr_decode_forward_kernel[row_tile_grid(rows)](z, w, ref, boxes, stats, index, rows, abs(float(reg_scale)),
                                                        NB=bins, BLOCK_BINS=_block_bins(bins), K=lqe_topk,
                                                        ACC=_accumulation_dtype(z.dtype))
    return boxes, stats, index


def fdr_decode_backward_triton(grad_boxes, grad_stats, pred_corners, project, ref_boxes, topk_index,
                               reg_scale: float, lqe_topk: int):
    z = pred_corners.contiguous()
    w = project.to(z.dtype).contiguous()
    ref = ref_boxes.to(z.dtype).contiguous()
    rows, bins = z.shape[0], w.shape[0]
    grad_z = torch.empty_like(z)
    grad_ref = torch.empty_like(ref)
    if rows > 0:
        _fdr_decode_backward_kernel[row_tile_grid(rows)](
            grad_boxes.to(z.dtype).contiguous(), grad_stats.to(z.dtype).contiguous(), z, w, ref,
            topk_index.contiguous(), grad_z, grad_ref, rows, abs(float(reg_scale)), NB=bins,
            BLOCK_BINS=_block_bins(bins), K=lqe_topk, ACC=_accumulation_dtype(z.dtype),
        )
    return grad_z, grad_ref


# --------------------------------------------------------------------------------------------
# The torch.library ops (``dfine::fdr_decode_triton`` and its backward) and their autograd.


def _fake_outputs(pred_corners, lqe_topk):
    rows = pred_corners.shape[0]
    return (
        pred_corners.new_empty((rows, 4)),
        pred_corners.new_empty((rows, 4, lqe_topk + 1)),
        pred_corners.new_empty((rows, 4, lqe_topk), dtype=torch.uint8),
    )


@torch.library.custom_op("dfine::fdr_decode_triton", mutates_args=())
def fdr_decode_triton(pred_corners: torch.Tensor, project: torch.Tensor, ref_boxes: torch.Tensor,
                      reg_scale: float, lqe_topk: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return fdr_decode_forward_triton(pred_corners, project, ref_boxes, reg_scale, lqe_topk)


@fdr_decode_triton.register_fake
def _(pred_corners, project, ref_boxes, reg_scale, lqe_topk):
    return _fake_outputs(pred_corners, lqe_topk)


@torch.library.custom_op("dfine::fdr_decode_triton_backward", mutates_args=())
def fdr_decode_triton_backward(grad_boxes: torch.Tensor, grad_stats: torch.Tensor, pred_corners: torch.Tensor,
                               project: torch.Tensor, ref_boxes: torch.Tensor, topk_index: torch.Tensor,
                               reg_scale: float, lqe_topk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return fdr_decode_backward_triton(
        grad_boxes, grad_stats, pred_corners, project, ref_boxes, topk_index, reg_scale, lqe_topk
    )


@fdr_decode_triton_backward.register_fake
def _(grad_boxes, grad_stats, pred_corners, project, ref_boxes, topk_index, reg_scale, lqe_topk):
    return torch.empty_like(pred_corners), torch.empty_like(ref_boxes)


def _setup_context(ctx, inputs, output):
    pred_corners, project, ref_boxes, reg_scale, lqe_topk = inputs
    # Inputs and the top-k bins (4 * k bytes per box) only: backward recomputes the softmax.
    ctx.save_for_backward(pred_corners, project, ref_boxes, output[2])
    ctx.mark_non_differentiable(output[2])
    ctx.reg_scale = reg_scale
    ctx.lqe_topk = lqe_topk


def _backward(ctx, grad_boxes, grad_stats, grad_index):
    pred_corners, project, ref_boxes, topk_index = ctx.saved_tensors
    if grad_boxes is None:
        grad_boxes = torch.zeros_like(ref_boxes)
    if grad_stats is None:
        grad_stats = pred_corners.new_zeros((pred_corners.shape[0], 4, ctx.lqe_topk + 1))
    grad_corners, grad_ref = torch.ops.dfine.fdr_decode_triton_backward(
        grad_boxes, grad_stats, pred_corners, project, ref_boxes, topk_index, ctx.reg_scale, ctx.lqe_topk
    )
    return grad_corners, None, grad_ref, None, None


fdr_decode_triton.register_autograd(_backward, setup_context=_setup_context)


def compile_kernels_for_cuda(dtypes=(torch.float32, torch.bfloat16), capability: int = 80, tuned_configs: bool = True,
                             bins: int = 33, lqe_topk: int = 4):
    """Both kernels lowered to PTX and cubin for ``sm_<capability>`` without a GPU (``TRITON_INTERPRET``
    unset), for D-FINE's K+1 = 33 bins and top-4 statistics, with every autotuning candidate (or only
    the default tile). Returns ``{(dtype, kernel name + config): PTX bytes}``."""
    return compile_row_kernels_for_cuda(
        (_fdr_decode_forward_kernel, _fdr_decode_backward_kernel),
        {"NB": bins, "BLOCK_BINS": _block_bins(bins), "K": lqe_topk}, {"index_ptr": "*u8", "R": "i32", "rs": "acc"},
        dtypes, capability, tuned_configs)
