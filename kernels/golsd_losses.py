"""Triton kernels of the GO-LSD losses, their launchers and the ``dfine::{fgl,ddf}_loss_triton``
torch.library ops with their autograd (``dfine.ops.fgl_loss`` / ``ddf_loss`` with backend="triton").

One program handles ``BLOCK`` rows as a ``[BLOCK, BLOCK_BINS]`` tile, the K+1 bins padded to a
power of two (33 -> 64; padded bins hold -inf logits). Forward kernels write the weighted loss of
every row; backward kernels recompute the softmax and write the gradient of the student logits.
``BLOCK`` and the warps per program are autotuned on the GPU (``ROW_TILE_CONFIGS``, once per bin count);
the interpreter uses 32 rows.

Dtypes: float16, bfloat16, float32 and float64 tensors (all arguments of one call in one dtype).
Every load is converted to the accumulation dtype ``ACC`` (float32, float64 for float64 inputs),
every store rounds once to the output's dtype.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._triton import ROW_TILE_CONFIGS, ROW_TILE_DEFAULT, autotuned, compile_row_kernels_for_cuda, row_tile_grid, tl, triton


def _block_bins(bins: int) -> int:
    return max(16, triton.next_power_of_2(bins))


def _accumulation_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _load_rows(ptr, rows, row_mask, ACC: tl.constexpr):
    """One value per row [BLOCK] in ACC (0 on padded rows)."""
    return tl.load(ptr + rows, mask=row_mask, other=0.0).to(ACC)


@triton.jit
def _load_logits(ptr, rows, row_mask, bins, NB: tl.constexpr, scale, ACC: tl.constexpr):
    """[BLOCK, BLOCK_BINS] logits in ACC divided by ``scale``; padded bins are -inf, padded rows 0."""
    bin_mask = bins < NB
    x = tl.load(ptr + rows[:, None] * NB + bins[None, :], mask=row_mask[:, None] & bin_mask[None, :], other=0.0)
    x = x.to(ACC) / scale
    return tl.where(bin_mask[None, :], x, float("-inf"))


@triton.jit
def _fgl_left_bin(target, NB: tl.constexpr):
    # target.long() as published, kept in [0, K-1] so the right bin exists (NaN -> 0)
    t = tl.where(target > 0, target, 0.0)
    t = tl.minimum(t, NB - 2)
    return t.to(tl.int32)


@autotuned(ROW_TILE_CONFIGS, key=["NB", "HAS_WEIGHT"], default=ROW_TILE_DEFAULT)
@triton.jit
def _fgl_forward_kernel(z_ptr, t_ptr, wl_ptr, wr_ptr, w_ptr, out_ptr, R, HAS_WEIGHT: tl.constexpr,
                        NB: tl.constexpr, BLOCK_BINS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < R
    bins = tl.arange(0, BLOCK_BINS)
    z = _load_logits(z_ptr, rows, row_mask, bins, NB, 1.0, ACC)
    z_max = tl.max(z, axis=1)
    shifted = z - z_max[:, None]
    log_sum = tl.log(tl.sum(tl.exp(shifted), axis=1))
    target = _load_rows(t_ptr, rows, row_mask, ACC)
    wl = _load_rows(wl_ptr, rows, row_mask, ACC)
    wr = _load_rows(wr_ptr, rows, row_mask, ACC)
    left = _fgl_left_bin(target, NB)
    z_left = tl.sum(tl.where(bins[None, :] == left[:, None], shifted, 0.0), axis=1)
    z_right = tl.sum(tl.where(bins[None, :] == left[:, None] + 1, shifted, 0.0), axis=1)
    loss = (log_sum - z_left) * wl + (log_sum - z_right) * wr
    if HAS_WEIGHT:
        loss = loss * _load_rows(w_ptr, rows, row_mask, ACC)
    tl.store(out_ptr + rows, loss.to(out_ptr.dtype.element_ty), mask=row_mask)


@autotuned(ROW_TILE_CONFIGS, key=["NB", "HAS_WEIGHT"], default=ROW_TILE_DEFAULT)
@triton.jit
def _fgl_backward_kernel(g_ptr, z_ptr, t_ptr, wl_ptr, wr_ptr, w_ptr, gz_ptr, R, HAS_WEIGHT: tl.constexpr,
                         NB: tl.constexpr, BLOCK_BINS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < R
    bins = tl.arange(0, BLOCK_BINS)
    z = _load_logits(z_ptr, rows, row_mask, bins, NB, 1.0, ACC)
    e = tl.exp(z - tl.max(z, axis=1)[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    g = _load_rows(g_ptr, rows, row_mask, ACC)
    if HAS_WEIGHT:
        g = g * _load_rows(w_ptr, rows, row_mask, ACC)
    target = _load_rows(t_ptr, rows, row_mask, ACC)
    wl = _load_rows(wl_ptr, rows, row_mask, ACC)
    wr = _load_rows(wr_ptr, rows, row_mask, ACC)
    left = _fgl_left_bin(target, NB)
    onehot = tl.where(bins[None, :] == left[:, None], wl[:, None], 0.0)
    onehot += tl.where(bins[None, :] == left[:, None] + 1, wr[:, None], 0.0)
    gz = g[:, None] * ((wl + wr)[:, None] * p - onehot)
    tl.store(gz_ptr + rows[:, None] * NB + bins[None, :], gz.to(gz_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (bins[None, :] < NB))


@triton.jit
def _ddf_log_ratio_and_p(zs_ptr, zt_ptr, rows, row_mask, bins, temperature, NB: tl.constexpr, ACC: tl.constexpr):
    """log p - log q (exactly 0 where pred == teacher), p, q for a tile of rows."""
    a = _load_logits(zs_ptr, rows, row_mask, bins, NB, temperature, ACC)
    b = _load_logits(zt_ptr, rows, row_mask, bins, NB, temperature, ACC)
    a_shift = a - tl.max(a, axis=1)[:, None]
    b_shift = b - tl.max(b, axis=1)[:, None]
    ea = tl.exp(a_shift)
    eb = tl.exp(b_shift)
    sum_a = tl.sum(ea, axis=1)
    sum_b = tl.sum(eb, axis=1)
    # padded bins (-inf on both sides) get 0 instead of -inf - -inf
    a_shift = tl.where(bins[None, :] < NB, a_shift, 0.0)
    b_shift = tl.where(bins[None, :] < NB, b_shift, 0.0)
    log_ratio = (b_shift - tl.log(sum_b)[:, None]) - (a_shift - tl.log(sum_a)[:, None])
    p = eb / sum_b[:, None]
    q = ea / sum_a[:, None]
    return log_ratio, p, q


@autotuned(ROW_TILE_CONFIGS, key=["NB", "HAS_WEIGHT"], default=ROW_TILE_DEFAULT)
@triton.jit
def _ddf_forward_kernel(zs_ptr, zt_ptr, w_ptr, out_ptr, R, temperature, HAS_WEIGHT: tl.constexpr,
                        NB: tl.constexpr, BLOCK_BINS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < R
    bins = tl.arange(0, BLOCK_BINS)
    log_ratio, p, q = _ddf_log_ratio_and_p(zs_ptr, zt_ptr, rows, row_mask, bins, temperature, NB, ACC)
    terms = p * tl.where(p > 0, log_ratio, 0.0)  # xlogy: p = 0 contributes 0 (also on padded bins)
    loss = temperature * temperature * tl.sum(terms, axis=1)
    if HAS_WEIGHT:
        loss = _load_rows(w_ptr, rows, row_mask, ACC) * loss
    tl.store(out_ptr + rows, loss.to(out_ptr.dtype.element_ty), mask=row_mask)


@autotuned(ROW_TILE_CONFIGS, key=["NB", "HAS_WEIGHT"], default=ROW_TILE_DEFAULT)
@triton.jit
def _ddf_backward_kernel(g_ptr, zs_ptr, zt_ptr, w_ptr, gz_ptr, R, temperature, HAS_WEIGHT: tl.constexpr,
                         NB: tl.constexpr, BLOCK_BINS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < R
    bins = tl.arange(0, BLOCK_BINS)
    log_ratio, p, q = _ddf_log_ratio_and_p(zs_ptr, zt_ptr, rows, row_mask, bins, temperature, NB, ACC)
    g = _load_rows(g_ptr, rows, row_mask, ACC)
    if HAS_WEIGHT:
        g = g * _load_rows(w_ptr, rows, row_mask, ACC)
    sum_p = tl.sum(p, axis=1)
    gz = (g * temperature)[:, None] * (q * sum_p[:, None] - p)
    tl.store(gz_ptr + rows[:, None] * NB + bins[None, :], gz.to(gz_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (bins[None, :] < NB))


def _launch_args(pred):
    rows, bins = pred.shape
    return rows, bins, row_tile_grid(rows), _block_bins(bins)


def fgl_loss_forward_triton(pred, target, weight_left, weight_right, weight):
    z = pred.contiguous()
    rows, bins, grid, block_bins = _launch_args(z)
    out = z.new_empty((rows,))
    if rows > 0:
        w = weight.contiguous() if weight is not None else z  # dummy pointer when absent
        _fgl_forward_kernel[grid](z, target.contiguous(), weight_left.contiguous(), weight_right.contiguous(), w,
                                  out, rows, HAS_WEIGHT=weight is not None, NB=bins, BLOCK_BINS=block_bins,
                                  ACC=_accumulation_dtype(z.dtype))
    return out


def fgl_loss_backward_triton(grad_rows, pred, target, weight_left, weight_right, weight):
    z = pred.contiguous()
    rows, bins, grid, block_bins = _launch_args(z)
    grad_z = torch.empty_like(z)
    if rows > 0:
        w = weight.contiguous() if weight is not None else z
        _fgl_backward_kernel[grid](grad_rows.contiguous(), z, target.contiguous(), weight_left.contiguous(),
                                   weight_right.contiguous(), w, grad_z, rows, HAS_WEIGHT=weight is not None,
                                   NB=bins, BLOCK_BINS=block_bins, ACC=_accumulation_dtype(z.dtype))
    return grad_z


def ddf_loss_forward_triton(pred, teacher, weight, temperature: float):
    zs, zt = pred.contiguous(), teacher.contiguous()
    rows, bins, grid, block_bins = _launch_args(zs)
    out = zs.new_empty((rows,))
    if rows > 0:
        w = weight.contiguous() if weight is not None else zs
        _ddf_forward_kernel[grid](zs, zt, w, out, rows, float(temperature), HAS_WEIGHT=weight is not None, NB=bins,
                                  BLOCK_BINS=block_bins, ACC=_accumulation_dtype(zs.dtype))
    return out


def ddf_loss_backward_triton(grad_rows, pred, teacher, weight, temperature: float):
    zs, zt = pred.contiguous(), teacher.contiguous()
    rows, bins, grid, block_bins = _launch_args(zs)
    grad_z = torch.empty_like(zs)
    if rows > 0:
        w = weight.contiguous() if weight is not None else zs
        _ddf_backward_kernel[grid](grad_rows.contiguous(), zs, zt, w, grad_z, rows, float(temperature),
                                   HAS_WEIGHT=weight is not None, NB=bins, BLOCK_BINS=block_bins,
                                   ACC=_accumulation_dtype(zs.dtype))
    return grad_z


# --------------------------------------------------------------------------------------------
# The torch.library ops and their autograd. Forward ops return the weighted per-row loss [N] and,
# if asked (compute_grad), the gradient of every row's loss w.r.t. pred_corners; backward scales
# that gradient's rows by the upstream gradient in place (no second [N, K+1] buffer). Without it
# (second backward through the graph, torch.compile) the backward ops recompute it.


def _forward_fake(pred, *args):
    compute_grad = args[-1]
    grad = torch.empty_like(pred) if compute_grad else pred.new_empty((0,))
    return pred.new_empty((pred.shape[0],)), grad


def _grad_fake(grad_rows, pred, *args):
    return torch.empty_like(pred)


def _scale_fused_grad(ctx, grad_rows):
    grad = ctx.fused_grad
    ctx.fused_grad = None  # used once; a second backward recomputes
    return grad.mul_(grad_rows.unsqueeze(1))


def _keep_fused_grad(ctx, output):
    ctx.fused_grad = output[1] if output[1].numel() > 0 else None
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no [N, K+1] zeros for the gradient output's (absent) gradient


@torch.library.custom_op("dfine::fgl_loss_triton", mutates_args=())
def fgl_loss_triton(pred: torch.Tensor, target: torch.Tensor, weight_left: torch.Tensor, weight_right: torch.Tensor,
                    weight: Optional[torch.Tensor], compute_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    rows = fgl_loss_forward_triton(pred, target, weight_left, weight_right, weight)
    if not compute_grad:
        return rows, pred.new_empty((0,))
    return rows, fgl_loss_backward_triton(torch.ones_like(rows), pred, target, weight_left, weight_right, weight)


@torch.library.custom_op("dfine::fgl_loss_triton_backward", mutates_args=())
def fgl_loss_triton_backward(grad_rows: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
                             weight_left: torch.Tensor, weight_right: torch.Tensor,
                             weight: Optional[torch.Tensor]) -> torch.Tensor:
    return fgl_loss_backward_triton(grad_rows, pred, target, weight_left, weight_right, weight)


def _fgl_setup_context(ctx, inputs, output):
    pred, target, wl, wr, weight, compute_grad = inputs
    ctx.save_for_backward(pred, target, wl, wr, weight)
    _keep_fused_grad(ctx, output)
    ctx.weight_needs_grad = weight is not None and ctx.needs_input_grad[4]


def _fgl_backward(ctx, grad_rows, _grad_unused):
    if grad_rows is None:
        return None, None, None, None, None, None
    pred, target, wl, wr, weight = ctx.saved_tensors
    grad_pred = None
    if ctx.needs_input_grad[0]:
        if ctx.fused_grad is not None:
            grad_pred = _scale_fused_grad(ctx, grad_rows)
        else:
            grad_pred = torch.ops.dfine.fgl_loss_triton_backward(grad_rows.contiguous(), pred, target, wl, wr, weight)
    grad_weight = None
    if ctx.weight_needs_grad:
        grad_weight = grad_rows * torch.ops.dfine.fgl_loss_triton(pred, target, wl, wr, None, False)[0]
    return grad_pred, None, None, None, grad_weight, None


fgl_loss_triton.register_fake(_forward_fake)
fgl_loss_triton_backward.register_fake(_grad_fake)
fgl_loss_triton.register_autograd(_fgl_backward, setup_context=_fgl_setup_context)


@torch.library.custom_op("dfine::ddf_loss_triton", mutates_args=())
def ddf_loss_triton(pred: torch.Tensor, teacher: torch.Tensor, weight: Optional[torch.Tensor],
                    temperature: float, compute_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    rows = ddf_loss_forward_triton(pred, teacher, weight, temperature)
    if not compute_grad:
        return rows, pred.new_empty((0,))
    return rows, ddf_loss_backward_triton(torch.ones_like(rows), pred, teacher, weight, temperature)


@torch.library.custom_op("dfine::ddf_loss_triton_backward", mutates_args=())
def ddf_loss_triton_backward(grad_rows: torch.Tensor, pred: torch.Tensor, teacher: torch.Tensor,
                             weight: Optional[torch.Tensor], temperature: float) -> torch.Tensor:
    return ddf_loss_backward_triton(grad_rows, pred, teacher, weight, temperature)


def _ddf_setup_context(ctx, inputs, output):
    pred, teacher, weight, temperature, compute_grad = inputs
    ctx.save_for_backward(pred, teacher, weight)
    ctx.temperature = temperature
    _keep_fused_grad(ctx, output)
    ctx.weight_needs_grad = weight is not None and ctx.needs_input_grad[2]


def _ddf_backward(ctx, grad_rows, _grad_unused):
    if grad_rows is None:
        return None, None, None, None, None
    pred, teacher, weight = ctx.saved_tensors
    grad_pred = None
    if ctx.needs_input_grad[0]:
        if ctx.fused_grad is not None:
            grad_pred = _scale_fused_grad(ctx, grad_rows)
        else:
            grad_pred = torch.ops.dfine.ddf_loss_triton_backward(grad_rows.contiguous(), pred, teacher, weight,
                                                                 ctx.temperature)
    grad_weight = None
    if ctx.weight_needs_grad:
        grad_weight = grad_rows * torch.ops.dfine.ddf_loss_triton(pred, teacher, None, ctx.temperature, False)[0]
    return grad_pred, None, grad_weight, None, None


ddf_loss_triton.register_fake(_forward_fake)
ddf_loss_triton_backward.register_fake(_grad_fake)
ddf_loss_triton.register_autograd(_ddf_backward, setup_context=_ddf_setup_context)


def compile_kernels_for_cuda(dtypes=(torch.float32, torch.bfloat16), capability: int = 80, tuned_configs: bool = True,
                             bins: int = 33, has_weight: bool = True):
    """The FGL and DDF kernels lowered to PTX and cubin for ``sm_<capability>`` without a GPU
    (``TRITON_INTERPRET`` unset), for 33 bins, with every autotuning candidate (or only the default
    tile). Returns ``{(dtype, kernel name + config): PTX bytes}``."""
    return compile_row_kernels_for_cuda(
        (_fgl_forward_kernel, _fgl_backward_kernel, _ddf_forward_kernel, _ddf_backward_kernel),
        {"NB": bins, "BLOCK_BINS": _block_bins(bins), "HAS_WEIGHT": has_weight},
        {"R": "i32", "temperature": "acc"}, dtypes, capability, tuned_configs)
