// C++ CPU kernels of the GO-LSD losses (fgl_loss, ddf_loss). float32 rows run 8 at a time through
// fdr_math.h's templates on vectors (lanes.h) in the AVX2 copy; float64 rows, and float32 rows in
// the baseline copy, one at a time through the same templates on scalars (as the CUDA kernels).
// float16/bfloat16 rows: one at a time through the CUDA kernels' row bodies (cuda/fdr_rows.h,
// float32 arithmetic), so the tests run the GPU code. Only loading, layout and looping here: the
// formulas are fdr_math.h's.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>

#include "common/checks.h"
#include "fdr/cpu/lanes.h"
#include "fdr/cuda/fdr_rows.h"
#include "fdr/fdr.h"
#include "fdr/fdr_math.h"

namespace dfine {
namespace fdr {
namespace {

template <typename T>
struct FglArgs {
  const T *z, *target, *wl, *wr, *weight, *upstream;
  T *loss, *grad;  // either may be null
  int n;
};

template <typename T>
struct DdfArgs {
  const T *student, *teacher, *weight, *upstream;
  T temperature;
  T *loss, *grad;  // either may be null
  int n;
};

// Rows [r0, r0 + count), count <= kLanes, of float32 (kN: the bins if known at compile time).
template <int kN, typename T>
DFINE_FORCE_INLINE void fgl_group(const FglArgs<T>& a, int64_t r0, int count) {
  static_assert(std::is_same_v<T, float>, "lane groups are float32");
  using V = VecF;
  const int n = kN > 0 ? kN : a.n;
  V z[kMaxBins], grad[kMaxBins];
  simd::load_transposed<V>(a.z + r0 * n, n, count, z);
  const V target = simd::load_partial<V>(a.target + r0, count, 0.0f);
  const V wl = simd::load_partial<V>(a.wl + r0, count, 0.0f), wr = simd::load_partial<V>(a.wr + r0, count, 0.0f);
  const V w = a.weight ? simd::load_partial<V>(a.weight + r0, count, 0.0f) : splat<V>(1);
  const V g = a.upstream ? simd::load_partial<V>(a.upstream + r0, count, 0.0f) * w : w;
  V da, db;
  const V sum = fgl_row_terms(z, n, target, wl, wr, g, a.grad ? grad : nullptr, da, db);
  if (a.loss) {
    const V loss = fgl_row_loss(log_sum_exp_total(sum), da, db, wl, wr);
    simd::store_partial(a.loss + r0, count, a.weight ? loss * w : loss);
  }
  if (a.grad) store_group_rows(grad, n, count, a.grad + r0 * n);
}

template <int kN, typename T>
DFINE_FORCE_INLINE void ddf_group(const DdfArgs<T>& a, int64_t r0, int count) {
  static_assert(std::is_same_v<T, float>, "lane groups are float32");
  using V = VecF;
  const int n = kN > 0 ? kN : a.n;
  V zs[kMaxBins], zt[kMaxBins], grad[kMaxBins];
  simd::load_transposed<V>(a.student + r0 * n, n, count, zs);
  simd::load_transposed<V>(a.teacher + r0 * n, n, count, zt);
  const V w = a.weight ? simd::load_partial<V>(a.weight + r0, count, 0.0f) : splat<V>(1);
  const V g = a.upstream ? simd::load_partial<V>(a.upstream + r0, count, 0.0f) * w : w;
  V sum_a, sum_b, kl, sum_p;
  ddf_row_terms(zs, zt, n, a.temperature, g, a.grad ? grad : nullptr, sum_a, sum_b, kl, sum_p);
  if (a.loss) {
    const V loss = ddf_row_loss(log_sum_exp_total(sum_a), log_sum_exp_total(sum_b), kl, sum_p, a.temperature);
    simd::store_partial(a.loss + r0, count, a.weight ? w * loss : loss);
  }
  if (a.grad) store_group_rows(grad, n, count, a.grad + r0 * n);
}

template <typename T>
DFINE_FORCE_INLINE void fgl_one_row(const FglArgs<T>& a, int64_t r) {
  const int n = a.n;
  const T w = a.weight ? a.weight[r] : T(1);
  const T g = a.upstream ? a.upstream[r] * w : w;
  const T loss = fgl_row<T>(a.z + r * n, n, a.target[r], a.wl[r], a.wr[r], g, a.grad ? a.grad + r * n : nullptr);
  if (a.loss) a.loss[r] = a.weight ? loss * w : loss;
}

template <typename T>
DFINE_FORCE_INLINE void ddf_one_row(const DdfArgs<T>& a, int64_t r) {
  const int n = a.n;
  const T w = a.weight ? a.weight[r] : T(1);
  const T g = a.upstream ? a.upstream[r] * w : w;
  const T loss =
      ddf_row<T>(a.student + r * n, a.teacher + r * n, n, a.temperature, g, a.grad ? a.grad + r * n : nullptr);
  if (a.loss) a.loss[r] = a.weight ? w * loss : loss;
}

// Every row of a loss: groups of kLanes float32 rows, or single float64 rows.
// (group takes std::true_type, so that its float32-only body is a discarded branch for float64)
template <typename T, typename Group, typename Row>
void for_each_loss_row(int64_t rows, const Group& group, const Row& row) {
  if constexpr (std::is_same_v<T, float>) {
    if (use_lanes()) {
      for_each_group(rows, kLanes, kGrainRows * 4, DFINE_GROUP_BODY {
        for (int64_t g = g0; g < g1; ++g) {
          const int64_t r0 = g * kLanes;
          group(r0, static_cast<int>(std::min<int64_t>(kLanes, rows - r0)), std::true_type{});
        }
        stream_fence();
      });
      return;
    }
  }
  for_each_group(rows, 1, kGrainRows, DFINE_GROUP_BODY {
    for (int64_t r = g0; r < g1; ++r) row(r);
  });
}

// float16 / bfloat16 rows, one at a time through the CUDA kernels' row bodies.
template <typename Body>
void for_each_16bit_row(int64_t rows, const Body& body) {
  at::parallel_for(0, rows, kGrainRows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) body(r);
  });
}

bool is_16bit(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// loss[r] = weight[r] * loss_r (if want_loss); grad (if defined) = upstream[r] * weight[r] * d(loss_r)/dz.
at::Tensor fgl_rows_cpu(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& wl, const at::Tensor& wr,
                        const at::Tensor& weight, const at::Tensor& upstream, bool want_loss, at::Tensor grad) {
  const at::Tensor z = pred.contiguous(), t = target.contiguous(), l = wl.contiguous(), rgt = wr.contiguous();
  const int64_t rows = z.size(0);
  const int n = static_cast<int>(z.size(1));
  at::Tensor out = want_loss ? at::empty({rows}, z.options()) : at::Tensor();
  if (is_16bit(z)) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(z.scalar_type(), "fgl_loss_cpu", [&] {
      const FglRows<scalar_t> a{z.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), l.data_ptr<scalar_t>(),
                                rgt.data_ptr<scalar_t>(), optional_ptr<scalar_t>(weight),
                                optional_ptr<scalar_t>(upstream), want_loss ? out.data_ptr<scalar_t>() : nullptr,
                                grad.defined() ? grad.data_ptr<scalar_t>() : nullptr, n};
      for_each_16bit_row(rows, [&](int64_t r) { fgl_row_at(a, r); });
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fgl_loss_cpu", [&] {
    const FglArgs<scalar_t> a{z.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), l.data_ptr<scalar_t>(),
                              rgt.data_ptr<scalar_t>(), optional_ptr<scalar_t>(weight),
                              optional_ptr<scalar_t>(upstream), want_loss ? out.data_ptr<scalar_t>() : nullptr,
                              grad.defined() ? grad.data_ptr<scalar_t>() : nullptr, n};
    for_each_loss_row<scalar_t>(
        rows,
        [&](int64_t r0, int count, auto is_float) __attribute__((always_inline)) {
          if constexpr (decltype(is_float)::value) {
            n == kDfineBins ? fgl_group<kDfineBins>(a, r0, count) : fgl_group<0>(a, r0, count);
          }
        },
        [&](int64_t r) __attribute__((always_inline)) { fgl_one_row(a, r); });
  });
  return out;
}

at::Tensor ddf_rows_cpu(const at::Tensor& pred, const at::Tensor& teacher, const at::Tensor& weight,
                        double temperature, const at::Tensor& upstream, bool want_loss, at::Tensor grad) {
  const at::Tensor zs = pred.contiguous(), zt = teacher.contiguous();
  const int64_t rows = zs.size(0);
  const int n = static_cast<int>(zs.size(1));
  at::Tensor out = want_loss ? at::empty({rows}, zs.options()) : at::Tensor();
  if (is_16bit(zs)) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(zs.scalar_type(), "ddf_loss_cpu", [&] {
      const DdfRows<scalar_t> a{zs.data_ptr<scalar_t>(), zt.data_ptr<scalar_t>(), optional_ptr<scalar_t>(weight),
                                optional_ptr<scalar_t>(upstream), static_cast<float>(temperature),
                                want_loss ? out.data_ptr<scalar_t>() : nullptr,
                                grad.defined() ? grad.data_ptr<scalar_t>() : nullptr, n};
      for_each_16bit_row(rows, [&](int64_t r) { ddf_row_at(a, r); });
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(zs.scalar_type(), "ddf_loss_cpu", [&] {
    const DdfArgs<scalar_t> a{zs.data_ptr<scalar_t>(), zt.data_ptr<scalar_t>(), optional_ptr<scalar_t>(weight),
                              optional_ptr<scalar_t>(upstream), static_cast<scalar_t>(temperature),
                              want_loss ? out.data_ptr<scalar_t>() : nullptr,
                              grad.defined() ? grad.data_ptr<scalar_t>() : nullptr, n};
    for_each_loss_row<scalar_t>(
        rows,
        [&](int64_t r0, int count, auto is_float) __attribute__((always_inline)) {
          if constexpr (decltype(is_float)::value) {
            n == kDfineBins ? ddf_group<kDfineBins>(a, r0, count) : ddf_group<0>(a, r0, count);
          }
        },
        [&](int64_t r) __attribute__((always_inline)) { ddf_one_row(a, r); });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> fgl_loss_forward_cpu(const at::Tensor& pred_corners, const at::Tensor& target_bins,
                                                        const at::Tensor& weight_left, const at::Tensor& weight_right,
                                                        const c10::optional<at::Tensor>& weight, bool compute_grad) {
  const char* op = "fgl_loss_forward";
  check_fgl_args(pred_corners, target_bins, weight_left, weight_right, op);
  const at::Tensor w = optional_rows(weight, pred_corners.size(0), pred_corners, op);
  at::Tensor grad = compute_grad ? at::empty(pred_corners.sizes(), pred_corners.options())
                                 : at::empty({0}, pred_corners.options());
  at::Tensor out = fgl_rows_cpu(pred_corners, target_bins, weight_left, weight_right, w, at::Tensor(), true,
                                compute_grad ? grad : at::Tensor());
  return {out, grad};
}

at::Tensor fgl_loss_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& pred_corners,
                                 const at::Tensor& target_bins, const at::Tensor& weight_left,
                                 const at::Tensor& weight_right, const c10::optional<at::Tensor>& weight) {
  const char* op = "fgl_loss_backward";
  check_fgl_args(pred_corners, target_bins, weight_left, weight_right, op);
  check_rows(grad_rows, pred_corners.size(0), pred_corners, op, "grad_rows", "pred_corners");
  const at::Tensor w = optional_rows(weight, pred_corners.size(0), pred_corners, op);
  at::Tensor grad = at::empty(pred_corners.sizes(), pred_corners.options());
  fgl_rows_cpu(pred_corners, target_bins, weight_left, weight_right, w, grad_rows.contiguous(), false, grad);
  return grad;
}

std::tuple<at::Tensor, at::Tensor> ddf_loss_forward_cpu(const at::Tensor& pred_corners,
                                                        const at::Tensor& teacher_corners,
                                                        const c10::optional<at::Tensor>& weight, double temperature,
                                                        bool compute_grad) {
  const char* op = "ddf_loss_forward";
  check_ddf_args(pred_corners, teacher_corners, temperature, op);
  const at::Tensor w = optional_rows(weight, pred_corners.size(0), pred_corners, op);
  at::Tensor grad = compute_grad ? at::empty(pred_corners.sizes(), pred_corners.options())
                                 : at::empty({0}, pred_corners.options());
  at::Tensor out = ddf_rows_cpu(pred_corners, teacher_corners, w, temperature, at::Tensor(), true,
                                compute_grad ? grad : at::Tensor());
  return {out, grad};
}

at::Tensor ddf_loss_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& pred_corners,
                                 const at::Tensor& teacher_corners, const c10::optional<at::Tensor>& weight,
                                 double temperature) {
  const char* op = "ddf_loss_backward";
  check_ddf_args(pred_corners, teacher_corners, temperature, op);
  check_rows(grad_rows, pred_corners.size(0), pred_corners, op, "grad_rows", "pred_corners");
  const at::Tensor w = optional_rows(weight, pred_corners.size(0), pred_corners, op);
  at::Tensor grad = at::empty(pred_corners.sizes(), pred_corners.options());
  ddf_rows_cpu(pred_corners, teacher_corners, w, temperature, grad_rows.contiguous(), false, grad);
  return grad;
}

}  // namespace
}  // namespace fdr
}  // namespace dfine

TORCH_LIBRARY_IMPL(dfine, CPU, m) {
  m.impl("fgl_loss_forward", &dfine::fdr::fgl_loss_forward_cpu);
  m.impl("fgl_loss_backward", &dfine::fdr::fgl_loss_backward_cpu);
  m.impl("ddf_loss_forward", &dfine::fdr::ddf_loss_forward_cpu);
  m.impl("ddf_loss_backward", &dfine::fdr::ddf_loss_backward_cpu);
}
