// Host-side declarations shared by the CPU and CUDA implementations of the FDR decode and GO-LSD
// loss ops (schemas and checks in fdr.cpp, per-element math in fdr_math.h).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace dfine {
namespace fdr {

// Each check also checks that pred_corners is float16/bfloat16/float32/float64 (the kernels' dtypes).
void check_decode_args(const at::Tensor& pred, const at::Tensor& project, const at::Tensor& ref, int64_t topk,
                       const char* op);
void check_decode_grads(const at::Tensor& grad_boxes, const at::Tensor& grad_stats, const at::Tensor& topk_index,
                        const at::Tensor& pred, const at::Tensor& ref, int64_t topk, const char* op);
void check_fgl_args(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& wl, const at::Tensor& wr,
                    const char* op);
void check_ddf_args(const at::Tensor& pred, const at::Tensor& teacher, double temperature, const char* op);

// The optional per-row weight, checked and contiguous, or an undefined tensor.
at::Tensor optional_rows(const c10::optional<at::Tensor>& weight, int64_t rows, const at::Tensor& like, const char* op);

template <typename T>
const T* optional_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace fdr
}  // namespace dfine
