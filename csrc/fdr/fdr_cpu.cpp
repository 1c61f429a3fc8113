// C++ CPU kernels of the FDR decode and the GO-LSD losses; the op schemas of all of them.
// One pass over each row (softmax, expectation, top-k statistics, loss or gradient), rows split
// over threads with at::parallel_for. float32 and float64. The per-row math is in fdr_math.h.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>

// The branch-free exp of fdr_math.h vectorises only when float compares may be if-converted,
// i.e. without -ftrapping-math; no code here relies on floating-point traps.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include "fdr/fdr_math.h"

namespace dfine {
namespace {

using namespace dfine::fdr;

constexpr int64_t kGrainRows = 128;
constexpr int kDfineBins = 33;  // reg_max = 32: loops over a compile-time count of bins unroll fully

#if defined(__x86_64__) || defined(__i386__)
#define DFINE_X86 1
#endif

// The row loops are compiled twice: for the baseline ISA of the build and for AVX2 + FMA, picked
// at run time (the row math is always_inline, so it is generated for the ISA of the loop).
#ifdef DFINE_X86
template <typename Body>
__attribute__((target("avx2,fma"))) void rows_avx2(int64_t begin, int64_t end, const Body& body) {
  for (int64_t r = begin; r < end; ++r) body(r);
}

// DFINE_CPU_DISABLE_AVX2=1 forces the baseline copies (read once; the tests compare both).
bool cpu_has_avx2() {
  static const bool has = [] {
    const char* disable = std::getenv("DFINE_CPU_DISABLE_AVX2");
    if (disable != nullptr && std::strcmp(disable, "1") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}
#endif

template <typename Body>
void rows_baseline(int64_t begin, int64_t end, const Body& body) {
  for (int64_t r = begin; r < end; ++r) body(r);
}

// body(r) for every row r, rows split over threads.
template <typename Body>
void for_each_row(int64_t rows, int64_t grain, const Body& body) {
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
#ifdef DFINE_X86
    if (cpu_has_avx2()) {
      rows_avx2(begin, end, body);
      return;
    }
#endif
    rows_baseline(begin, end, body);
  });
}

#define DFINE_ROW_BODY [&](int64_t r) __attribute__((always_inline))

// body(r0, r1) for consecutive blocks [r0, r1) of at most kRowBlock rows, blocks split over threads
// (for per-row work that vectorises across the rows of a block, such as the logarithms).
constexpr int64_t kRowBlock = 16;

#ifdef DFINE_X86
template <typename Body>
__attribute__((target("avx2,fma"))) void blocks_avx2(int64_t begin, int64_t end, const Body& body) {
  for (int64_t r = begin; r < end; r += kRowBlock) body(r, std::min(end, r + kRowBlock));
}
#endif

template <typename Body>
void blocks_baseline(int64_t begin, int64_t end, const Body& body) {
  for (int64_t r = begin; r < end; r += kRowBlock) body(r, std::min(end, r + kRowBlock));
}

template <typename Body>
void for_each_row_block(int64_t rows, int64_t grain, const Body& body) {
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
#ifdef DFINE_X86
    if (cpu_has_avx2()) {
      blocks_avx2(begin, end, body);
      return;
    }
#endif
    blocks_baseline(begin, end, body);
  });
}

#define DFINE_BLOCK_BODY [&](int64_t r0, int64_t r1) __attribute__((always_inline))

// ---------------------------------------------------------------------------------------------
// Lane kernels of the losses (float32, 33 bins, AVX2): 8 rows at a time, one row per SIMD lane.
// A 33-bin row is 4 vectors plus a scalar bin, and its max, sum and dot products end in horizontal
// reductions whose latency chains leave the row loop waiting. With the 8 rows transposed (bin j of
// all 8 rows in one vector), every step is a vertical vector operation, no bin is left over, and
// the 8 rows' reductions run side by side. The per-element math is the same fdr_math.h code as the
// row kernels, on [bin][lane] arrays. Rows are grouped from row 0 (groups never depend on the
// thread split), and the last rows of an incomplete group take the row kernel.
#ifdef DFINE_X86
#include <immintrin.h>

constexpr int kLanes = 8;

__attribute__((target("avx2,fma"))) inline void transpose8x8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// Lane offsets of the 8 rows' first bins, for gathers.
__attribute__((target("avx2,fma"))) inline __m256i lane_row_offsets() {
  return _mm256_setr_epi32(0, kDfineBins, 2 * kDfineBins, 3 * kDfineBins, 4 * kDfineBins, 5 * kDfineBins,
                           6 * kDfineBins, 7 * kDfineBins);
}

// out[j] = bin j of 8 consecutive rows of 33 floats.
__attribute__((target("avx2,fma"))) inline void load_lanes(const float* rows, __m256* out) {
  for (int b = 0; b < 4; ++b) {
    __m256* v = out + 8 * b;
    for (int i = 0; i < kLanes; ++i) v[i] = _mm256_loadu_ps(rows + i * kDfineBins + 8 * b);
    transpose8x8(v);
  }
  out[32] = _mm256_i32gather_ps(rows + 32, lane_row_offsets(), 4);
}

// The inverse of load_lanes (clobbers in[0..32)).
__attribute__((target("avx2,fma"))) inline void store_lanes(__m256* in, float* rows) {
  for (int b = 0; b < 4; ++b) {
    __m256* v = in + 8 * b;
    transpose8x8(v);
    for (int i = 0; i < kLanes; ++i) _mm256_storeu_ps(rows + i * kDfineBins + 8 * b, v[i]);
  }
  alignas(32) float last[kLanes];
  _mm256_store_ps(last, in[32]);
  for (int i = 0; i < kLanes; ++i) rows[i * kDfineBins + 32] = last[i];
}

// store_lanes for a group whose 264 floats start 32-byte aligned: the rows go through a buffer and
// out with streaming stores, which write the gradient without first reading its lines into the
// cache (a fresh [N, 33] gradient is 1 MiB per decoder layer, more than L2 holds).
__attribute__((target("avx2,fma"))) inline void store_lanes_streaming(__m256* in, float* rows) {
  alignas(32) float buffer[kLanes * kDfineBins];
  store_lanes(in, buffer);
  for (int c = 0; c < kDfineBins; ++c) _mm256_stream_ps(rows + 8 * c, _mm256_load_ps(buffer + 8 * c));
}

__attribute__((target("avx2,fma"))) inline void store_lanes_to(__m256* in, float* rows) {
  if (reinterpret_cast<uintptr_t>(rows) % 32 == 0) {
    store_lanes_streaming(in, rows);
  } else {
    store_lanes(in, rows);
  }
}

// z[j] = exp(z[j] - max_j z[j]) per lane over the 33 bins; returns the per-lane sums and the
// maxima in `max`. Unrolled by 4 with 4 partial maxima and sums: each exponential is a chain of ~15
// dependent operations, so several must be in flight at once.
__attribute__((target("avx2,fma"))) inline __m256 exp_nonpos8(__m256 x);

__attribute__((target("avx2,fma"))) inline __m256 lanes_exp_sum(__m256* z, __m256& max) {
  constexpr int n = kDfineBins;
  __m256 m0 = z[0], m1 = z[1], m2 = z[2], m3 = z[3];
#pragma GCC unroll 8
  for (int j = 4; j + 3 < n; j += 4) {
    m0 = _mm256_max_ps(z[j], m0);
    m1 = _mm256_max_ps(z[j + 1], m1);
    m2 = _mm256_max_ps(z[j + 2], m2);
    m3 = _mm256_max_ps(z[j + 3], m3);
  }
  m0 = _mm256_max_ps(z[n - 1], m0);  // n = 33 = 8 * 4 + 1
  const __m256 m = _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3));
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
#pragma GCC unroll 8
  for (int j = 0; j + 3 < n; j += 4) {
    z[j] = exp_nonpos8(_mm256_sub_ps(z[j], m));
    z[j + 1] = exp_nonpos8(_mm256_sub_ps(z[j + 1], m));
    z[j + 2] = exp_nonpos8(_mm256_sub_ps(z[j + 2], m));
    z[j + 3] = exp_nonpos8(_mm256_sub_ps(z[j + 3], m));
    s0 = _mm256_add_ps(s0, z[j]);
    s1 = _mm256_add_ps(s1, z[j + 1]);
    s2 = _mm256_add_ps(s2, z[j + 2]);
    s3 = _mm256_add_ps(s3, z[j + 3]);
  }
  z[n - 1] = exp_nonpos8(_mm256_sub_ps(z[n - 1], m));
  s0 = _mm256_add_ps(s0, z[n - 1]);
  max = m;
  return _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
}
static_assert(kDfineBins == 33, "lanes_exp_sum unrolls 33 bins as 8 * 4 + 1");

// exp_nonpos of fdr_math.h on 8 lanes (same polynomial and steps; NaN passes through).
__attribute__((target("avx2,fma"))) inline __m256 exp_nonpos8(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(kExpLowest);
  const __m256 xc = _mm256_max_ps(lowest, x);  // max_ps returns its second operand for NaN
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), magic), magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 poly = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(kExpPoly[i]));
  poly = _mm256_add_ps(_mm256_fmadd_ps(poly, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_mul_ps(poly, _mm256_castsi256_ps(bits));
  return _mm256_andnot_ps(_mm256_cmp_ps(x, lowest, _CMP_LT_OQ), y);
}

// log_sum_exp_total of fdr_math.h on 8 lanes (through an array: GCC vectorises the loop).
__attribute__((target("avx2,fma"))) inline __m256 log_sum_exp_total8(__m256 x) {
  alignas(32) float v[kLanes];
  _mm256_store_ps(v, x);
  DFINE_PRAGMA(omp simd)
  for (int i = 0; i < kLanes; ++i) v[i] = log_sum_exp_total(v[i]);
  return _mm256_load_ps(v);
}

__attribute__((target("avx2,fma"))) inline __m256 load_or(const float* p, float value) {
  return p ? _mm256_loadu_ps(p) : _mm256_set1_ps(value);
}

template <typename T>
struct FglLaneArgs {
  const T *z, *target, *wl, *wr, *weight, *upstream;
  T *loss, *grad;  // either may be null
};

// FGL rows [begin, end), end - begin a multiple of 8: fgl_row_terms / fgl_row_loss in vector form.
__attribute__((target("avx2,fma"))) void fgl_lanes_avx2(const FglLaneArgs<float>& a, int64_t begin, int64_t end) {
  constexpr int n = kDfineBins;
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t r = begin; r < end; r += kLanes) {
    const float* rows = a.z + r * n;
    __m256 z[n];
    load_lanes(rows, z);
    __m256 m;
    const __m256 sum = lanes_exp_sum(z, m);  // z now holds the exponentials
    // fgl_left_bin: 0 for t <= 0 or NaN (max_ps returns its second operand), n - 2 at the top
    const __m256 t = _mm256_loadu_ps(a.target + r);
    const __m256i left =
        _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(t, zero), _mm256_set1_ps(static_cast<float>(n - 2))));
    const __m256 wl = _mm256_loadu_ps(a.wl + r), wr = _mm256_loadu_ps(a.wr + r);
    const __m256 w = load_or(a.weight ? a.weight + r : nullptr, 1.0f);
    if (a.loss) {
      const __m256i at = _mm256_add_epi32(lane_row_offsets(), left);
      const __m256 da = _mm256_sub_ps(_mm256_i32gather_ps(rows, at, 4), m);
      const __m256 db = _mm256_sub_ps(_mm256_i32gather_ps(rows + 1, at, 4), m);
      const __m256 lg = log_sum_exp_total8(sum);
      const __m256 loss = _mm256_fmadd_ps(_mm256_sub_ps(lg, da), wl, _mm256_mul_ps(_mm256_sub_ps(lg, db), wr));
      _mm256_storeu_ps(a.loss + r, a.weight ? _mm256_mul_ps(loss, w) : loss);
    }
    if (a.grad) {
      const __m256 g = a.upstream ? _mm256_mul_ps(_mm256_loadu_ps(a.upstream + r), w) : w;
      const __m256 scale = _mm256_div_ps(_mm256_mul_ps(g, _mm256_add_ps(wl, wr)), sum);
      const __m256 gl = _mm256_mul_ps(g, wl), gr = _mm256_mul_ps(g, wr);
      // minus g * wl at the left bin and g * wr at the right one, selected per lane (scalar
      // updates after the stores would stall on store-to-load forwarding)
      const __m256i right = _mm256_add_epi32(left, _mm256_set1_epi32(1));
      for (int j = 0; j < n; ++j) {
        const __m256i bin = _mm256_set1_epi32(j);
        const __m256 at_left = _mm256_castsi256_ps(_mm256_cmpeq_epi32(left, bin));
        const __m256 at_right = _mm256_castsi256_ps(_mm256_cmpeq_epi32(right, bin));
        const __m256 target_terms = _mm256_or_ps(_mm256_and_ps(at_left, gl), _mm256_and_ps(at_right, gr));
        z[j] = _mm256_fmsub_ps(z[j], scale, target_terms);
      }
      store_lanes_to(z, a.grad + r * n);
    }
  }
  _mm_sfence();  // streaming stores are weakly ordered: complete them before the threads join
}

// ---- AVX-512 kernels of the losses: 16 rows per group, not transposed (a row is two 16-float
// vectors plus bin 32; per-row reductions go 16 rows at a time through reduce_rows16). With 33
// vectors per transposed group of 16 rows, and 66 or more live at once, the lane layout spent its
// time on transposes and register spills. The exponential takes fewer instructions than the AVX2
// one (the power of two by vscalefps, the underflow to 0 by a mask).
#define DFINE_AVX512_TARGET "avx512f,avx512dq,avx512vl,avx512bw,avx2,fma"
// GCC 12's AVX-512 headers pass self-initialised "undefined" vectors as merge sources (e.g. in
// _mm512_max_ps), which -Wmaybe-uninitialized reports at every use; the values are never read.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
constexpr int kLanes16 = 16;

// DFINE_CPU_DISABLE_AVX512=1 keeps the AVX2 lane kernels (read once; the tests compare both).
bool cpu_has_avx512() {
  static const bool has = [] {
    const char* disable = std::getenv("DFINE_CPU_DISABLE_AVX512");
    if (disable != nullptr && std::strcmp(disable, "1") == 0) return false;
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  }();
  return has;
}

// exp_nonpos of fdr_math.h on 16 lanes (same range reduction; NaN passes through), with a cheaper
// polynomial: the degree-6 minimax fit of exp(r) on [-ln2/2, ln2/2] from scripts/fit_exp_polynomial.py,
// 6 FMAs instead of Cephes' 8 operations (~5% faster FGL kernel) for the same accuracy in float32
// (maximum relative error 7.3e-8; Cephes 6.9e-8). Degree 5 (5 FMAs, 1.9e-7) moved the golden DDF
// losses, whose KL terms cancel, by 7e-5. No clamp at the lowest exponent: the lanes below it
// (-inf included) are masked to 0 at the end, whatever the steps before computed for them.
constexpr float kExpMinimax6[7] = {1.0f, 1.0f, 0.49999991059303284f, 0.16666419804096222f,
                                   0.04166822507977486f, 0.008374815806746483f, 0.001383684459142387f};

__attribute__((target(DFINE_AVX512_TARGET))) inline __m512 exp_nonpos16(__m512 x) {
  const __m512 lowest = _mm512_set1_ps(kExpLowest);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 poly = _mm512_set1_ps(kExpMinimax6[6]);
  for (int i = 5; i >= 0; --i) poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(kExpMinimax6[i]));
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lowest, _CMP_NLT_UQ);  // 0 below the lowest exponent
  return _mm512_maskz_scalef_ps(keep, poly, n);
}

__attribute__((target(DFINE_AVX512_TARGET))) inline __m512 log_sum_exp_total16(__m512 x) {
  alignas(64) float v[kLanes16];
  _mm512_store_ps(v, x);
  DFINE_PRAGMA(omp simd)
  for (int i = 0; i < kLanes16; ++i) v[i] = log_sum_exp_total(v[i]);
  return _mm512_load_ps(v);
}

__attribute__((target(DFINE_AVX512_TARGET))) inline __m512 load16_or(const float* p, float value) {
  return p ? _mm512_loadu_ps(p) : _mm512_set1_ps(value);
}

// Per-row reductions of 16 rows at once: returns R with R[r] = op over the 16 lanes of row r's
// partial vector, where part[tree_slot(r)] holds that vector. A tree of 15 ops on pairs of shuffled
// vectors, which halves the lanes per row at every level; its last level leaves row 4j + k in lane
// 4k + j, so rows are stored transposed (tree_slot) and come out in order.
constexpr int tree_slot(int r) { return 4 * (r % 4) + r / 4; }

template <bool kMax>  // max, else sum
__attribute__((target(DFINE_AVX512_TARGET), always_inline)) inline __m512 reduce_op16(__m512 x, __m512 y) {
  return kMax ? _mm512_max_ps(x, y) : _mm512_add_ps(x, y);
}

template <bool kMax>
__attribute__((target(DFINE_AVX512_TARGET), always_inline)) inline __m512 reduce_rows16(const __m512* part) {
  constexpr auto op = reduce_op16<kMax>;
  __m512 u[8], w[4], q[2];
  for (int k = 0; k < 8; ++k) {  // lanes 0-7: row of part[2k], 8-15: row of part[2k+1]
    const __m512 a = part[2 * k], b = part[2 * k + 1];
    u[k] = op(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  for (int k = 0; k < 4; ++k) {  // 128-bit block i: row of part[4k + i]
    const __m512 a = u[2 * k], b = u[2 * k + 1];
    w[k] = op(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  for (int k = 0; k < 2; ++k) {  // block i: two lanes for each of two rows
    const __m512 a = w[2 * k], b = w[2 * k + 1];
    q[k] = op(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  return op(_mm512_shuffle_ps(q[0], q[1], _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_ps(q[0], q[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// Copies a group's gradient (16 rows of 33 floats, 64-byte aligned: 33 cache lines) from the
// buffer where it was built to its rows of the output; streamed out if they are aligned too (see
// store_lanes_streaming), so that the 1 MiB gradient of a layer does not evict the caches.
__attribute__((target(DFINE_AVX512_TARGET))) inline void copy_group_out(const float* group, float* grad) {
  if (reinterpret_cast<uintptr_t>(grad) % 64 == 0) {
    for (int c = 0; c < kDfineBins; ++c) _mm512_stream_ps(grad + 16 * c, _mm512_load_ps(group + 16 * c));
  } else {
    for (int c = 0; c < kDfineBins; ++c) _mm512_storeu_ps(grad + 16 * c, _mm512_load_ps(group + 16 * c));
  }
}

// FGL on 16 rows at a time, rows [begin, end), end - begin a multiple of 16: fgl_row_terms /
// fgl_row_loss with each row in its natural layout (bins 0-15 and 16-31 in two vectors, bin 32 of
// the 16 rows gathered into one), not transposed: the transposes and the 33 live vectors of a lane
// kernel cost more here than the per-row reductions, which reduce_rows16 does 16 rows at a time.
// Three passes over a group (its 2 KiB stay in L1): the row maxima; the exponentials (written to the
// gradient's rows) and their sums; the gradient, scaled in place.
__attribute__((target(DFINE_AVX512_TARGET))) void fgl_rows16_avx512(const FglLaneArgs<float>& a, int64_t begin,
                                                                     int64_t end) {
  constexpr int n = kDfineBins;
  static_assert(kDfineBins == 33, "fgl_rows16_avx512 splits a row as 16 + 16 + 1 bins");
  const __m512 zero = _mm512_setzero_ps();
  const __m512i offsets = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(n));
  alignas(64) float row_max[kLanes16], row_scale[kLanes16], last_grad[kLanes16], row_gl[kLanes16], row_gr[kLanes16];
  alignas(64) int32_t row_left[kLanes16];
  alignas(64) float group[kLanes16 * kDfineBins];  // the group's gradient, built here in L1
  for (int64_t r0 = begin; r0 < end; r0 += kLanes16) {
    const float* rows = a.z + r0 * n;
    float* grad = a.grad ? a.grad + r0 * n : nullptr;
    __m512 part[kLanes16];
#pragma GCC unroll 16
    for (int r = 0; r < kLanes16; ++r) {  // bins 17-32 overlap 16-31: harmless in a maximum
      const float* row = rows + r * n;
      part[tree_slot(r)] = _mm512_max_ps(_mm512_max_ps(_mm512_loadu_ps(row), _mm512_loadu_ps(row + 16)),
                                         _mm512_loadu_ps(row + 17));
    }
    const __m512 m = reduce_rows16<true>(part);
    _mm512_store_ps(row_max, m);
#pragma GCC unroll 16
    for (int r = 0; r < kLanes16; ++r) {
      const float* row = rows + r * n;
      const __m512 mr = _mm512_set1_ps(row_max[r]);
      const __m512 e0 = exp_nonpos16(_mm512_sub_ps(_mm512_loadu_ps(row), mr));
      const __m512 e1 = exp_nonpos16(_mm512_sub_ps(_mm512_loadu_ps(row + 16), mr));
      if (grad) {
        _mm512_storeu_ps(group + r * n, e0);
        _mm512_storeu_ps(group + r * n + 16, e1);
      }
      part[tree_slot(r)] = _mm512_add_ps(e0, e1);
    }
    const __m512 last = exp_nonpos16(_mm512_sub_ps(_mm512_i32gather_ps(offsets, rows + n - 1, 4), m));
    const __m512 sum = _mm512_add_ps(reduce_rows16<false>(part), last);
    // fgl_left_bin: 0 for t <= 0 or NaN (max_ps returns its second operand), n - 2 at the top
    const __m512 t = _mm512_loadu_ps(a.target + r0);
    const __m512i left =
        _mm512_cvttps_epi32(_mm512_min_ps(_mm512_max_ps(t, zero), _mm512_set1_ps(static_cast<float>(n - 2))));
    const __m512 wl = _mm512_loadu_ps(a.wl + r0), wr = _mm512_loadu_ps(a.wr + r0);
    const __m512 w = load16_or(a.weight ? a.weight + r0 : nullptr, 1.0f);
    if (a.loss) {
      const __m512i at = _mm512_add_epi32(offsets, left);
      const __m512 da = _mm512_sub_ps(_mm512_i32gather_ps(at, rows, 4), m);
      const __m512 db = _mm512_sub_ps(_mm512_i32gather_ps(at, rows + 1, 4), m);
      const __m512 lg = log_sum_exp_total16(sum);
      const __m512 loss = _mm512_fmadd_ps(_mm512_sub_ps(lg, da), wl, _mm512_mul_ps(_mm512_sub_ps(lg, db), wr));
      _mm512_storeu_ps(a.loss + r0, a.weight ? _mm512_mul_ps(loss, w) : loss);
    }
    if (grad) {
      const __m512 g = a.upstream ? _mm512_mul_ps(_mm512_loadu_ps(a.upstream + r0), w) : w;
      const __m512 scale = _mm512_div_ps(_mm512_mul_ps(g, _mm512_add_ps(wl, wr)), sum);
      _mm512_store_ps(row_scale, scale);
      _mm512_store_ps(last_grad, _mm512_mul_ps(last, scale));
      _mm512_store_ps(row_gl, _mm512_mul_ps(g, wl));
      _mm512_store_ps(row_gr, _mm512_mul_ps(g, wr));
      _mm512_store_si512(row_left, left);
#pragma GCC unroll 16
      for (int r = 0; r < kLanes16; ++r) {
        float* row = group + r * n;
        const __m512 s = _mm512_set1_ps(row_scale[r]);
        _mm512_storeu_ps(row, _mm512_mul_ps(_mm512_loadu_ps(row), s));
        _mm512_storeu_ps(row + 16, _mm512_mul_ps(_mm512_loadu_ps(row + 16), s));
        row[n - 1] = last_grad[r];
      }
      // minus g * wl at the left bin and g * wr at the right one
      for (int r = 0; r < kLanes16; ++r) {
        float* row = group + r * n + row_left[r];
        row[0] -= row_gl[r];
        row[1] -= row_gr[r];
      }
      copy_group_out(group, grad);
    }
  }
  _mm_sfence();  // streaming stores are weakly ordered: complete them before the threads join
}

template <typename T>
struct DdfLaneArgs {
  const T *student, *teacher, *weight, *upstream;
  T temperature;
  T *loss, *grad;  // either may be null
};

// DDF rows [begin, end), end - begin a multiple of 8: ddf_row_terms / ddf_row_loss in vector form.
__attribute__((target("avx2,fma"))) void ddf_lanes_avx2(const DdfLaneArgs<float>& a, int64_t begin, int64_t end) {
  constexpr int n = kDfineBins;
  const __m256 zero = _mm256_setzero_ps();
  const __m256 temp = _mm256_set1_ps(a.temperature), inv_t = _mm256_set1_ps(1.0f / a.temperature);
  for (int64_t r = begin; r < end; r += kLanes) {
    __m256 zs[n], zt[n], ea[n], eb[n];
    load_lanes(a.student + r * n, zs);
    load_lanes(a.teacher + r * n, zt);
    __m256 ms = zs[0], mt = zt[0];
    for (int j = 1; j < n; ++j) {
      ms = _mm256_max_ps(zs[j], ms);
      mt = _mm256_max_ps(zt[j], mt);
    }
    // max(z * inv_t) == max(z) * inv_t exactly (rounding is monotone), as in ddf_row_terms
    const __m256 max_a = _mm256_mul_ps(ms, inv_t), max_b = _mm256_mul_ps(mt, inv_t);
    __m256 sa = zero, sb = zero;
    for (int j = 0; j < n; ++j) {
      // the max-shifted scaled logits a_j, b_j: one expression for both, so that teacher ==
      // student gives exactly 0
      zs[j] = _mm256_fmsub_ps(zs[j], inv_t, max_a);
      zt[j] = _mm256_fmsub_ps(zt[j], inv_t, max_b);
      ea[j] = exp_nonpos8(zs[j]);
      eb[j] = exp_nonpos8(zt[j]);
      sa = _mm256_add_ps(sa, ea[j]);
      sb = _mm256_add_ps(sb, eb[j]);
    }
    const __m256 inv_a = _mm256_div_ps(_mm256_set1_ps(1.0f), sa);
    const __m256 inv_b = _mm256_div_ps(_mm256_set1_ps(1.0f), sb);
    __m256 kl = zero, sp = zero;
    for (int j = 0; j < n; ++j) {
      const __m256 p = _mm256_mul_ps(eb[j], inv_b);
      const __m256 term = _mm256_mul_ps(p, _mm256_sub_ps(zt[j], zs[j]));
      kl = _mm256_add_ps(kl, _mm256_and_ps(_mm256_cmp_ps(p, zero, _CMP_GT_OQ), term));  // p = 0 counts 0
      sp = _mm256_add_ps(sp, p);
    }
    const __m256 w = load_or(a.weight ? a.weight + r : nullptr, 1.0f);
    if (a.loss) {
      const __m256 log_ratio = _mm256_sub_ps(log_sum_exp_total8(sb), log_sum_exp_total8(sa));
      const __m256 loss = _mm256_mul_ps(_mm256_mul_ps(temp, temp), _mm256_fnmadd_ps(log_ratio, sp, kl));
      _mm256_storeu_ps(a.loss + r, a.weight ? _mm256_mul_ps(w, loss) : loss);
    }
    if (a.grad) {
      const __m256 g = a.upstream ? _mm256_mul_ps(_mm256_loadu_ps(a.upstream + r), w) : w;
      const __m256 scale = _mm256_mul_ps(g, temp);
      const __m256 qs = _mm256_mul_ps(_mm256_mul_ps(scale, inv_a), sp), ps = _mm256_mul_ps(scale, inv_b);
      for (int j = 0; j < n; ++j) ea[j] = _mm256_fmsub_ps(ea[j], qs, _mm256_mul_ps(eb[j], ps));
      store_lanes_to(ea, a.grad + r * n);
    }
  }
  _mm_sfence();  // streaming stores are weakly ordered: complete them before the threads join
}

// DDF on 16 rows at a time in their natural layout, like fgl_rows16_avx512: rows [begin, end),
// end - begin a multiple of 16. The same math as ddf_lanes_avx512, with two differences in rounding:
// sum_j p_j is (sum_j e_b,j) / sum_b, and the KL sum is sum_j e_b,j (b_j - a_j) / sum_b (terms with
// e_b,j = 0, i.e. p_j = 0, counting 0). Teacher == student still gives exactly 0.
__attribute__((target(DFINE_AVX512_TARGET))) void ddf_rows16_avx512(const DdfLaneArgs<float>& a, int64_t begin,
                                                                     int64_t end) {
  constexpr int n = kDfineBins;
  static_assert(kDfineBins == 33, "ddf_rows16_avx512 splits a row as 16 + 16 + 1 bins");
  const __m512 zero = _mm512_setzero_ps();
  const __m512 temp = _mm512_set1_ps(a.temperature), inv_t = _mm512_set1_ps(1.0f / a.temperature);
  const __m512i offsets = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(n));
  alignas(64) float row_max_a[kLanes16], row_max_b[kLanes16], row_qs[kLanes16], row_ps[kLanes16], last_grad[kLanes16];
  // exponentials of bins 0-31 (row stride 32: aligned), then the group's gradient (row stride 33)
  alignas(64) float exp_a[kLanes16 * 32], exp_b[kLanes16 * 32], group[kLanes16 * kDfineBins];
  for (int64_t r0 = begin; r0 < end; r0 += kLanes16) {
    const float* student = a.student + r0 * n;
    const float* teacher = a.teacher + r0 * n;
    __m512 part_a[kLanes16], part_b[kLanes16], part_kl[kLanes16];
#pragma GCC unroll 16
    for (int r = 0; r < kLanes16; ++r) {  // bins 17-32 overlap 16-31: harmless in a maximum
      const float* s = student + r * n;
      const float* t = teacher + r * n;
      part_a[tree_slot(r)] =
          _mm512_max_ps(_mm512_max_ps(_mm512_loadu_ps(s), _mm512_loadu_ps(s + 16)), _mm512_loadu_ps(s + 17));
      part_b[tree_slot(r)] =
          _mm512_max_ps(_mm512_max_ps(_mm512_loadu_ps(t), _mm512_loadu_ps(t + 16)), _mm512_loadu_ps(t + 17));
    }
    // max(z * inv_t) == max(z) * inv_t exactly (rounding is monotone)
    const __m512 max_a = _mm512_mul_ps(reduce_rows16<true>(part_a), inv_t);
    const __m512 max_b = _mm512_mul_ps(reduce_rows16<true>(part_b), inv_t);
    _mm512_store_ps(row_max_a, max_a);
    _mm512_store_ps(row_max_b, max_b);
#pragma GCC unroll 16
    for (int r = 0; r < kLanes16; ++r) {
      const float* s = student + r * n;
      const float* t = teacher + r * n;
      const __m512 ma = _mm512_set1_ps(row_max_a[r]), mb = _mm512_set1_ps(row_max_b[r]);
      // one expression for both (exactly 0 apart if equal)
      const __m512 a0 = _mm512_fmsub_ps(_mm512_loadu_ps(s), inv_t, ma);
      const __m512 a1 = _mm512_fmsub_ps(_mm512_loadu_ps(s + 16), inv_t, ma);
      const __m512 b0 = _mm512_fmsub_ps(_mm512_loadu_ps(t), inv_t, mb);
      const __m512 b1 = _mm512_fmsub_ps(_mm512_loadu_ps(t + 16), inv_t, mb);
      const __m512 ea0 = exp_nonpos16(a0), ea1 = exp_nonpos16(a1);
      const __m512 eb0 = exp_nonpos16(b0), eb1 = exp_nonpos16(b1);
      _mm512_store_ps(exp_a + 32 * r, ea0);
      _mm512_store_ps(exp_a + 32 * r + 16, ea1);
      _mm512_store_ps(exp_b + 32 * r, eb0);
      _mm512_store_ps(exp_b + 32 * r + 16, eb1);
      part_a[tree_slot(r)] = _mm512_add_ps(ea0, ea1);
      part_b[tree_slot(r)] = _mm512_add_ps(eb0, eb1);
      const __m512 kl0 = _mm512_maskz_mul_ps(_mm512_cmp_ps_mask(eb0, zero, _CMP_GT_OQ), eb0, _mm512_sub_ps(b0, a0));
      part_kl[tree_slot(r)] =
          _mm512_mask3_fmadd_ps(eb1, _mm512_sub_ps(b1, a1), kl0, _mm512_cmp_ps_mask(eb1, zero, _CMP_GT_OQ));
    }
    const __m512 a_last = _mm512_fmsub_ps(_mm512_i32gather_ps(offsets, student + n - 1, 4), inv_t, max_a);
    const __m512 b_last = _mm512_fmsub_ps(_mm512_i32gather_ps(offsets, teacher + n - 1, 4), inv_t, max_b);
    const __m512 ea_last = exp_nonpos16(a_last), eb_last = exp_nonpos16(b_last);
    const __m512 sa = _mm512_add_ps(reduce_rows16<false>(part_a), ea_last);
    const __m512 sb = _mm512_add_ps(reduce_rows16<false>(part_b), eb_last);
    const __m512 kl_sum = _mm512_mask3_fmadd_ps(eb_last, _mm512_sub_ps(b_last, a_last), reduce_rows16<false>(part_kl),
                                                _mm512_cmp_ps_mask(eb_last, zero, _CMP_GT_OQ));
    const __m512 inv_a = _mm512_div_ps(_mm512_set1_ps(1.0f), sa);
    const __m512 inv_b = _mm512_div_ps(_mm512_set1_ps(1.0f), sb);
    const __m512 sp = _mm512_mul_ps(sb, inv_b), kl = _mm512_mul_ps(kl_sum, inv_b);
    const __m512 w = load16_or(a.weight ? a.weight + r0 : nullptr, 1.0f);
    if (a.loss) {
      const __m512 log_ratio = _mm512_sub_ps(log_sum_exp_total16(sb), log_sum_exp_total16(sa));
      const __m512 loss = _mm512_mul_ps(_mm512_mul_ps(temp, temp), _mm512_fnmadd_ps(log_ratio, sp, kl));
      _mm512_storeu_ps(a.loss + r0, a.weight ? _mm512_mul_ps(w, loss) : loss);
    }
    if (a.grad) {
      const __m512 g = a.upstream ? _mm512_mul_ps(_mm512_loadu_ps(a.upstream + r0), w) : w;
      const __m512 scale = _mm512_mul_ps(g, temp);
      const __m512 qs = _mm512_mul_ps(_mm512_mul_ps(scale, inv_a), sp), ps = _mm512_mul_ps(scale, inv_b);
      _mm512_store_ps(row_qs, qs);
      _mm512_store_ps(row_ps, ps);
      _mm512_store_ps(last_grad, _mm512_fmsub_ps(ea_last, qs, _mm512_mul_ps(eb_last, ps)));
#pragma GCC unroll 16
      for (int r = 0; r < kLanes16; ++r) {
        const __m512 q = _mm512_set1_ps(row_qs[r]), p = _mm512_set1_ps(row_ps[r]);
        float* row = group + r * n;
        _mm512_storeu_ps(row, _mm512_fmsub_ps(_mm512_load_ps(exp_a + 32 * r), q,
                                              _mm512_mul_ps(_mm512_load_ps(exp_b + 32 * r), p)));
        _mm512_storeu_ps(row + 16, _mm512_fmsub_ps(_mm512_load_ps(exp_a + 32 * r + 16), q,
                                                   _mm512_mul_ps(_mm512_load_ps(exp_b + 32 * r + 16), p)));
        row[n - 1] = last_grad[r];
      }
      float* grad = a.grad + r0 * n;
      copy_group_out(group, grad);
    }
  }
  _mm_sfence();  // streaming stores are weakly ordered: complete them before the threads join
}

// fdr_decode, float32, 33 bins, AVX2: 2 boxes (8 edge rows, edges l, t, r, b) per lane group; the
// math of edge_softmax_expectation / fdr_decode_row_forward / fdr_decode_row_backward. The top-K
// runs as a sorted insertion per lane over the bins (strictly greater moves up, so among equal
// probabilities the lower bin comes first, as in topk_small).
template <typename T>
struct DecodeLaneArgs {
  const T *z, *W, *ref;
  T rs;
  // forward
  T *boxes, *stats;
  uint8_t* topk_index;
  // backward
  const uint8_t* saved_index;
  const T *grad_boxes, *grad_stats;
  T *grad_z, *grad_ref;
};

// Softmax of the 8 edge rows of box pair `pair` into p (transposed), returns the expectations.
__attribute__((target("avx2,fma"))) inline __m256 decode_lanes_softmax(const float* z, const __m256* w, __m256* p) {
  constexpr int n = kDfineBins;
  load_lanes(z, p);
  __m256 m;
  const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.0f), lanes_exp_sum(p, m));
  __m256 d = _mm256_setzero_ps();
  for (int j = 0; j < n; ++j) {
    p[j] = _mm256_mul_ps(p[j], inv);
    d = _mm256_fmadd_ps(p[j], w[j], d);
  }
  return d;
}

template <int K>
__attribute__((target("avx2,fma"))) void decode_forward_lanes_avx2(const DecodeLaneArgs<float>& a, int64_t pair_begin,
                                                                    int64_t pair_end) {
  constexpr int n = kDfineBins;
  __m256 w[n];
  for (int j = 0; j < n; ++j) w[j] = _mm256_set1_ps(a.W[j]);
  for (int64_t pair = pair_begin; pair < pair_end; ++pair) {
    const int64_t box = 2 * pair, edge = 4 * box;
    __m256 p[n];
    const __m256 d = decode_lanes_softmax(a.z + edge * n, w, p);
    __m256 top_p[K], top_j[K];
    for (int i = 0; i < K; ++i) top_p[i] = _mm256_set1_ps(-1.0f), top_j[i] = _mm256_setzero_ps();
    for (int j = 0; j < n; ++j) {
      const __m256 v = p[j], bin = _mm256_set1_ps(static_cast<float>(j));
      __m256 up[K];  // v goes above place i (and then above every later place)
      for (int i = 0; i < K; ++i) up[i] = _mm256_cmp_ps(v, top_p[i], _CMP_GT_OQ);
      for (int i = K - 1; i > 0; --i) {
        top_p[i] = _mm256_blendv_ps(_mm256_blendv_ps(top_p[i], v, up[i]), top_p[i - 1], up[i - 1]);
        top_j[i] = _mm256_blendv_ps(_mm256_blendv_ps(top_j[i], bin, up[i]), top_j[i - 1], up[i - 1]);
      }
      top_p[0] = _mm256_blendv_ps(top_p[0], v, up[0]);
      top_j[0] = _mm256_blendv_ps(top_j[0], bin, up[0]);
    }
    alignas(32) float vals[K][kLanes], bins[K][kLanes], dist[kLanes];
    for (int i = 0; i < K; ++i) _mm256_store_ps(vals[i], top_p[i]), _mm256_store_ps(bins[i], top_j[i]);
    _mm256_store_ps(dist, d);
    for (int e = 0; e < kLanes; ++e) {
      float* st = a.stats + (edge + e) * (K + 1);
      uint8_t* ti = a.topk_index + (edge + e) * K;
      float total = 0.0f;
      for (int i = 0; i < K; ++i) {
        st[i] = vals[i][e];
        ti[i] = static_cast<uint8_t>(bins[i][e]);
        total += vals[i][e];
      }
      st[K] = total / static_cast<float>(K);
    }
    distance_to_box(a.ref + box * 4, dist, a.rs, a.boxes + box * 4);
    distance_to_box(a.ref + box * 4 + 4, dist + 4, a.rs, a.boxes + box * 4 + 4);
  }
}

template <int K>
__attribute__((target("avx2,fma"))) void decode_backward_lanes_avx2(const DecodeLaneArgs<float>& a, int64_t pair_begin,
                                                                     int64_t pair_end) {
  constexpr int n = kDfineBins;
  __m256 w[n];
  for (int j = 0; j < n; ++j) w[j] = _mm256_set1_ps(a.W[j]);
  const float rs = a.rs, half = 0.5f * rs;
  for (int64_t pair = pair_begin; pair < pair_end; ++pair) {
    const int64_t box = 2 * pair, edge = 4 * box;
    __m256 p[n];
    alignas(32) float dist[kLanes], grad_d[kLanes], dot[kLanes];
    _mm256_store_ps(dist, decode_lanes_softmax(a.z + edge * n, w, p));
    // per box: box = ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), as in fdr_decode_row_backward
    for (int b = 0; b < 2; ++b) {
      const float* ref = a.ref + (box + b) * 4;
      const float* gb = a.grad_boxes + (box + b) * 4;
      float* gr = a.grad_ref + (box + b) * 4;
      const float* d = dist + 4 * b;
      const float unit_w = ref[2] / rs, unit_h = ref[3] / rs;
      const float gx1 = 0.5f * gb[0] - gb[2], gx2 = 0.5f * gb[0] + gb[2];
      const float gy1 = 0.5f * gb[1] - gb[3], gy2 = 0.5f * gb[1] + gb[3];
      grad_d[4 * b + 0] = -gx1 * unit_w, grad_d[4 * b + 1] = -gy1 * unit_h;
      grad_d[4 * b + 2] = gx2 * unit_w, grad_d[4 * b + 3] = gy2 * unit_h;
      gr[0] = gx1 + gx2;
      gr[1] = gy1 + gy2;
      gr[2] = (gx2 * (half + d[2]) - gx1 * (half + d[0])) / rs;
      gr[3] = (gy2 * (half + d[3]) - gy1 * (half + d[1])) / rs;
    }
    // the top-k terms t_j, added at their bins (transposed): gz_j = p_j * (grad_d * W_j - dot) + t_j
    __m256 extra[n];
    for (int j = 0; j < n; ++j) extra[j] = _mm256_setzero_ps();
    const float* pf = reinterpret_cast<const float*>(p);
    float* xf = reinterpret_cast<float*>(extra);
    for (int e = 0; e < kLanes; ++e) {
      const float* gs = a.grad_stats + (edge + e) * (K + 1);
      const uint8_t* top = a.saved_index + (edge + e) * K;
      const float grad_mean = gs[K] / static_cast<float>(K);
      float dt = grad_d[e] * dist[e];
      for (int i = 0; i < K; ++i) {
        const float term = pf[top[i] * kLanes + e] * (gs[i] + grad_mean);
        dt += term;
        xf[top[i] * kLanes + e] += term;
      }
      dot[e] = dt;
    }
    const __m256 g = _mm256_load_ps(grad_d), dv = _mm256_load_ps(dot);
    for (int j = 0; j < n; ++j) p[j] = _mm256_fmadd_ps(p[j], _mm256_fmsub_ps(g, w[j], dv), extra[j]);
    store_lanes_to(p, a.grad_z + edge * n);
  }
  _mm_sfence();  // streaming stores are weakly ordered: complete them before the threads join
}

template <int K>
void run_decode_lanes(const DecodeLaneArgs<float>& a, bool forward, int64_t begin, int64_t end) {
  if (forward) {
    decode_forward_lanes_avx2<K>(a, begin, end);
  } else {
    decode_backward_lanes_avx2<K>(a, begin, end);
  }
}

// Box pairs [begin, end) of fdr_decode forward or backward through the lane kernels.
void run_lanes(const DecodeLaneArgs<float>& a, int k, bool forward, int64_t begin, int64_t end) {
  switch (k) {
    case 1: return run_decode_lanes<1>(a, forward, begin, end);
    case 2: return run_decode_lanes<2>(a, forward, begin, end);
    case 3: return run_decode_lanes<3>(a, forward, begin, end);
    case 4: return run_decode_lanes<4>(a, forward, begin, end);
    case 5: return run_decode_lanes<5>(a, forward, begin, end);
    case 6: return run_decode_lanes<6>(a, forward, begin, end);
    case 7: return run_decode_lanes<7>(a, forward, begin, end);
    default: return run_decode_lanes<8>(a, forward, begin, end);
  }
}

// Rows [begin, end) (a multiple of 8 rows, starting at a multiple of 8): groups of 16 through the
// AVX-512 kernel where available, a last group of 8 through the AVX2 one.
void run_lanes(const FglLaneArgs<float>& a, int64_t begin, int64_t end) {
  if (cpu_has_avx512()) {
    const int64_t mid = begin + (end - begin) / kLanes16 * kLanes16;
    fgl_rows16_avx512(a, begin, mid);
    begin = mid;
  }
  fgl_lanes_avx2(a, begin, end);
}
void run_lanes(const DdfLaneArgs<float>& a, int64_t begin, int64_t end) {
  if (cpu_has_avx512()) {
    const int64_t mid = begin + (end - begin) / kLanes16 * kLanes16;
    ddf_rows16_avx512(a, begin, mid);
    begin = mid;
  }
  ddf_lanes_avx2(a, begin, end);
}
#endif  // DFINE_X86

// float64 has no lane kernels (for_each_lane_group never calls these)
int64_t lane_group_rows(bool has_avx512_kernel) {
#ifdef DFINE_X86
  if (has_avx512_kernel && cpu_has_avx512()) return kLanes16;
#endif
  return 8;
}
void run_lanes(const FglLaneArgs<double>&, int64_t, int64_t) {}
void run_lanes(const DdfLaneArgs<double>&, int64_t, int64_t) {}
void run_lanes(const DecodeLaneArgs<double>&, int, bool, int64_t, int64_t) {}

// Runs lanes(pair_begin, pair_end) on the pairs of boxes (split over threads) and the row body on
// a last odd box, when the fdr_decode lane kernels apply (float32, 33 bins, AVX2); returns false
// (nothing run) otherwise.
template <typename scalar_t, typename Lanes, typename Body>
bool for_each_box_pair(int64_t boxes, int n, int64_t grain, const Lanes& lanes, const Body& body) {
#ifdef DFINE_X86
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (n != kDfineBins || !cpu_has_avx2()) return false;
    const int64_t pairs = boxes / 2;
    at::parallel_for(0, pairs, std::max<int64_t>(grain / 2, 1), [&](int64_t p0, int64_t p1) { lanes(p0, p1); });
    if (2 * pairs < boxes) rows_avx2(2 * pairs, boxes, body);
    return true;
  }
#endif
  return false;
}

// Runs lanes(begin, end) on the complete groups of `group` rows (8, or 16 for AVX-512 kernels; split
// over threads), then on a last complete group of 8, and the block body on the remaining rows, when
// the lane kernels apply (float32, 33 bins, AVX2); returns false (nothing run) otherwise. Groups
// start at row 0, so which kernel computes a row never depends on the thread split.
template <typename scalar_t, typename Lanes, typename Body>
bool for_each_lane_group(int64_t rows, int n, int64_t grain, int64_t group, const Lanes& lanes, const Body& body) {
#ifdef DFINE_X86
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (n != kDfineBins || !cpu_has_avx2()) return false;
    const int64_t groups = rows / group;
    at::parallel_for(0, groups, std::max<int64_t>(grain / group, 1),
                     [&](int64_t g0, int64_t g1) { lanes(g0 * group, g1 * group); });
    const int64_t rest = groups * group, rest_lanes = rest + (rows - rest) / kLanes * kLanes;
    if (rest_lanes > rest) lanes(rest, rest_lanes);
    if (rest_lanes < rows) blocks_avx2(rest_lanes, rows, body);
    return true;
  }
#endif
  return false;
}

void check_float_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

void check_rows(const at::Tensor& t, int64_t rows, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows, op, ": ", name, " must have shape [N=", rows, "], got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but pred_corners has ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but pred_corners is on ",
              like.device());
}

void check_decode_args(const at::Tensor& pred, const at::Tensor& project, const at::Tensor& ref, int64_t topk,
                       const char* op) {
  TORCH_CHECK(pred.dim() == 2, op, ": pred_corners must have shape [R, 4*(K+1)], got ", pred.sizes());
  TORCH_CHECK(project.dim() == 1 && project.size(0) >= 2 && project.size(0) <= kMaxBins, op,
              ": project must have shape [K+1] with 2 <= K+1 <= ", kMaxBins, ", got ", project.sizes());
  TORCH_CHECK(pred.size(1) == 4 * project.size(0), op, ": pred_corners must have shape [R, 4*(K+1)=",
              4 * project.size(0), "], got ", pred.sizes());
  TORCH_CHECK(ref.dim() == 2 && ref.size(0) == pred.size(0) && ref.size(1) == 4, op,
              ": ref_boxes must have shape [R=", pred.size(0), ", 4], got ", ref.sizes());
  TORCH_CHECK(topk >= 1 && topk <= kMaxTopk && topk <= project.size(0), op, ": lqe_topk must be in [1, ",
              std::min<int64_t>(kMaxTopk, project.size(0)), "], got ", topk);
  for (const at::Tensor* t : {&project, &ref}) {
    TORCH_CHECK(t->scalar_type() == pred.scalar_type(), op, ": project/ref_boxes must have the dtype of ",
                "pred_corners (", pred.scalar_type(), "), got ", t->scalar_type());
    TORCH_CHECK(t->device() == pred.device(), op, ": all tensors must be on the device of pred_corners");
  }
}

void check_loss_pred(const at::Tensor& pred, const char* op) {
  TORCH_CHECK(pred.dim() == 2 && pred.size(1) >= 2 && pred.size(1) <= kMaxBins, op,
              ": pred_corners must have shape [N, K+1] with 2 <= K+1 <= ", kMaxBins, ", got ", pred.sizes());
}

// ---------------------------------------------------------------------------------------------
// fdr_decode

std::tuple<at::Tensor, at::Tensor, at::Tensor> fdr_decode_forward_cpu(const at::Tensor& pred_corners, const at::Tensor& project,
                                                          const at::Tensor& ref_boxes, double reg_scale,
                                                          int64_t lqe_topk) {
  const char* op = "fdr_decode_forward";
  check_float_cpu(pred_corners, op, "pred_corners");
  check_decode_args(pred_corners, project, ref_boxes, lqe_topk, op);
  const at::Tensor z = pred_corners.contiguous(), W = project.contiguous(), ref = ref_boxes.contiguous();
  const int64_t rows = z.size(0);
  const int n = static_cast<int>(W.size(0));
  const int k = static_cast<int>(lqe_topk);
  at::Tensor boxes = at::empty({rows, 4}, z.options());
  at::Tensor stats = at::empty({rows, 4, k + 1}, z.options());
  at::Tensor topk_index = at::empty({rows, 4, k}, z.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fdr_decode_forward", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* wp = W.data_ptr<scalar_t>();
    const scalar_t* rp = ref.data_ptr<scalar_t>();
    scalar_t* bp = boxes.data_ptr<scalar_t>();
    scalar_t* sp = stats.data_ptr<scalar_t>();
    uint8_t* ip = topk_index.data_ptr<uint8_t>();
    const scalar_t rs = std::abs(static_cast<scalar_t>(reg_scale));
    const auto row = DFINE_ROW_BODY {
      if (n == kDfineBins) {
        fdr_decode_row_forward<scalar_t>(zp + r * 4 * kDfineBins, wp, kDfineBins, rp + r * 4, rs, k, bp + r * 4,
                                         sp + r * 4 * (k + 1), ip + r * 4 * k);
      } else {
        fdr_decode_row_forward<scalar_t>(zp + r * 4 * n, wp, n, rp + r * 4, rs, k, bp + r * 4, sp + r * 4 * (k + 1),
                                         ip + r * 4 * k);
      }
    };
    DecodeLaneArgs<scalar_t> lane_args{zp, wp, rp, rs, bp, sp, ip, nullptr, nullptr, nullptr, nullptr, nullptr};
    const auto lanes = [&](int64_t p0, int64_t p1) { run_lanes(lane_args, k, true, p0, p1); };
    if (!for_each_box_pair<scalar_t>(rows, n, kGrainRows, lanes, row)) for_each_row(rows, kGrainRows, row);
  });
  return {boxes, stats, topk_index};
}

std::tuple<at::Tensor, at::Tensor> fdr_decode_backward_cpu(const at::Tensor& grad_boxes, const at::Tensor& grad_stats,
                                                           const at::Tensor& pred_corners, const at::Tensor& project,
                                                           const at::Tensor& ref_boxes, const at::Tensor& topk_index,
                                                           double reg_scale, int64_t lqe_topk) {
  const char* op = "fdr_decode_backward";
  check_float_cpu(pred_corners, op, "pred_corners");
  check_decode_args(pred_corners, project, ref_boxes, lqe_topk, op);
  const int64_t rows = pred_corners.size(0);
  TORCH_CHECK(grad_boxes.sizes() == ref_boxes.sizes(), op, ": grad_boxes must have shape ", ref_boxes.sizes());
  TORCH_CHECK(grad_stats.dim() == 3 && grad_stats.size(0) == rows && grad_stats.size(1) == 4 &&
                  grad_stats.size(2) == lqe_topk + 1,
              op, ": grad_stats must have shape [R, 4, lqe_topk + 1], got ", grad_stats.sizes());
  TORCH_CHECK(topk_index.scalar_type() == at::kByte && topk_index.dim() == 3 && topk_index.size(0) == rows &&
                  topk_index.size(1) == 4 && topk_index.size(2) == lqe_topk,
              op, ": topk_index must be a uint8 tensor [R, 4, lqe_topk] (from fdr_decode_forward), got ",
              topk_index.scalar_type(), " ", topk_index.sizes());
  const at::Tensor z = pred_corners.contiguous(), W = project.contiguous(), ref = ref_boxes.contiguous();
  const at::Tensor ti = topk_index.contiguous();
  const at::Tensor gb = grad_boxes.to(z.scalar_type()).contiguous();
  const at::Tensor gs = grad_stats.to(z.scalar_type()).contiguous();
  const int n = static_cast<int>(W.size(0));
  const int k = static_cast<int>(lqe_topk);
  at::Tensor grad_z = at::empty_like(z);
  at::Tensor grad_ref = at::empty_like(ref);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fdr_decode_backward", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* wp = W.data_ptr<scalar_t>();
    const scalar_t* rp = ref.data_ptr<scalar_t>();
    const scalar_t* gbp = gb.data_ptr<scalar_t>();
    const scalar_t* gsp = gs.data_ptr<scalar_t>();
    scalar_t* gzp = grad_z.data_ptr<scalar_t>();
    scalar_t* grp = grad_ref.data_ptr<scalar_t>();
    const uint8_t* ip = ti.data_ptr<uint8_t>();
    const scalar_t rs = std::abs(static_cast<scalar_t>(reg_scale));
    const auto row = DFINE_ROW_BODY {
      if (n == kDfineBins) {
        fdr_decode_row_backward<scalar_t>(zp + r * 4 * kDfineBins, wp, kDfineBins, rp + r * 4, rs, k, ip + r * 4 * k,
                                          gbp + r * 4, gsp + r * 4 * (k + 1), gzp + r * 4 * kDfineBins, grp + r * 4);
      } else {
        fdr_decode_row_backward<scalar_t>(zp + r * 4 * n, wp, n, rp + r * 4, rs, k, ip + r * 4 * k, gbp + r * 4,
                                          gsp + r * 4 * (k + 1), gzp + r * 4 * n, grp + r * 4);
      }
    };
    DecodeLaneArgs<scalar_t> lane_args{zp, wp, rp, rs, nullptr, nullptr, nullptr, ip, gbp, gsp, gzp, grp};
    const auto lanes = [&](int64_t p0, int64_t p1) { run_lanes(lane_args, k, false, p0, p1); };
    if (!for_each_box_pair<scalar_t>(rows, n, kGrainRows, lanes, row)) for_each_row(rows, kGrainRows, row);
  });
  return {grad_z, grad_ref};
}

// ---------------------------------------------------------------------------------------------
// FGL and DDF. The forward ops return the weighted per-row loss [N] and, when compute_grad is
// set, d(row loss)/d(pred) [N, K+1] from the same pass (backward then only scales its rows);
// otherwise an empty tensor. The backward ops recompute the gradient from the inputs (used when
// the forward pass did not keep it, e.g. a second backward through the same graph).

at::Tensor optional_rows(const c10::optional<at::Tensor>& weight, int64_t rows, const at::Tensor& like,
                         const char* op) {
  if (!weight.has_value() || !weight->defined()) return at::Tensor();
  check_rows(*weight, rows, like, op, "weight");
  return weight->contiguous();
}

template <typename T>
const T* optional_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

void check_fgl_args(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& wl, const at::Tensor& wr,
                    const char* op) {
  check_float_cpu(pred, op, "pred_corners");
  check_loss_pred(pred, op);
  const int64_t rows = pred.size(0);
  check_rows(target, rows, pred, op, "target_bins");
  check_rows(wl, rows, pred, op, "weight_left");
  check_rows(wr, rows, pred, op, "weight_right");
}

// rows_out[r] = weight[r] * loss_r; grad_out (if defined) = upstream[r] * weight[r] * d(loss_r)/dz.
at::Tensor fgl_rows_cpu(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& wl, const at::Tensor& wr,
                        const at::Tensor& weight, const at::Tensor& upstream, bool want_loss, at::Tensor grad_out) {
  const at::Tensor z = pred.contiguous(), t = target.contiguous(), l = wl.contiguous(), rgt = wr.contiguous();
  const int64_t rows = z.size(0);
  const int n = static_cast<int>(z.size(1));
  at::Tensor out = want_loss ? at::empty({rows}, z.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fgl_loss_cpu", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* tp = t.data_ptr<scalar_t>();
    const scalar_t* wlp = l.data_ptr<scalar_t>();
    const scalar_t* wrp = rgt.data_ptr<scalar_t>();
    const scalar_t* wp = optional_ptr<scalar_t>(weight);
    const scalar_t* up = optional_ptr<scalar_t>(upstream);
    scalar_t* op_ = want_loss ? out.data_ptr<scalar_t>() : nullptr;
    scalar_t* gzp = grad_out.defined() ? grad_out.data_ptr<scalar_t>() : nullptr;
    // Rows in blocks: the pass over each row's bins first, then the logarithms of the block's sums
    // in one vectorised loop (a logf call per row took a quarter of the time).
    const auto block = DFINE_BLOCK_BODY {
      scalar_t sums[kRowBlock], da[kRowBlock], db[kRowBlock];
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t i = r - r0;
        const scalar_t w = wp ? wp[r] : scalar_t(1);
        const scalar_t g = up ? up[r] * w : w;
        scalar_t* gz = gzp ? gzp + r * n : nullptr;
        sums[i] = n == kDfineBins
                      ? fgl_row_terms<scalar_t>(zp + r * kDfineBins, kDfineBins, tp[r], wlp[r], wrp[r], g, gz, da[i], db[i])
                      : fgl_row_terms<scalar_t>(zp + r * n, n, tp[r], wlp[r], wrp[r], g, gz, da[i], db[i]);
      }
      if (!op_) return;
      const int64_t count = r1 - r0;
      for (int64_t i = count; i < kRowBlock; ++i) sums[i] = scalar_t(1);  // full-width loop below
      scalar_t logs[kRowBlock];
      DFINE_PRAGMA(omp simd)
      for (int64_t i = 0; i < kRowBlock; ++i) logs[i] = log_sum_exp_total(sums[i]);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t r = r0 + i;
        const scalar_t loss = fgl_row_loss(logs[i], da[i], db[i], wlp[r], wrp[r]);
        op_[r] = wp ? loss * wp[r] : loss;
      }
    };
    const auto lanes = [&](int64_t begin, int64_t end) {
      run_lanes(FglLaneArgs<scalar_t>{zp, tp, wlp, wrp, wp, up, op_, gzp}, begin, end);
    };
    if (!for_each_lane_group<scalar_t>(rows, n, kGrainRows * 4, lane_group_rows(true), lanes, block)) {
      for_each_row_block(rows, kGrainRows * 4, block);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> fgl_loss_forward_cpu(const at::Tensor& pred_corners, const at::Tensor& target_bins,
                                                        const at::Tensor& weight_left, const at::Tensor& weight_right,
                                                        const c10::optional<at::Tensor>& weight, bool compute_grad) {
  const char* op = "fgl_loss_forward";
  check_fgl_args(pred_corners, target_bins, weight_left, weight_right, op);
  const at::Tensor w = optional_rows(weight, pred_corners.size(0), pred_corners, op);
  at::Tensor grad = compute_grad ? at::empty(pred_corners.sizes(), pred_corners.options()) : at::empty({0}, pred_corners.options());
  at::Tensor out = fgl_rows_cpu(pred_corners, target_bins, weight_left, weight_right, w, at::Tensor(), true,
                                compute_grad ? grad : at::Tensor());
  return {out, grad};
}

at::Tensor fgl_loss_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& pred_corners,
                                 const at::Tensor& target_bins, const at::Tensor& weight_left,
                                 const at::Tensor& weight_right, const c10::optional<at::Tensor>& weight) {
  const char* op = "fgl_loss_backward";
  check_fgl_args(pred_corners, target_bins, weight_left, weight_right, op);
  check_rows(grad_rows, pred_corners.size(0), pred_corners, op, "grad_rows");
  const at::Tensor w = optional_rows(weight, pred_corners.size(0), pred_corners, op);
  at::Tensor grad = at::empty(pred_corners.sizes(), pred_corners.options());
  fgl_rows_cpu(pred_corners, target_bins, weight_left, weight_right, w, grad_rows.contiguous(), false, grad);
  return grad;
}

void check_ddf_args(const at::Tensor& pred, const at::Tensor& teacher, double temperature, const char* op) {
  check_float_cpu(pred, op, "pred_corners");
  check_loss_pred(pred, op);
  TORCH_CHECK(teacher.sizes() == pred.sizes(), op, ": teacher_corners must have shape ", pred.sizes(), ", got ",
              teacher.sizes());
  TORCH_CHECK(teacher.scalar_type() == pred.scalar_type(), op, ": teacher_corners must have dtype ",
              pred.scalar_type(), ", got ", teacher.scalar_type());
  TORCH_CHECK(teacher.device() == pred.device(), op, ": teacher_corners must be on ", pred.device());
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0, got ", temperature);
}

at::Tensor ddf_rows_cpu(const at::Tensor& pred, const at::Tensor& teacher, const at::Tensor& weight,
                        double temperature, const at::Tensor& upstream, bool want_loss, at::Tensor grad_out) {
  const at::Tensor zs = pred.contiguous(), zt = teacher.contiguous();
  const int64_t rows = zs.size(0);
  const int n = static_cast<int>(zs.size(1));
  at::Tensor out = want_loss ? at::empty({rows}, zs.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(zs.scalar_type(), "ddf_loss_cpu", [&] {
    const scalar_t* sp = zs.data_ptr<scalar_t>();
    const scalar_t* tp = zt.data_ptr<scalar_t>();
    const scalar_t* wp = optional_ptr<scalar_t>(weight);
    const scalar_t* up = optional_ptr<scalar_t>(upstream);
    scalar_t* op_ = want_loss ? out.data_ptr<scalar_t>() : nullptr;
    scalar_t* gzp = grad_out.defined() ? grad_out.data_ptr<scalar_t>() : nullptr;
    const scalar_t temp = static_cast<scalar_t>(temperature);
    const auto block = DFINE_BLOCK_BODY {
      scalar_t sum_a[kRowBlock], sum_b[kRowBlock], kl[kRowBlock], sum_p[kRowBlock];
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t i = r - r0;
        const scalar_t w = wp ? wp[r] : scalar_t(1);
        const scalar_t g = up ? up[r] * w : w;
        scalar_t* gz = gzp ? gzp + r * n : nullptr;
        if (n == kDfineBins) {
          ddf_row_terms<scalar_t>(sp + r * kDfineBins, tp + r * kDfineBins, kDfineBins, temp, g, gz, sum_a[i],
                                  sum_b[i], kl[i], sum_p[i]);
        } else {
          ddf_row_terms<scalar_t>(sp + r * n, tp + r * n, n, temp, g, gz, sum_a[i], sum_b[i], kl[i], sum_p[i]);
        }
      }
      if (!op_) return;
      const int64_t count = r1 - r0;
      for (int64_t i = count; i < kRowBlock; ++i) sum_a[i] = sum_b[i] = scalar_t(1);  // full-width loop below
      scalar_t log_a[kRowBlock], log_b[kRowBlock];
      DFINE_PRAGMA(omp simd)
      for (int64_t i = 0; i < kRowBlock; ++i) {
        log_a[i] = log_sum_exp_total(sum_a[i]);
        log_b[i] = log_sum_exp_total(sum_b[i]);
      }
      for (int64_t i = 0; i < count; ++i) {
        const int64_t r = r0 + i;
        const scalar_t loss = ddf_row_loss(log_a[i], log_b[i], kl[i], sum_p[i], temp);
        op_[r] = wp ? wp[r] * loss : loss;
      }
    };
    const auto lanes = [&](int64_t begin, int64_t end) {
      run_lanes(DdfLaneArgs<scalar_t>{sp, tp, wp, up, temp, op_, gzp}, begin, end);
    };
    if (!for_each_lane_group<scalar_t>(rows, n, kGrainRows * 4, lane_group_rows(true), lanes, block)) {
      for_each_row_block(rows, kGrainRows * 4, block);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> ddf_loss_forward_cpu(const at::Tensor& pred_corners,
                                                        const at::Tensor& teacher_corners,
                                                        const c10::optional<at::Tensor>& weight, double temperature,
                                                        bool compute_grad) {
  const char* op = "ddf_loss_forward";
  check_ddf_args(pred_corners, teacher_corners, temperature, op);
  const at::Tensor w = optional_rows(weight, pred_corners.size(0), pred_corners, op);
  at::Tensor grad = compute_grad ? at::empty(pred_corners.sizes(), pred_corners.options()) : at::empty({0}, pred_corners.options());
  at::Tensor out = ddf_rows_cpu(pred_corners, teacher_corners, w, temperature, at::Tensor(), true,
                                compute_grad ? grad : at::Tensor());
  return {out, grad};
}

at::Tensor ddf_loss_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& pred_corners,
                                 const at::Tensor& teacher_corners, const c10::optional<at::Tensor>& weight,
                                 double temperature) {
  const char* op = "ddf_loss_backward";
  check_ddf_args(pred_corners, teacher_corners, temperature, op);
  check_rows(grad_rows, pred_corners.size(0), pred_corners, op, "grad_rows");
  const at::Tensor w = optional_rows(weight, pred_corners.size(0), pred_corners, op);
  at::Tensor grad = at::empty(pred_corners.sizes(), pred_corners.options());
  ddf_rows_cpu(pred_corners, teacher_corners, w, temperature, grad_rows.contiguous(), false, grad);
  return grad;
}

}  // namespace
}  // namespace dfine

TORCH_LIBRARY_FRAGMENT(dfine, m) {
  m.def(
      "fdr_decode_forward(Tensor pred_corners, Tensor project, Tensor ref_boxes, float reg_scale, int lqe_topk) "
      "-> (Tensor boxes, Tensor lqe_stats, Tensor topk_index)");
  m.def(
      "fdr_decode_backward(Tensor grad_boxes, Tensor grad_stats, Tensor pred_corners, Tensor project, "
      "Tensor ref_boxes, Tensor topk_index, float reg_scale, int lqe_topk) -> (Tensor, Tensor)");
  m.def(
      "fgl_loss_forward(Tensor pred_corners, Tensor target_bins, Tensor weight_left, Tensor weight_right, "
      "Tensor? weight, bool compute_grad) -> (Tensor rows, Tensor grad_pred)");
  m.def(
      "fgl_loss_backward(Tensor grad_rows, Tensor pred_corners, Tensor target_bins, Tensor weight_left, "
      "Tensor weight_right, Tensor? weight) -> Tensor");
  m.def(
      "ddf_loss_forward(Tensor pred_corners, Tensor teacher_corners, Tensor? weight, float temperature, "
      "bool compute_grad) -> (Tensor rows, Tensor grad_pred)");
  m.def(
      "ddf_loss_backward(Tensor grad_rows, Tensor pred_corners, Tensor teacher_corners, Tensor? weight, "
      "float temperature) -> Tensor");
}

TORCH_LIBRARY_IMPL(dfine, CPU, m) {
  m.impl("fdr_decode_forward", &dfine::fdr_decode_forward_cpu);
  m.impl("fdr_decode_backward", &dfine::fdr_decode_backward_cpu);
  m.impl("fgl_loss_forward", &dfine::fgl_loss_forward_cpu);
  m.impl("fgl_loss_backward", &dfine::fgl_loss_backward_cpu);
  m.impl("ddf_loss_forward", &dfine::ddf_loss_forward_cpu);
  m.impl("ddf_loss_backward", &dfine::ddf_loss_backward_cpu);
}
