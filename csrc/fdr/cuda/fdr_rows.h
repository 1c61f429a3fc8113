// The per-row bodies of the CUDA kernels of the FDR decode and the GO-LSD losses, for every storage
// dtype S (float16, bfloat16, float32, float64): a row is loaded from S into the accumulation type
// A = at::opmath_type<S> (float for the 16-bit types), run through fdr_math.h's templates on A, and
// its results are rounded once into S. These functions are __host__ __device__: fdr_cuda.cu runs
// them one thread per row, and the CPU kernels run the very same code for float16/bfloat16 rows
// (csrc/fdr/cpu/), so the CPU tests exercise the arithmetic shipped to GPUs in every dtype.
// Plain g++ compiles this header too (no CUDA includes).
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "fdr/fdr_math.h"

namespace dfine {
namespace fdr {

template <typename S>
using acc_type = at::opmath_type<S>;

// dst[j] = A(src[j]) for j < n, n >= 1 (rows have at least 2 bins; the do-while lets the compiler
// see that dst[0] is written, which the math reads first).
template <typename A, typename S>
DFINE_HD void load_row(const S* src, int n, A* dst) {
  int j = 0;
  do {
    dst[j] = static_cast<A>(src[j]);
  } while (++j < n);
}

// dst[j] = S(src[j]) for j < n (one rounding per element).
template <typename A, typename S>
DFINE_HD void store_row(const A* src, int n, S* dst) {
  for (int j = 0; j < n; ++j) dst[j] = static_cast<S>(src[j]);
}

// Pointers of one fdr_decode call. W (the project vector) is passed in A: the host converts its
// K+1 values once instead of every row doing it.
template <typename S>
struct DecodeRows {
  using A = acc_type<S>;
  const S *z, *ref;
  const A* W;
  A rs;
  int n, k;
  // forward
  S *boxes, *stats;
  uint8_t* topk_index;
  // backward
  const uint8_t* saved_index;
  const S *grad_boxes, *grad_stats;
  S *grad_z, *grad_ref;
};

// Box r of the forward pass: boxes [r, 4], stats [r, 4, k + 1], topk_index [r, 4, k].
template <typename S>
DFINE_HD void decode_row_forward(const DecodeRows<S>& a, int64_t r) {
  using A = acc_type<S>;
  const int n = a.n, k = a.k;
  const S* z = a.z + r * 4 * n;
  if constexpr (std::is_same_v<S, A>) {
    fdr_decode_row_forward<A>(z, a.W, n, a.ref + r * 4, a.rs, k, a.boxes + r * 4, a.stats + r * 4 * (k + 1),
                              a.topk_index + r * 4 * k);
  } else {
    A zr[4 * kMaxBins], ref[4], box[4], stats[4 * (kMaxTopk + 1)];
    load_row(z, 4 * n, zr);
    load_row(a.ref + r * 4, 4, ref);
    fdr_decode_row_forward<A>(zr, a.W, n, ref, a.rs, k, box, stats, a.topk_index + r * 4 * k);
    store_row(box, 4, a.boxes + r * 4);
    store_row(stats, 4 * (k + 1), a.stats + r * 4 * (k + 1));
  }
}

// Box r of the backward pass: grad_z [r, 4 * n], grad_ref [r, 4].
template <typename S>
DFINE_HD void decode_row_backward(const DecodeRows<S>& a, int64_t r) {
  using A = acc_type<S>;
  const int n = a.n, k = a.k;
  const S* z = a.z + r * 4 * n;
  const uint8_t* index = a.saved_index + r * 4 * k;
  if constexpr (std::is_same_v<S, A>) {
    fdr_decode_row_backward<A>(z, a.W, n, a.ref + r * 4, a.rs, k, index, a.grad_boxes + r * 4,
                               a.grad_stats + r * 4 * (k + 1), a.grad_z + r * 4 * n, a.grad_ref + r * 4);
  } else {
    A zr[4 * kMaxBins], ref[4], grad_box[4], grad_stats[4 * (kMaxTopk + 1)], grad_z[4 * kMaxBins], grad_ref[4];
    load_row(z, 4 * n, zr);
    load_row(a.ref + r * 4, 4, ref);
    load_row(a.grad_boxes + r * 4, 4, grad_box);
    load_row(a.grad_stats + r * 4 * (k + 1), 4 * (k + 1), grad_stats);
    fdr_decode_row_backward<A>(zr, a.W, n, ref, a.rs, k, index, grad_box, grad_stats, grad_z, grad_ref);
    store_row(grad_z, 4 * n, a.grad_z + r * 4 * n);
    store_row(grad_ref, 4, a.grad_ref + r * 4);
  }
}

// Pointers of one FGL call: loss[r] = weight[r] * loss_r (if loss), grad[r] = upstream[r] *
// weight[r] * d(loss_r)/dz (if grad); weight and upstream may be null (1).
template <typename S>
struct FglRows {
  const S *z, *target, *wl, *wr, *weight, *upstream;
  S *loss, *grad;
  int n;
};

template <typename S>
DFINE_HD void fgl_row_at(const FglRows<S>& a, int64_t r) {
  using A = acc_type<S>;
  const int n = a.n;
  const A w = a.weight ? static_cast<A>(a.weight[r]) : A(1);
  const A g = a.upstream ? static_cast<A>(a.upstream[r]) * w : w;
  const A target = static_cast<A>(a.target[r]), wl = static_cast<A>(a.wl[r]), wr = static_cast<A>(a.wr[r]);
  A loss;
  if constexpr (std::is_same_v<S, A>) {
    loss = fgl_row<A>(a.z + r * n, n, target, wl, wr, g, a.grad ? a.grad + r * n : nullptr);
  } else {
    A z[kMaxBins], grad[kMaxBins];
    load_row(a.z + r * n, n, z);
    loss = fgl_row<A>(z, n, target, wl, wr, g, a.grad ? grad : nullptr);
    if (a.grad) store_row(grad, n, a.grad + r * n);
  }
  if (a.loss) a.loss[r] = static_cast<S>(a.weight ? loss * w : loss);
}

// Pointers of one DDF call (same conventions as FglRows).
template <typename S>
struct DdfRows {
  using A = acc_type<S>;
  const S *student, *teacher, *weight, *upstream;
  A temperature;
  S *loss, *grad;
  int n;
};

template <typename S>
DFINE_HD void ddf_row_at(const DdfRows<S>& a, int64_t r) {
  using A = acc_type<S>;
  const int n = a.n;
  const A w = a.weight ? static_cast<A>(a.weight[r]) : A(1);
  const A g = a.upstream ? static_cast<A>(a.upstream[r]) * w : w;
  A loss;
  if constexpr (std::is_same_v<S, A>) {
    loss = ddf_row<A>(a.student + r * n, a.teacher + r * n, n, a.temperature, g, a.grad ? a.grad + r * n : nullptr);
  } else {
    A zs[kMaxBins], zt[kMaxBins], grad[kMaxBins];
    load_row(a.student + r * n, n, zs);
    load_row(a.teacher + r * n, n, zt);
    loss = ddf_row<A>(zs, zt, n, a.temperature, g, a.grad ? grad : nullptr);
    if (a.grad) store_row(grad, n, a.grad + r * n);
  }
  if (a.loss) a.loss[r] = static_cast<S>(a.weight ? w * loss : loss);
}

}  // namespace fdr
}  // namespace dfine
