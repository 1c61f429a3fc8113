// CUDA kernels of the FDR decode and the GO-LSD losses: one thread per row (box or edge), in
// float16, bfloat16, float32 and float64 (16-bit rows are computed in float32 and rounded once).
// The row bodies (fdr_rows.h) run fdr_math.h's templates; the CPU kernels run the same bodies for
// 16-bit rows, so the CPU tests cover this arithmetic.
// Schemas and argument checks: ../fdr.cpp.
// c10 headers only: ATen/cuda/CUDAContext.h would pull in cuSPARSE/cuBLAS headers for nothing.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "common/checks.h"
#include "fdr/fdr.h"
#include "fdr/cuda/fdr_rows.h"

namespace dfine {
namespace fdr {
namespace {

constexpr int kThreads = 128;

int blocks_for(int64_t rows) {
  const int64_t blocks = (rows + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535));
}

void check_cuda(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.is_cuda(), op, ": pred_corners must be a CUDA tensor");
}

// One thread per row (box or edge), grid-stride; the row bodies are in fdr_rows.h.
template <typename S>
__global__ void fdr_decode_forward_kernel(DecodeRows<S> a, int64_t rows) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    decode_row_forward(a, r);
  }
}

template <typename S>
__global__ void fdr_decode_backward_kernel(DecodeRows<S> a, int64_t rows) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // saved bins out of range would be read and written out of bounds (the host checks CPU calls)
    for (int i = 0; i < 4 * a.k; ++i) CUDA_KERNEL_ASSERT(a.saved_index[r * 4 * a.k + i] < a.n);
    decode_row_backward(a, r);
  }
}

template <typename S>
__global__ void fgl_rows_kernel(FglRows<S> a, int64_t rows) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    fgl_row_at(a, r);
  }
}

template <typename S>
__global__ void ddf_rows_kernel(DdfRows<S> a, int64_t rows) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    ddf_row_at(a, r);
  }
}

// The project vector W in the accumulation dtype (K+1 values; a no-op for float32/float64).
at::Tensor project_in_acc_dtype(const at::Tensor& W) {
  const at::ScalarType acc = W.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return W.to(acc).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fdr_decode_forward_cuda(const at::Tensor& pred_corners,
                                                                       const at::Tensor& project,
                                                                       const at::Tensor& ref_boxes, double reg_scale,
                                                                       int64_t lqe_topk) {
  check_cuda(pred_corners, "fdr_decode_forward");
  check_decode_args(pred_corners, project, ref_boxes, lqe_topk, "fdr_decode_forward");
  const c10::cuda::CUDAGuard guard(pred_corners.device());
  const at::Tensor z = pred_corners.contiguous(), W = project.contiguous(), ref = ref_boxes.contiguous();
  const int64_t rows = z.size(0);
  const int n = static_cast<int>(W.size(0)), k = static_cast<int>(lqe_topk);
  at::Tensor boxes = at::empty({rows, 4}, z.options());
  at::Tensor stats = at::empty({rows, 4, k + 1}, z.options());
  at::Tensor topk_index = at::empty({rows, 4, k}, z.options().dtype(at::kByte));
  if (rows == 0) return {boxes, stats, topk_index};
  const at::Tensor W_acc = project_in_acc_dtype(W);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "fdr_decode_forward_cuda", [&] {
    using A = acc_type<scalar_t>;
    DecodeRows<scalar_t> a{};
    a.z = z.const_data_ptr<scalar_t>();
    a.ref = ref.const_data_ptr<scalar_t>();
    a.W = W_acc.const_data_ptr<A>();
    a.rs = static_cast<A>(std::abs(reg_scale));
    a.n = n;
    a.k = k;
    a.boxes = boxes.mutable_data_ptr<scalar_t>();
    a.stats = stats.mutable_data_ptr<scalar_t>();
    a.topk_index = topk_index.mutable_data_ptr<uint8_t>();
    fdr_decode_forward_kernel<scalar_t><<<blocks_for(rows), kThreads, 0, stream>>>(a, rows);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {boxes, stats, topk_index};
}

std::tuple<at::Tensor, at::Tensor> fdr_decode_backward_cuda(const at::Tensor& grad_boxes, const at::Tensor& grad_stats,
                                                            const at::Tensor& pred_corners, const at::Tensor& project,
                                                            const at::Tensor& ref_boxes, const at::Tensor& topk_index,
                                                            double reg_scale, int64_t lqe_topk) {
  const char* op = "fdr_decode_backward";
  check_cuda(pred_corners, op);
  check_decode_args(pred_corners, project, ref_boxes, lqe_topk, op);
  check_decode_grads(grad_boxes, grad_stats, topk_index, pred_corners, ref_boxes, lqe_topk, op);
  const int64_t rows = pred_corners.size(0);
  const c10::cuda::CUDAGuard guard(pred_corners.device());
  const at::Tensor z = pred_corners.contiguous(), W = project.contiguous(), ref = ref_boxes.contiguous();
  const at::Tensor gb = grad_boxes.to(z.scalar_type()).contiguous(), gs = grad_stats.to(z.scalar_type()).contiguous();
  const at::Tensor ti = topk_index.contiguous();
  const int n = static_cast<int>(W.size(0)), k = static_cast<int>(lqe_topk);
  at::Tensor grad_z = at::empty_like(z);
  at::Tensor grad_ref = at::empty_like(ref);
  if (rows == 0) return {grad_z, grad_ref};
  const at::Tensor W_acc = project_in_acc_dtype(W);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "fdr_decode_backward_cuda", [&] {
    using A = acc_type<scalar_t>;
    DecodeRows<scalar_t> a{};
    a.z = z.const_data_ptr<scalar_t>();
    a.ref = ref.const_data_ptr<scalar_t>();
    a.W = W_acc.const_data_ptr<A>();
    a.rs = static_cast<A>(std::abs(reg_scale));
    a.n = n;
    a.k = k;
    a.saved_index = ti.const_data_ptr<uint8_t>();
    a.grad_boxes = gb.const_data_ptr<scalar_t>();
    a.grad_stats = gs.const_data_ptr<scalar_t>();
    a.grad_z = grad_z.mutable_data_ptr<scalar_t>();
    a.grad_ref = grad_ref.mutable_data_ptr<scalar_t>();
    fdr_decode_backward_kernel<scalar_t><<<blocks_for(rows), kThreads, 0, stream>>>(a, rows);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_z, grad_ref};
}

at::Tensor fgl_rows_cuda(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& wl, const at::Tensor& wr,
                         const at::Tensor& weight, const at::Tensor& upstream, bool want_loss, at::Tensor grad) {
  const c10::cuda::CUDAGuard guard(pred.device());
  const at::Tensor z = pred.contiguous(), t = target.contiguous(), l = wl.contiguous(), rg = wr.contiguous();
  const int64_t rows = z.size(0);
  at::Tensor out = want_loss ? at::empty({rows}, z.options()) : at::Tensor();
  if (rows == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "fgl_loss_cuda", [&] {
    const FglRows<scalar_t> a{z.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), l.data_ptr<scalar_t>(),
                              rg.data_ptr<scalar_t>(), optional_ptr<scalar_t>(weight),
                              optional_ptr<scalar_t>(upstream), want_loss ? out.data_ptr<scalar_t>() : nullptr,
                              grad.defined() ? grad.data_ptr<scalar_t>() : nullptr, static_cast<int>(z.size(1))};
    fgl_rows_kernel<scalar_t><<<blocks_for(rows), kThreads, 0, stream>>>(a, rows);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> fgl_loss_forward_cuda(const at::Tensor& pred_corners,
                                                         const at::Tensor& target_bins,
                                                         const at::Tensor& weight_left,
                                                         const at::Tensor& weight_right,
                                                         const c10::optional<at::Tensor>& weight, bool compute_grad) {
  const char* op = "fgl_loss_forward";
  check_cuda(pred_corners, op);
  check_fgl_args(pred_corners, target_bins, weight_left, weight_right, op);
  const at::Tensor w = optional_rows(weight, pred_corners.size(0), pred_corners, op);
  at::Tensor grad = compute_grad ? at::empty(pred_corners.sizes(), pred_corners.options())
                                 : at::empty({0}, pred_corners.options());
  at::Tensor out = fgl_rows_cuda(pred_corners, target_bins, weight_left, weight_right, w, at::Tensor(), true,
                                 compute_grad ? grad : at::Tensor());
  return {out, grad};
}

at::Tensor fgl_loss_backward_cuda(const at::Tensor& grad_rows, const at::Tensor& pred_corners,
                                  const at::Tensor& target_bins, const at::Tensor& weight_left,
                                  const at::Tensor& weight_right, const c10::optional<at::Tensor>& weight) {
  const char* op = "fgl_loss_backward";
  check_cuda(pred_corners, op);
  check_fgl_args(pred_corners, target_bins, weight_left, weight_right, op);
  check_rows(grad_rows, pred_corners.size(0), pred_corners, op, "grad_rows", "pred_corners");
  const at::Tensor w = optional_rows(weight, pred_corners.size(0), pred_corners, op);
  at::Tensor grad = at::empty(pred_corners.sizes(), pred_corners.options());
  fgl_rows_cuda(pred_corners, target_bins, weight_left, weight_right, w, grad_rows.contiguous(), false, grad);
  return grad;
}

at::Tensor ddf_rows_cuda(const at::Tensor& pred, const at::Tensor& teacher, const at::Tensor& weight,
                         double temperature, const at::Tensor& upstream, bool want_loss, at::Tensor grad) {
  const c10::cuda::CUDAGuard guard(pred.device());
  const at::Tensor zs = pred.contiguous(), zt = teacher.contiguous();
  const int64_t rows = zs.size(0);
  at::Tensor out = want_loss ? at::empty({rows}, zs.options()) : at::Tensor();
  if (rows == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zs.scalar_type(), "ddf_loss_cuda", [&] {
    const DdfRows<scalar_t> a{zs.data_ptr<scalar_t>(), zt.data_ptr<scalar_t>(), optional_ptr<scalar_t>(weight),
                              optional_ptr<scalar_t>(upstream), static_cast<acc_type<scalar_t>>(temperature),
                              want_loss ? out.data_ptr<scalar_t>() : nullptr,
                              grad.defined() ? grad.data_ptr<scalar_t>() : nullptr, static_cast<int>(zs.size(1))};
    ddf_rows_kernel<scalar_t><<<blocks_for(rows), kThreads, 0, stream>>>(a, rows);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> ddf_loss_forward_cuda(const at::Tensor& pred_corners,
                                                         const at::Tensor& teacher_corners,
                                                         const c10::optional<at::Tensor>& weight, double temperature,
                                                         bool compute_grad) {
  const char* op = "ddf_loss_forward";
  check_cuda(pred_corners, op);
  check_ddf_args(pred_corners, teacher_corners, temperature, op);
  const at::Tensor w = optional_rows(weight, pred_corners.size(0), pred_corners, op);
  at::Tensor grad = compute_grad ? at::empty(pred_corners.sizes(), pred_corners.options())
                                 : at::empty({0}, pred_corners.options());
  at::Tensor out = ddf_rows_cuda(pred_corners, teacher_corners, w, temperature, at::Tensor(), true,
                                 compute_grad ? grad : at::Tensor());
  return {out, grad};
}

at::Tensor ddf_loss_backward_cuda(const at::Tensor& grad_rows, const at::Tensor& pred_corners,
                                  const at::Tensor& teacher_corners, const c10::optional<at::Tensor>& weight,
                                  double temperature) {
  const char* op = "ddf_loss_backward";
  check_cuda(pred_corners, op);
  check_ddf_args(pred_corners, teacher_corners, temperature, op);
  check_rows(grad_rows, pred_corners.size(0), pred_corners, op, "grad_rows", "pred_corners");
  const at::Tensor w = optional_rows(weight, pred_corners.size(0), pred_corners, op);
  at::Tensor grad = at::empty(pred_corners.sizes(), pred_corners.options());
  ddf_rows_cuda(pred_corners, teacher_corners, w, temperature, grad_rows.contiguous(), false, grad);
  return grad;
}

}  // namespace
}  // namespace fdr
}  // namespace dfine

TORCH_LIBRARY_IMPL(dfine, CUDA, m) {
  m.impl("fdr_decode_forward", &dfine::fdr::fdr_decode_forward_cuda);
  m.impl("fdr_decode_backward", &dfine::fdr::fdr_decode_backward_cuda);
  m.impl("fgl_loss_forward", &dfine::fdr::fgl_loss_forward_cuda);
  m.impl("fgl_loss_backward", &dfine::fdr::fgl_loss_backward_cuda);
  m.impl("ddf_loss_forward", &dfine::fdr::ddf_loss_forward_cuda);
  m.impl("ddf_loss_backward", &dfine::fdr::ddf_loss_backward_cuda);
}
