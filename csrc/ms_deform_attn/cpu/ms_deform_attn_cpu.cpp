// CPU kernels of multi-scale deformable attention (float32 and float64; float16/bfloat16 tensors are
// converted to float32, computed, and the results rounded back); schemas and checks in
// ../ms_deform_attn.cpp.
//
// Forward: tasks own (b, m, range of q) and write out[b, q, m*D:(m+1)*D] for their q only.
// Backward: tasks own (b, m) pairs, hence grad_value[b, :, m, :] and the grad_loc / grad_attn slots
// of (b, *, m, *) exclusively: no atomics, and a fixed summation order, so the result is bit-identical
// from run to run and for any number of threads. Nothing but the inputs is saved for backward.
// Both run level by level inside a task and plan the points of a few queries ahead of time, with
// prefetches (the gathers from value are the bottleneck). The backward accumulates one level's
// gradient at a time in a contiguous buffer and streams it into grad_value once.
// The inner loops run over D in 32-byte SIMD vectors (common/simd.h; D need not be a multiple of
// the width), in a baseline and an AVX2 copy chosen at run time (common/cpu_features.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/cpu_features.h"
#include "common/simd.h"
#include "common/stream_copy.h"
#include "ms_deform_attn/ms_deform_attn.h"
#include "ms_deform_attn/ms_deform_attn_math.h"

namespace dfine {
namespace msda {

namespace {

// The task loops are compiled twice, for the baseline and for AVX2 (common/cpu_features.h), from
// the same source with always-inlined helpers. Neither copy uses FMA (DFINE_TARGET_AVX2), and both
// add the same 8 (float) or 4 (double) lanes in the same order, so they round identically.
// ~1.7x faster on D-FINE shapes.

// float16/bfloat16 calls run the float32 kernel on float32 copies (the arithmetic is float32 on
// every device; the copies cost far less than the gathers).
bool is_16bit(const at::Tensor& value) {
  return value.scalar_type() == at::kHalf || value.scalar_type() == at::kBFloat16;
}

at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat); }

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                                      at::IntArrayRef num_points_list);
std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, at::IntArrayRef num_points_list);

// Start offset of every level inside S, and (H, W) as ints.
struct LevelLayout {
  std::vector<int> height, width;
  std::vector<int64_t> start, points, first_point;
};

LevelLayout level_layout(const at::Tensor& spatial_shapes, at::IntArrayRef num_points_list) {
  const at::Tensor shapes = spatial_shapes.contiguous();
  const int64_t* hw = shapes.data_ptr<int64_t>();
  LevelLayout layout;
  int64_t start = 0;
  for (int64_t l = 0; l < shapes.size(0); ++l) {
    layout.height.push_back(static_cast<int>(hw[2 * l]));
    layout.width.push_back(static_cast<int>(hw[2 * l + 1]));
    layout.start.push_back(start);
    layout.first_point.push_back(layout.first_point.empty() ? 0 : layout.first_point.back() + layout.points.back());
    layout.points.push_back(num_points_list[l]);
    start += hw[2 * l] * hw[2 * l + 1];
  }
  return layout;
}

// 32-byte SIMD vectors (common/simd.h): one AVX2 register in the AVX2 copy, two SSE registers in
// the baseline one. (at::vec::Vectorized measured 1.5x slower in the AVX2 copy.)
template <typename scalar_t>
using Simd = simd::Vec<scalar_t, 32 / sizeof(scalar_t)>;

template <typename scalar_t>
constexpr int64_t simd_width() {
  return static_cast<int64_t>(32 / sizeof(scalar_t));
}

template <typename scalar_t>
DFINE_ALWAYS_INLINE inline Simd<scalar_t> simd_load(const scalar_t* p) {
  return simd::load<Simd<scalar_t>>(p);
}

template <typename scalar_t>
DFINE_ALWAYS_INLINE inline void simd_store(scalar_t* p, const Simd<scalar_t>& v) {
  simd::store(p, v);
}

template <typename scalar_t>
DFINE_ALWAYS_INLINE inline scalar_t simd_sum(const Simd<scalar_t>& v) {
  return simd::sum_lanes(v);
}

// out[0:D] += sum_k w[k] * rows[k][0:D]
template <typename scalar_t>
DFINE_ALWAYS_INLINE inline void accumulate_four_rows(scalar_t* out, const scalar_t* const rows[4], const scalar_t w[4],
                                                     int64_t D) {
  constexpr int64_t kWidth = simd_width<scalar_t>();
  const scalar_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  int64_t d = 0;
  for (; d + kWidth <= D; d += kWidth) {
    Simd<scalar_t> acc = simd_load(out + d);
    acc += w0 * simd_load(rows[0] + d);
    acc += w1 * simd_load(rows[1] + d);
    acc += w2 * simd_load(rows[2] + d);
    acc += w3 * simd_load(rows[3] + d);
    simd_store(out + d, acc);
  }
  for (; d < D; ++d) {
    scalar_t acc = out[d];
    acc += w0 * rows[0][d];
    acc += w1 * rows[1][d];
    acc += w2 * rows[2][d];
    acc += w3 * rows[3][d];
    out[d] = acc;
  }
}

// For every corner k: dots[k] = <go, rows[k]> and grad_rows[k][0:D] += w[k] * go[0:D].
// Invalid corners point at a zero row and their own scratch row, so the loop has no branches and
// no two written rows alias. Dot products keep one partial sum per SIMD lane, added up in a fixed
// order, so results are reproducible.
template <typename scalar_t>
DFINE_ALWAYS_INLINE inline void backward_four_rows(const scalar_t* go, const scalar_t* const rows[4],
                                                   scalar_t* const grad_rows[4], const scalar_t w[4], int64_t D,
                                                   scalar_t dots[4]) {
  constexpr int64_t kWidth = simd_width<scalar_t>();
  const scalar_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  // Local restrict copies: the stores into grad rows cannot change the pointers or the value rows,
  // so the compiler keeps everything in registers instead of reloading after every store.
  const scalar_t* __restrict__ r0 = rows[0];
  const scalar_t* __restrict__ r1 = rows[1];
  const scalar_t* __restrict__ r2 = rows[2];
  const scalar_t* __restrict__ r3 = rows[3];
  scalar_t* __restrict__ g0 = grad_rows[0];
  scalar_t* __restrict__ g1 = grad_rows[1];
  scalar_t* __restrict__ g2 = grad_rows[2];
  scalar_t* __restrict__ g3 = grad_rows[3];
  Simd<scalar_t> s0 = {}, s1 = {}, s2 = {}, s3 = {};
  int64_t d = 0;
  for (; d + kWidth <= D; d += kWidth) {
    const Simd<scalar_t> g = simd_load(go + d);
    s0 += g * simd_load(r0 + d);
    s1 += g * simd_load(r1 + d);
    s2 += g * simd_load(r2 + d);
    s3 += g * simd_load(r3 + d);
    simd_store(g0 + d, simd_load(g0 + d) + w0 * g);
    simd_store(g1 + d, simd_load(g1 + d) + w1 * g);
    simd_store(g2 + d, simd_load(g2 + d) + w2 * g);
    simd_store(g3 + d, simd_load(g3 + d) + w3 * g);
  }
  scalar_t t0 = simd_sum<scalar_t>(s0), t1 = simd_sum<scalar_t>(s1), t2 = simd_sum<scalar_t>(s2), t3 = simd_sum<scalar_t>(s3);
  for (; d < D; ++d) {  // tail: D not a multiple of the SIMD width
    const scalar_t g = go[d];
    t0 += g * r0[d];
    t1 += g * r1[d];
    t2 += g * r2[d];
    t3 += g * r3[d];
    g0[d] += w0 * g;
    g1[d] += w1 * g;
    g2[d] += w2 * g;
    g3[d] += w3 * g;
  }
  dots[0] = t0;
  dots[1] = t1;
  dots[2] = t2;
  dots[3] = t3;
}

// Pointers and sizes of one forward call.
template <typename scalar_t>
struct ForwardArgs {
  const scalar_t* value;
  const scalar_t* loc;
  const scalar_t* attn;
  scalar_t* out;
  const LevelLayout* layout;
  Dims dims;
  int64_t q_chunk, chunks_per_bm;
};

// The rows and weights of one sampling point, computed kPlanAhead queries ahead of their use so that
// the prefetches issued for the rows overlap with the work on the queries before (the gathers are
// the bottleneck: each point touches 4 rows scattered over value[b, :, m, :]).
constexpr int64_t kPlanAhead = 4;
template <typename scalar_t>
struct PointPlan {
  const scalar_t* rows[4];
  scalar_t weight[4];
  bool any_valid;
};

DFINE_ALWAYS_INLINE inline void prefetch_row(const void* row, int64_t bytes) {
#if defined(__GNUC__)
  // Every line of [row, row + bytes), wherever the row starts inside a line. Into L2, not L1
  // (locality hint 1, prefetcht2): the rows are planned a few queries ahead, far more lines than L1
  // can track misses for, and on this CPU (Zen 4) the L2 hint ran ~15% faster when value is cold.
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(static_cast<const char*>(row) + off, 0, 1);
  if (bytes > 0 && bytes % 64 != 0) __builtin_prefetch(static_cast<const char*>(row) + bytes - 1, 0, 1);
#else
  (void)row;
  (void)bytes;
#endif
}

// Same, for rows about to be written (read-modify-write of grad_value).
DFINE_ALWAYS_INLINE inline void prefetch_row_for_write(void* row, int64_t bytes) {
#if defined(__GNUC__)
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(static_cast<char*>(row) + off, 1);
  if (bytes > 0 && bytes % 64 != 0) __builtin_prefetch(static_cast<char*>(row) + bytes - 1, 1);
#else
  (void)row;
  (void)bytes;
#endif
}

// The sampling locations and attention weights on level l of the query row kLocAhead queries after
// the one being planned: they are M * P elements apart from query to query, and missed in the
// cache when first read at planning time.
constexpr int64_t kLocAhead = 4;
template <typename Args>
DFINE_ALWAYS_INLINE inline void prefetch_query_rows(const Args& args, int64_t row, int64_t l) {
  const int64_t P = args.dims.P;
  const int64_t first = args.layout->first_point[l], n = args.layout->points[l];
  const int64_t elem = static_cast<int64_t>(sizeof(*args.loc));
  prefetch_row(args.loc + (row * P + first) * 2, 2 * n * elem);
  prefetch_row(args.attn + row * P + first, n * elem);
}

// Plans the points on level l of query row (b, q, m): corners, attention-scaled weights, prefetches.
template <typename scalar_t>
DFINE_ALWAYS_INLINE inline void plan_forward_points(const ForwardArgs<scalar_t>& args, int64_t row, int64_t l,
                                                    const scalar_t* value_bm, const scalar_t* zero_row,
                                                    PointPlan<scalar_t>* plan) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = args.dims.M, D = args.dims.D, P = args.dims.P;
  const LevelLayout& layout = *args.layout;
  const scalar_t* loc_row = args.loc + row * P * 2;
  const scalar_t* attn_row = args.attn + row * P;
  {
    const int H = layout.height[l], W = layout.width[l];
    const scalar_t* value_level = value_bm + layout.start[l] * M * D;
    for (int64_t j = 0; j < layout.points[l]; ++j) {
      const int64_t p = layout.first_point[l] + j;
      BilinearCorners<acc_t> c;
      const bool any_valid =
          bilinear_corners<acc_t>(static_cast<acc_t>(loc_row[2 * p]), static_cast<acc_t>(loc_row[2 * p + 1]), H, W, c);
      const acc_t a = static_cast<acc_t>(attn_row[p]);
      PointPlan<scalar_t>& pp = plan[j];
      // A point outside the map is skipped, unless it makes the row NaN: it then reads zero rows
      // with NaN weights (ms_deform_attn_math.h).
      pp.any_valid = any_valid || outside_point_is_nan(c, a);
      for (int k = 0; k < 4; ++k) {
        pp.rows[k] = c.valid[k] ? value_level + static_cast<int64_t>(c.offset[k]) * M * D : zero_row;
        pp.weight[k] = static_cast<scalar_t>(a * c.weight[k]);
        if (c.valid[k]) prefetch_row(pp.rows[k], D * static_cast<int64_t>(sizeof(scalar_t)));
      }
    }
  }
}

// out[0:D] += the n planned points. Blocks of 4 SIMD vectors of out stay in registers across the
// points; every element still adds point by point, corner by corner, in the same order as
// accumulate_four_rows (which handles the last, partial block).
template <typename scalar_t>
DFINE_ALWAYS_INLINE inline void accumulate_points(scalar_t* out, const PointPlan<scalar_t>* points, int64_t n,
                                                  int64_t D) {
  constexpr int64_t kWidth = simd_width<scalar_t>();
  int64_t d0 = 0;
  for (; d0 + 4 * kWidth <= D; d0 += 4 * kWidth) {
    Simd<scalar_t> acc0 = simd_load(out + d0), acc1 = simd_load(out + d0 + kWidth);
    Simd<scalar_t> acc2 = simd_load(out + d0 + 2 * kWidth), acc3 = simd_load(out + d0 + 3 * kWidth);
    for (int64_t j = 0; j < n; ++j) {
      const PointPlan<scalar_t>& pp = points[j];
      if (!pp.any_valid) continue;
      for (int k = 0; k < 4; ++k) {
        const scalar_t w = pp.weight[k];
        const scalar_t* r = pp.rows[k] + d0;
        acc0 += w * simd_load(r);
        acc1 += w * simd_load(r + kWidth);
        acc2 += w * simd_load(r + 2 * kWidth);
        acc3 += w * simd_load(r + 3 * kWidth);
      }
    }
    simd_store(out + d0, acc0);
    simd_store(out + d0 + kWidth, acc1);
    simd_store(out + d0 + 2 * kWidth, acc2);
    simd_store(out + d0 + 3 * kWidth, acc3);
  }
  if (d0 < D) {
    for (int64_t j = 0; j < n; ++j) {
      if (!points[j].any_valid) continue;
      const scalar_t* rows[4] = {points[j].rows[0] + d0, points[j].rows[1] + d0, points[j].rows[2] + d0,
                                 points[j].rows[3] + d0};
      accumulate_four_rows(out + d0, rows, points[j].weight, D - d0);
    }
  }
}

// Tasks are (b, m, range of q), ordered b, m, q: a thread's consecutive tasks share the value slice
// value[b, :, m, :] (S rows of D, ~1 MiB at D-FINE-L shapes), which then stays in cache; ordering
// by (b, q) instead gathers from all M heads at once and is about 2x slower (memory bound).
// Inside a task the loop runs level by level (all queries of the chunk on level 0, then level 1,
// ...), so the gathered rows come from one level's map at a time (level 0 alone fits in L2);
// every out row still receives its points in level order.
template <typename scalar_t>
DFINE_ALWAYS_INLINE inline void forward_tasks(const ForwardArgs<scalar_t>& args, int64_t begin, int64_t end) {
  const int64_t S = args.dims.S, M = args.dims.M, D = args.dims.D, Q = args.dims.Q, P = args.dims.P;
  const std::vector<scalar_t> zero_row(D, scalar_t(0));
  std::vector<PointPlan<scalar_t>> plans((kPlanAhead + 1) * P);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t bm = task / args.chunks_per_bm;
    const int64_t b = bm / M, m = bm % M;
    const int64_t q_begin = (task % args.chunks_per_bm) * args.q_chunk;
    const int64_t q_end = std::min(Q, q_begin + args.q_chunk);
    const scalar_t* value_bm = args.value + (b * S * M + m) * D;
    for (int64_t l = 0; l < args.dims.L; ++l) {
      const int64_t n = args.layout->points[l];
      for (int64_t q = q_begin; q < std::min(q_end, q_begin + kPlanAhead); ++q) {
        plan_forward_points(args, (b * Q + q) * M + m, l, value_bm, zero_row.data(),
                            plans.data() + ((q - q_begin) % (kPlanAhead + 1)) * P);
      }
      for (int64_t q = q_begin; q < q_end; ++q) {
        const int64_t row = (b * Q + q) * M + m;  // index of (b, q, m)
        const PointPlan<scalar_t>* current = plans.data() + ((q - q_begin) % (kPlanAhead + 1)) * P;
        if (q + kPlanAhead < q_end) {
          plan_forward_points(args, row + kPlanAhead * M, l, value_bm, zero_row.data(),
                              plans.data() + ((q + kPlanAhead - q_begin) % (kPlanAhead + 1)) * P);
        }
        if (q + kPlanAhead + kLocAhead < q_end) prefetch_query_rows(args, row + (kPlanAhead + kLocAhead) * M, l);
        accumulate_points(args.out + row * D, current, n, D);
      }
    }
  }
}

template <typename scalar_t>
void forward_tasks_default(const ForwardArgs<scalar_t>& args, int64_t begin, int64_t end) {
  forward_tasks(args, begin, end);
}

#if DFINE_CPU_DISPATCH_AVX2
template <typename scalar_t>
DFINE_TARGET_AVX2 void forward_tasks_avx2(const ForwardArgs<scalar_t>& args, int64_t begin, int64_t end) {
  forward_tasks(args, begin, end);
}
#endif

template <typename scalar_t>
void forward_kernel(const at::Tensor& value, const LevelLayout& layout, const at::Tensor& loc, const at::Tensor& attn,
                    at::Tensor& out, const Dims& dims) {
  ForwardArgs<scalar_t> args;
  args.value = value.const_data_ptr<scalar_t>();
  args.loc = loc.const_data_ptr<scalar_t>();
  args.attn = attn.const_data_ptr<scalar_t>();
  args.out = out.mutable_data_ptr<scalar_t>();
  args.layout = &layout;
  args.dims = dims;
  args.q_chunk = std::max<int64_t>(1, std::min<int64_t>(dims.Q, 16384 / std::max<int64_t>(1, dims.P * dims.D)));
  args.chunks_per_bm = (dims.Q + args.q_chunk - 1) / args.q_chunk;
  const bool avx2 = cpu::has_avx2();
  at::parallel_for(0, dims.B * dims.M * args.chunks_per_bm, 1, [&](int64_t begin, int64_t end) {
#if DFINE_CPU_DISPATCH_AVX2
    if (avx2) return forward_tasks_avx2(args, begin, end);
#endif
    (void)avx2;
    forward_tasks_default(args, begin, end);
  });
}

// Pointers and sizes of one backward call.
template <typename scalar_t>
struct BackwardArgs {
  const scalar_t* grad_out;
  const scalar_t* value;
  const scalar_t* loc;
  const scalar_t* attn;
  scalar_t* grad_value;
  scalar_t* grad_loc;
  scalar_t* grad_attn;
  const LevelLayout* layout;
  Dims dims;
};

template <typename scalar_t>
struct BackwardPointPlan {
  BilinearCorners<at::opmath_type<scalar_t>> corners;
  at::opmath_type<scalar_t> attn;
  const scalar_t* rows[4];
  scalar_t* grad_rows[4];
  scalar_t weight[4];
  bool any_valid;
};

// sum_d go[d] * 0 in SIMD lanes: 0, or NaN when go [D] holds a NaN or an infinity. The dot products
// of a point with no corner inside the map (ms_deform_attn_math.h's zero_row_dot, vectorised).
template <typename scalar_t>
DFINE_ALWAYS_INLINE inline scalar_t zero_row_dot_simd(const scalar_t* go, int64_t D) {
  constexpr int64_t kWidth = simd_width<scalar_t>();
  Simd<scalar_t> lanes = {};
  int64_t d = 0;
  for (; d + kWidth <= D; d += kWidth) lanes += simd_load(go + d) * scalar_t(0);
  scalar_t total = simd_sum<scalar_t>(lanes);
  for (; d < D; ++d) total += go[d] * scalar_t(0);
  return total;
}

// Plans the points on level l of query row (b, q, m) for backward; prefetches value and grad rows.
// The gradient rows of the level live in `grad_level` (H * W rows of D, contiguous).
template <typename scalar_t>
DFINE_ALWAYS_INLINE inline void plan_backward_points(const BackwardArgs<scalar_t>& args, int64_t row, int64_t l,
                                                     const scalar_t* value_level, int64_t value_stride,
                                                     scalar_t* grad_level, const scalar_t* zero_row,
                                                     scalar_t* scratch_rows, BackwardPointPlan<scalar_t>* plan) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = args.dims.D, P = args.dims.P;
  const LevelLayout& layout = *args.layout;
  const scalar_t* loc_row = args.loc + row * P * 2;
  const scalar_t* attn_row = args.attn + row * P;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  {
    const int H = layout.height[l], W = layout.width[l];
    for (int64_t j = 0; j < layout.points[l]; ++j) {
      const int64_t p = layout.first_point[l] + j;
      BackwardPointPlan<scalar_t>& pp = plan[j];
      BilinearCorners<acc_t>& c = pp.corners;
      pp.any_valid =
          bilinear_corners<acc_t>(static_cast<acc_t>(loc_row[2 * p]), static_cast<acc_t>(loc_row[2 * p + 1]), H, W, c);
      pp.attn = static_cast<acc_t>(attn_row[p]);
      for (int k = 0; k < 4; ++k) {
        pp.rows[k] = c.valid[k] ? value_level + static_cast<int64_t>(c.offset[k]) * value_stride : zero_row;
        pp.grad_rows[k] = c.valid[k] ? grad_level + static_cast<int64_t>(c.offset[k]) * D : scratch_rows + k * D;
        pp.weight[k] = static_cast<scalar_t>(pp.attn * c.weight[k]);
        if (c.valid[k]) {
          prefetch_row(pp.rows[k], row_bytes);
          prefetch_row_for_write(pp.grad_rows[k], row_bytes);
        }
      }
    }
  }
}

// dst[r * dst_stride + 0:D] = src[r * D + 0:D] for r < rows. The destination is written once and
// not read again by this kernel: streaming stores (common/stream_copy.h) when rows are 16-byte
// aligned, so no read-for-ownership of the 34 MiB grad_value and no eviction of the value rows
// still being gathered.
template <typename scalar_t>
DFINE_ALWAYS_INLINE inline void copy_rows_out(scalar_t* dst, int64_t dst_stride, const scalar_t* src, int64_t D,
                                              int64_t rows) {
  const size_t row_bytes = static_cast<size_t>(D) * sizeof(scalar_t);
  for (int64_t r = 0; r < rows; ++r) stream_copy(dst + r * dst_stride, src + r * D, row_bytes);
  stream_fence();
}

// Each (b, m) task accumulates the gradient of one level at a time in a contiguous, zeroed buffer of
// H * W rows (at most ~800 KiB at D-FINE shapes, so it stays in L2), then copies it into
// grad_value[b, level rows, m, :] once. grad_value itself is never zeroed nor read: compared with
// scattering straight into its strided rows (1 KiB apart, so a task's rows use only 1/8 of the
// cache sets), this saves a full zeroing pass and a read-modify-write of every touched row.
// Every grad_value row receives its samples in the same order as before (level, q, point), so the
// result is bit-identical for any thread count.
template <typename scalar_t>
DFINE_ALWAYS_INLINE inline void backward_tasks(const BackwardArgs<scalar_t>& args, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t S = args.dims.S, M = args.dims.M, D = args.dims.D, Q = args.dims.Q, P = args.dims.P;
  const LevelLayout& layout = *args.layout;
  const std::vector<scalar_t> zero_row(D, scalar_t(0));
  std::vector<scalar_t> scratch_rows(4 * D, scalar_t(0));  // gradient sinks of invalid corners
  std::vector<BackwardPointPlan<scalar_t>> plans((kPlanAhead + 1) * P);
  // Levels whose rows are gathered several times each on average (the small maps) are first copied
  // into a contiguous buffer: strided 1 KiB apart, a task's rows would use 1/8 of the cache sets.
  auto copy_level = [&](int64_t l) {
    const int64_t level_rows = static_cast<int64_t>(layout.height[l]) * layout.width[l];
    return M > 1 && 4 * layout.points[l] * Q > 2 * level_rows;
  };
  int64_t max_level_rows = 0, max_copied_rows = 0;
  for (int64_t l = 0; l < args.dims.L; ++l) {
    const int64_t level_rows = static_cast<int64_t>(layout.height[l]) * layout.width[l];
    max_level_rows = std::max(max_level_rows, level_rows);
    if (copy_level(l)) max_copied_rows = std::max(max_copied_rows, level_rows);
  }
  // Through torch's allocator, so that memory profiles (and the benchmark's extra-memory column) see them.
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  const at::Tensor grad_level = at::empty({max_level_rows * D}, options);
  const at::Tensor value_copy = at::empty({max_copied_rows * D}, options);
  const size_t row_bytes = static_cast<size_t>(D) * sizeof(scalar_t);
  for (int64_t bm = begin; bm < end; ++bm) {
    const int64_t b = bm / M, m = bm % M;
    const scalar_t* value_bm = args.value + (b * S * M + m) * D;
    scalar_t* grad_value_bm = args.grad_value + (b * S * M + m) * D;
    for (int64_t l = 0; l < args.dims.L; ++l) {
      const int64_t n = layout.points[l];
      const int H = layout.height[l], W = layout.width[l];
      const int64_t level_rows = static_cast<int64_t>(H) * W;
      scalar_t* acc = grad_level.mutable_data_ptr<scalar_t>();
      std::memset(acc, 0, static_cast<size_t>(level_rows) * row_bytes);
      const scalar_t* value_level = value_bm + layout.start[l] * M * D;
      int64_t value_stride = M * D;
      if (copy_level(l)) {
        scalar_t* copy = value_copy.mutable_data_ptr<scalar_t>();
        for (int64_t s = 0; s < level_rows; ++s) std::memcpy(copy + s * D, value_level + s * M * D, row_bytes);
        value_level = copy;
        value_stride = D;
      }
      if (n > 0) {
        for (int64_t q = 0; q < std::min(Q, kPlanAhead); ++q) {
          plan_backward_points(args, (b * Q + q) * M + m, l, value_level, value_stride, acc, zero_row.data(),
                               scratch_rows.data(), plans.data() + (q % (kPlanAhead + 1)) * P);
        }
      }
      for (int64_t q = 0; q < Q && n > 0; ++q) {
        const int64_t row = (b * Q + q) * M + m;  // index of (b, q, m)
        const BackwardPointPlan<scalar_t>* current = plans.data() + (q % (kPlanAhead + 1)) * P;
        if (q + kPlanAhead < Q) {
          plan_backward_points(args, row + kPlanAhead * M, l, value_level, value_stride, acc, zero_row.data(),
                               scratch_rows.data(), plans.data() + ((q + kPlanAhead) % (kPlanAhead + 1)) * P);
        }
        if (q + kPlanAhead + kLocAhead < Q) prefetch_query_rows(args, row + (kPlanAhead + kLocAhead) * M, l);
        const scalar_t* go = args.grad_out + row * D;
        scalar_t* grad_loc_row = args.grad_loc + row * P * 2 + 2 * layout.first_point[l];
        scalar_t* grad_attn_row = args.grad_attn + row * P + layout.first_point[l];
        bool have_zero_dot = false;
        acc_t zero_dot = acc_t(0);  // <go, zero row>: computed for the row's first point outside the map
        for (int64_t p = 0; p < n; ++p) {
          const BackwardPointPlan<scalar_t>& pp = current[p];
          if (!pp.any_valid) {
            // no value row to read or to update; the gradients are 0 unless a NaN comes in
            if (!have_zero_dot) zero_dot = static_cast<acc_t>(zero_row_dot_simd(go, D));
            have_zero_dot = true;
            const acc_t zero_dots[4] = {zero_dot, zero_dot, zero_dot, zero_dot};
            const PointGrads<acc_t> g = point_grads<acc_t>(pp.corners, H, W, zero_dots, pp.attn);
            grad_attn_row[p] = static_cast<scalar_t>(g.attn);
            grad_loc_row[2 * p] = static_cast<scalar_t>(g.loc_x);
            grad_loc_row[2 * p + 1] = static_cast<scalar_t>(g.loc_y);
            continue;
          }
          scalar_t dots[4];
          backward_four_rows(go, pp.rows, pp.grad_rows, pp.weight, D, dots);
          acc_t dots_acc[4];
          for (int k = 0; k < 4; ++k) dots_acc[k] = pp.corners.valid[k] ? static_cast<acc_t>(dots[k]) : acc_t(0);
          const PointGrads<acc_t> g = point_grads<acc_t>(pp.corners, H, W, dots_acc, pp.attn);
          grad_attn_row[p] = static_cast<scalar_t>(g.attn);
          grad_loc_row[2 * p] = static_cast<scalar_t>(g.loc_x);
          grad_loc_row[2 * p + 1] = static_cast<scalar_t>(g.loc_y);
        }
      }
      // The level's rows of grad_value[b, :, m, :], written once.
      copy_rows_out(grad_value_bm + layout.start[l] * M * D, M * D, acc, D, level_rows);
    }
  }
}

template <typename scalar_t>
void backward_tasks_default(const BackwardArgs<scalar_t>& args, int64_t begin, int64_t end) {
  backward_tasks(args, begin, end);
}

#if DFINE_CPU_DISPATCH_AVX2
template <typename scalar_t>
DFINE_TARGET_AVX2 void backward_tasks_avx2(const BackwardArgs<scalar_t>& args, int64_t begin, int64_t end) {
  backward_tasks(args, begin, end);
}
#endif

template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& value, const LevelLayout& layout,
                     const at::Tensor& loc, const at::Tensor& attn, at::Tensor& grad_value, at::Tensor& grad_loc,
                     at::Tensor& grad_attn, const Dims& dims) {
  BackwardArgs<scalar_t> args;
  args.grad_out = grad_out.const_data_ptr<scalar_t>();
  args.value = value.const_data_ptr<scalar_t>();
  args.loc = loc.const_data_ptr<scalar_t>();
  args.attn = attn.const_data_ptr<scalar_t>();
  args.grad_value = grad_value.mutable_data_ptr<scalar_t>();
  args.grad_loc = grad_loc.mutable_data_ptr<scalar_t>();
  args.grad_attn = grad_attn.mutable_data_ptr<scalar_t>();
  args.layout = &layout;
  args.dims = dims;
  const bool avx2 = cpu::has_avx2();
  // Each (b, m) task does Q * P samples of D; small problems stay on one thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, dims.Q * dims.P * dims.D));
  at::parallel_for(0, dims.B * dims.M, grain, [&](int64_t begin, int64_t end) {
#if DFINE_CPU_DISPATCH_AVX2
    if (avx2) return backward_tasks_avx2(args, begin, end);
#endif
    (void)avx2;
    backward_tasks_default(args, begin, end);
  });
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                                      at::IntArrayRef num_points_list) {
  constexpr const char* op = "dfine::ms_deform_attn_forward";
  const Dims dims =
      check_forward_inputs(op, value, spatial_shapes, sampling_locations, attention_weights, num_points_list, true);
  if (is_16bit(value)) {
    return ms_deform_attn_forward_cpu(as_float(value), spatial_shapes, as_float(sampling_locations),
                                      as_float(attention_weights), num_points_list)
        .to(value.scalar_type());
  }
  at::Tensor out = at::zeros({dims.B, dims.Q, dims.M * dims.D}, value.options());
  if (out.numel() == 0) return out;
  const at::Tensor value_c = value.contiguous();
  const at::Tensor loc_c = sampling_locations.contiguous();
  const at::Tensor attn_c = attention_weights.contiguous();
  const LevelLayout layout = level_layout(spatial_shapes, num_points_list);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    forward_kernel<scalar_t>(value_c, layout, loc_c, attn_c, out, dims);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, at::IntArrayRef num_points_list) {
  constexpr const char* op = "dfine::ms_deform_attn_backward";
  const Dims dims =
      check_forward_inputs(op, value, spatial_shapes, sampling_locations, attention_weights, num_points_list, true);
  check_grad_output(op, grad_output, value, dims);
  if (is_16bit(value)) {
    auto [grad_value, grad_loc, grad_attn] =
        ms_deform_attn_backward_cpu(as_float(grad_output), as_float(value), spatial_shapes,
                                    as_float(sampling_locations), as_float(attention_weights), num_points_list);
    const at::ScalarType dtype = value.scalar_type();
    return {grad_value.to(dtype), grad_loc.to(dtype), grad_attn.to(dtype)};
  }
  if (dims.B * dims.Q * dims.M * dims.P == 0 || dims.D == 0) {
    return {at::zeros(value.sizes(), value.options()), at::zeros(sampling_locations.sizes(), value.options()),
            at::zeros(attention_weights.sizes(), value.options())};
  }
  // Every element of grad_value, grad_loc and grad_attn is written by exactly one task.
  at::Tensor grad_value = at::empty(value.sizes(), value.options());
  at::Tensor grad_loc = at::empty(sampling_locations.sizes(), value.options());
  at::Tensor grad_attn = at::empty(attention_weights.sizes(), value.options());
  const at::Tensor go_c = grad_output.contiguous();
  const at::Tensor value_c = value.contiguous();
  const at::Tensor loc_c = sampling_locations.contiguous();
  const at::Tensor attn_c = attention_weights.contiguous();
  const LevelLayout layout = level_layout(spatial_shapes, num_points_list);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    backward_kernel<scalar_t>(go_c, value_c, layout, loc_c, attn_c, grad_value, grad_loc, grad_attn, dims);
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace
}  // namespace msda
}  // namespace dfine

TORCH_LIBRARY_IMPL(dfine, CPU, m) {
  m.impl("ms_deform_attn_forward", &dfine::msda::ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &dfine::msda::ms_deform_attn_backward_cpu);
}
