// C++ CPU kernels of the FDR decode. float32 in the AVX2 copy: the 8 edge rows of 2 boxes per group
// (lanes.h), run through fdr_math.h's templates on vectors; float64, and float32 in the baseline
// copy: box by box through the same templates on scalars (as the CUDA kernels). float16/bfloat16:
// box by box through the CUDA kernels' row bodies (cuda/fdr_rows.h: float32 arithmetic, one
// rounding per output), so the tests run the GPU code. Only loading, layout and looping here.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "fdr/cpu/lanes.h"
#include "fdr/cuda/fdr_rows.h"
#include "fdr/fdr.h"
#include "fdr/fdr_math.h"

namespace dfine {
namespace fdr {
namespace {

constexpr int kBoxesPerGroup = kLanes / 4;  // 4 edge rows per box
constexpr int kDfineTopk = 4;               // lqe_topk of every D-FINE config: a compile-time loop

template <typename T>
struct DecodeArgs {
  const T *z, *W, *ref;
  T rs;
  int n, k;
  // forward
  T *boxes, *stats;
  uint8_t* topk_index;
  // backward
  const uint8_t* saved_index;
  const T *grad_boxes, *grad_stats;
  T *grad_z, *grad_ref;
};

// Boxes [box0, box0 + boxes), boxes <= kBoxesPerGroup (kN, kK: bins and top-k if known at compile time).
template <int kN, int kK>
DFINE_FORCE_INLINE void decode_forward_group(const DecodeArgs<float>& a, int64_t box0, int boxes) {
  using V = VecF;
  const int n = kN > 0 ? kN : a.n, k = kK > 0 ? kK : a.k;
  const int edges = 4 * boxes;
  const int64_t edge0 = 4 * box0;
  V p[kMaxBins];
  simd::load_transposed<V>(a.z + edge0 * n, n, edges, p);
  const V d = edge_softmax_expectation(p, a.W, n, p);
  V top_p[kMaxTopk], top_bin[kMaxTopk];
  edge_topk(p, n, k, top_p, top_bin);
  const V mean = topk_mean(top_p, k);
  for (int e = 0; e < edges; ++e) {  // rows of stats [k + 1] and topk_index [k]
    float* stats = a.stats + (edge0 + e) * (k + 1);
    uint8_t* index = a.topk_index + (edge0 + e) * k;
    for (int i = 0; i < k; ++i) {
      stats[i] = top_p[i][e];
      index[i] = static_cast<uint8_t>(top_bin[i][e]);
    }
    stats[k] = mean[e];
  }
  alignas(32) float dist[kLanes];
  simd::store(dist, d);
  for (int b = 0; b < boxes; ++b) {
    distance_to_box(a.ref + (box0 + b) * 4, dist + 4 * b, a.rs, a.boxes + (box0 + b) * 4);
  }
}

template <int kN, int kK>
DFINE_FORCE_INLINE void decode_backward_group(const DecodeArgs<float>& a, int64_t box0, int boxes) {
  using V = VecF;
  const int n = kN > 0 ? kN : a.n, k = kK > 0 ? kK : a.k;
  const int edges = 4 * boxes;
  const int64_t edge0 = 4 * box0;
  V p[kMaxBins];
  simd::load_transposed<V>(a.z + edge0 * n, n, edges, p);
  const V d = edge_softmax_expectation(p, a.W, n, p);
  alignas(32) float dist[kLanes], grad_d[kLanes] = {};
  simd::store(dist, d);
  for (int b = 0; b < boxes; ++b) {
    const int64_t box = box0 + b;
    distance_to_box_backward(a.ref + box * 4, dist + 4 * b, a.rs, a.grad_boxes + box * 4, grad_d + 4 * b,
                             a.grad_ref + box * 4);
  }
  V grad_stats[kMaxTopk + 1], top_bin[kMaxTopk];
  for (int i = 0; i <= k; ++i) grad_stats[i] = V{};
  for (int i = 0; i < k; ++i) top_bin[i] = V{};
  for (int e = 0; e < edges; ++e) {
    const float* gs = a.grad_stats + (edge0 + e) * (k + 1);
    const uint8_t* index = a.saved_index + (edge0 + e) * k;
    for (int i = 0; i <= k; ++i) grad_stats[i][e] = gs[i];
    for (int i = 0; i < k; ++i) top_bin[i][e] = static_cast<float>(index[i]);
  }
  V gz[kMaxBins];
  edge_backward(p, a.W, n, k, d, simd::load<V>(grad_d), top_bin, grad_stats, gz);
  store_group_rows(gz, n, edges, a.grad_z + edge0 * n);
}

// Groups of kBoxesPerGroup float32 boxes (the AVX2 copy).
template <bool kForward>
void decode_box_groups(const DecodeArgs<float>& a, int64_t rows) {
  for_each_group(rows, kBoxesPerGroup, kGrainRows, DFINE_GROUP_BODY {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t box0 = g * kBoxesPerGroup;
      const int boxes = static_cast<int>(std::min<int64_t>(kBoxesPerGroup, rows - box0));
      if (a.n == kDfineBins && a.k == kDfineTopk) {
        kForward ? decode_forward_group<kDfineBins, kDfineTopk>(a, box0, boxes)
                 : decode_backward_group<kDfineBins, kDfineTopk>(a, box0, boxes);
      } else if (a.n == kDfineBins) {
        kForward ? decode_forward_group<kDfineBins, 0>(a, box0, boxes)
                 : decode_backward_group<kDfineBins, 0>(a, box0, boxes);
      } else {
        kForward ? decode_forward_group<0, 0>(a, box0, boxes) : decode_backward_group<0, 0>(a, box0, boxes);
      }
    }
    if (!kForward) stream_fence();
  });
}

// Single boxes (float64, and float32 in the baseline copy).
template <typename T, bool kForward>
void decode_box_rows(const DecodeArgs<T>& a, int64_t rows) {
  const int n = a.n, k = a.k;
  for_each_group(rows, 1, kGrainRows, DFINE_GROUP_BODY {
    for (int64_t r = g0; r < g1; ++r) {
      if (kForward) {
        fdr_decode_row_forward<T>(a.z + r * 4 * n, a.W, n, a.ref + r * 4, a.rs, k, a.boxes + r * 4,
                                  a.stats + r * 4 * (k + 1), a.topk_index + r * 4 * k);
      } else {
        fdr_decode_row_backward<T>(a.z + r * 4 * n, a.W, n, a.ref + r * 4, a.rs, k, a.saved_index + r * 4 * k,
                                   a.grad_boxes + r * 4, a.grad_stats + r * 4 * (k + 1), a.grad_z + r * 4 * n,
                                   a.grad_ref + r * 4);
      }
    }
  });
}

// float16 / bfloat16 boxes, one at a time through the CUDA kernels' row bodies.
template <bool kForward, typename S>
void decode_boxes_16bit(const DecodeRows<S>& a, int64_t rows) {
  at::parallel_for(0, rows, kGrainRows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if constexpr (kForward) {
        decode_row_forward(a, r);
      } else {
        decode_row_backward(a, r);
      }
    }
  });
}

// The project vector in float32 for 16-bit boxes.
at::Tensor project_in_float(const at::Tensor& W) { return W.to(at::kFloat).contiguous(); }

bool is_16bit(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

template <typename T, bool kForward>
void decode_boxes(const DecodeArgs<T>& a, int64_t rows) {
  if constexpr (std::is_same_v<T, float>) {
    if (use_lanes()) return decode_box_groups<kForward>(a, rows);
  }
  decode_box_rows<T, kForward>(a, rows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fdr_decode_forward_cpu(const at::Tensor& pred_corners,
                                                                      const at::Tensor& project,
                                                                      const at::Tensor& ref_boxes, double reg_scale,
                                                                      int64_t lqe_topk) {
  check_decode_args(pred_corners, project, ref_boxes, lqe_topk, "fdr_decode_forward");
  const at::Tensor z = pred_corners.contiguous(), W = project.contiguous(), ref = ref_boxes.contiguous();
  const int64_t rows = z.size(0);
  const int k = static_cast<int>(lqe_topk);
  at::Tensor boxes = at::empty({rows, 4}, z.options());
  at::Tensor stats = at::empty({rows, 4, k + 1}, z.options());
  at::Tensor topk_index = at::empty({rows, 4, k}, z.options().dtype(at::kByte));
  if (is_16bit(z)) {
    const at::Tensor W_acc = project_in_float(W);
    AT_DISPATCH_REDUCED_FLOATING_TYPES(z.scalar_type(), "fdr_decode_forward", [&] {
      DecodeRows<scalar_t> a{};
      a.z = z.const_data_ptr<scalar_t>();
      a.ref = ref.const_data_ptr<scalar_t>();
      a.W = W_acc.const_data_ptr<float>();
      a.rs = static_cast<float>(std::abs(reg_scale));
      a.n = static_cast<int>(W.size(0));
      a.k = k;
      a.boxes = boxes.mutable_data_ptr<scalar_t>();
      a.stats = stats.mutable_data_ptr<scalar_t>();
      a.topk_index = topk_index.mutable_data_ptr<uint8_t>();
      decode_boxes_16bit<true>(a, rows);
    });
    return {boxes, stats, topk_index};
  }
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fdr_decode_forward", [&] {
    DecodeArgs<scalar_t> a{};
    a.z = z.data_ptr<scalar_t>();
    a.W = W.data_ptr<scalar_t>();
    a.ref = ref.data_ptr<scalar_t>();
    a.rs = std::abs(static_cast<scalar_t>(reg_scale));
    a.n = static_cast<int>(W.size(0));
    a.k = k;
    a.boxes = boxes.data_ptr<scalar_t>();
    a.stats = stats.data_ptr<scalar_t>();
    a.topk_index = topk_index.data_ptr<uint8_t>();
    decode_boxes<scalar_t, true>(a, rows);
  });
  return {boxes, stats, topk_index};
}

std::tuple<at::Tensor, at::Tensor> fdr_decode_backward_cpu(const at::Tensor& grad_boxes, const at::Tensor& grad_stats,
                                                           const at::Tensor& pred_corners, const at::Tensor& project,
                                                           const at::Tensor& ref_boxes, const at::Tensor& topk_index,
                                                           double reg_scale, int64_t lqe_topk) {
  const char* op = "fdr_decode_backward";
  check_decode_args(pred_corners, project, ref_boxes, lqe_topk, op);
  check_decode_grads(grad_boxes, grad_stats, topk_index, pred_corners, ref_boxes, lqe_topk, op);
  const at::Tensor z = pred_corners.contiguous(), W = project.contiguous(), ref = ref_boxes.contiguous();
  const at::Tensor index = topk_index.contiguous();
  const at::Tensor gb = grad_boxes.to(z.scalar_type()).contiguous();
  const at::Tensor gs = grad_stats.to(z.scalar_type()).contiguous();
  at::Tensor grad_z = at::empty_like(z);
  at::Tensor grad_ref = at::empty_like(ref);
  if (is_16bit(z)) {
    const at::Tensor W_acc = project_in_float(W);
    AT_DISPATCH_REDUCED_FLOATING_TYPES(z.scalar_type(), "fdr_decode_backward", [&] {
      DecodeRows<scalar_t> a{};
      a.z = z.const_data_ptr<scalar_t>();
      a.ref = ref.const_data_ptr<scalar_t>();
      a.W = W_acc.const_data_ptr<float>();
      a.rs = static_cast<float>(std::abs(reg_scale));
      a.n = static_cast<int>(W.size(0));
      a.k = static_cast<int>(lqe_topk);
      a.saved_index = index.const_data_ptr<uint8_t>();
      a.grad_boxes = gb.const_data_ptr<scalar_t>();
      a.grad_stats = gs.const_data_ptr<scalar_t>();
      a.grad_z = grad_z.mutable_data_ptr<scalar_t>();
      a.grad_ref = grad_ref.mutable_data_ptr<scalar_t>();
      decode_boxes_16bit<false>(a, z.size(0));
    });
    return {grad_z, grad_ref};
  }
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fdr_decode_backward", [&] {
    DecodeArgs<scalar_t> a{};
    a.z = z.data_ptr<scalar_t>();
    a.W = W.data_ptr<scalar_t>();
    a.ref = ref.data_ptr<scalar_t>();
    a.rs = std::abs(static_cast<scalar_t>(reg_scale));
    a.n = static_cast<int>(W.size(0));
    a.k = static_cast<int>(lqe_topk);
    a.saved_index = index.data_ptr<uint8_t>();
    a.grad_boxes = gb.data_ptr<scalar_t>();
    a.grad_stats = gs.data_ptr<scalar_t>();
    a.grad_z = grad_z.data_ptr<scalar_t>();
    a.grad_ref = grad_ref.data_ptr<scalar_t>();
    decode_boxes<scalar_t, false>(a, z.size(0));
  });
  return {grad_z, grad_ref};
}

}  // namespace
}  // namespace fdr
}  // namespace dfine

TORCH_LIBRARY_IMPL(dfine, CPU, m) {
  m.impl("fdr_decode_forward", &dfine::fdr::fdr_decode_forward_cpu);
  m.impl("fdr_decode_backward", &dfine::fdr::fdr_decode_backward_cpu);
}
