// Per-element math of the FDR decode and of the GO-LSD losses (FGL, DDF): the one C++ copy of their
// formulas (the others are the references in dfine/ops/*.py and the Triton kernels in kernels/).
//
// Every function is a template over the value type V of one "row" lane:
//   * V = float or double: one row per call (the CUDA kernels, one thread per row, and the CPU
//     kernels for float64);
//   * V = a GCC vector of float (common/simd.h): W rows per call, in the CPU kernels, with the
//     rows transposed ([bin][lane]: z[j] holds bin j of W rows), so that every step is a vertical
//     vector operation.
// A "row" is the K+1 bin logits of one box edge. The code uses only arithmetic, comparisons and
// ?: (which GCC defines lane-wise for vectors), plus a few helpers with a scalar version here and
// a lane version in common/simd.h (trunc_int, times_pow2, split_exponent, lane_lookup, lane_add_at).
// All functions are numerically stable (max subtraction) and need no workspace beyond fixed arrays.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/macros.h"
#if !defined(__CUDACC__)
#include "common/simd.h"
#endif

namespace dfine {

// ---- scalar versions of the lane helpers (lane versions: common/simd.h) -------------------------

template <typename T>
  requires std::is_floating_point_v<T>
DFINE_HD T trunc_int(T x) {
  return static_cast<T>(static_cast<int>(x));
}

DFINE_HD float times_pow2(float poly, float n) {
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return poly * scale;
}

DFINE_HD float split_exponent(float x, float& e) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(float));
  e = static_cast<float>(((bits >> 23) & 0xff) - 126);
  const int32_t mbits = (bits & 0x007fffff) | 0x3f000000;
  float m;
  std::memcpy(&m, &mbits, sizeof(float));
  return m;
}

template <typename T>
  requires std::is_floating_point_v<T>
DFINE_HD T lane_lookup(const T* table, T bin) {
  return table[static_cast<int>(bin)];
}

template <typename T>
  requires std::is_floating_point_v<T>
DFINE_HD void lane_add_at(T* table, int /*n*/, T bin, T value) {
  table[static_cast<int>(bin)] += value;
}

namespace fdr {

constexpr int kMaxBins = 64;  // K + 1 <= 64 (D-FINE uses 33)
constexpr int kMaxTopk = 8;   // LQE uses k = 4

// x broadcast to every lane of V (V itself for scalars).
template <typename V>
DFINE_HD V splat(double x) {
  if constexpr (std::is_floating_point_v<V>) {
    return static_cast<V>(x);
  } else {
    return V{} + static_cast<std::remove_cvref_t<decltype(V{}[0])>>(x);
  }
}

template <typename V>
DFINE_HD V max_(V a, V b) {
  return a > b ? a : b;
}

// ---- exp and log -----------------------------------------------------------------------------

// Cephes expf: below kExpLowest the result is under FLT_MIN (returned as 0); polynomial of
// exp(r) - 1 - r for |r| <= ln2 / 2, highest power first. Branch-free, ~1 ulp, NaN passes through.
constexpr float kExpLowest = -87.33654f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

template <typename V>
DFINE_HD V exp_poly(V x) {
  const V lowest = splat<V>(kExpLowest);
  const V xc = x < lowest ? lowest : x;
  // n = round(x / ln2) with the 1.5 * 2^23 trick (no -ffast-math here, so it is kept as written)
  const V n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  V r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  V poly = splat<V>(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) poly = poly * r + kExpPoly[i];
  poly = poly * (r * r) + r + 1.0f;
  const V y = times_pow2(poly, n);
  return x < lowest ? V{} : y;
}

// exp(x) for x <= 0 (every exponent here is a logit minus its row maximum).
DFINE_HD double exp_nonpos(double x) { return ::exp(x); }

DFINE_HD float exp_nonpos(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  return exp_poly(x);
#endif
}

template <typename V>  // float lanes
DFINE_HD V exp_nonpos(V x) {
  return exp_poly(x);
}

// Cephes logf for positive normal x (~1 ulp), branch-free: x = 2^e * f with f in
// [sqrt(1/2), sqrt(2)), log x = e * ln2 + log1p(f - 1). NaN is passed through.
template <typename V>
DFINE_HD V log_poly(V x) {
  V e;
  const V m = split_exponent(x, e);  // x = 2^e * m, m in [0.5, 1)
  const auto small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  const V t = small ? m + m - 1.0f : m - 1.0f;
  const V z = t * t;
  V y = splat<V>(7.0376836292e-2f);
  y = y * t - 1.1514610310e-1f;
  y = y * t + 1.1676998740e-1f;
  y = y * t - 1.2420140846e-1f;
  y = y * t + 1.4249322787e-1f;
  y = y * t - 1.6668057665e-1f;
  y = y * t + 2.0000714765e-1f;
  y = y * t - 2.4999993993e-1f;
  y = y * t + 3.3333331174e-1f;
  y = y * t * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  const V r = (t + y) + 0.693359375f * e;
  return x == x ? r : x;
}

// log(x) of a row's sum of exponentials, x in [1, n] (its largest term is exp(0) = 1), or NaN.
DFINE_HD double log_sum_exp_total(double x) { return ::log(x); }

DFINE_HD float log_sum_exp_total(float x) {
#if defined(__CUDA_ARCH__)
  return ::logf(x);
#else
  return log_poly(x);
#endif
}

template <typename V>  // float lanes
DFINE_HD V log_sum_exp_total(V x) {
  return log_poly(x);
}

// ---- softmax, expectation, top-k (fdr_decode) ----------------------------------------------------

// e[j] = exp(z[j] - max), returns sum_j e[j]; the maximum is written to `max_out`. e may be z.
template <typename V>
DFINE_HD V edge_exp(const V* z, int n, V* e, V& max_out) {
  V m = z[0];
  for (int j = 1; j < n; ++j) m = max_(z[j], m);
  V sum = V{};
  for (int j = 0; j < n; ++j) {
    const V v = exp_nonpos(z[j] - m);
    e[j] = v;
    sum += v;
  }
  max_out = m;
  return sum;
}

// p = softmax(z) (p may be z); returns sum_j p[j] * W[j], the expected distance of the edge.
template <typename V, typename S>
DFINE_HD V edge_softmax_expectation(const V* z, const S* W, int n, V* p) {
  V m;
  const V inv = splat<V>(1) / edge_exp(z, n, p, m);
  V acc = V{};
  for (int j = 0; j < n; ++j) {
    p[j] *= inv;
    acc += p[j] * W[j];
  }
  return acc;
}

// The k largest of p[0..n) in descending order and their bins (as values of V), by a sorted
// insertion of every bin: a value moves above a place only if strictly greater, so among equal
// probabilities the lower bin comes first. p is a softmax, so either every p[j] is NaN (a NaN or
// +inf logit, or all -inf) or none is: a NaN row gives k NaN values (as torch.topk) at bin 0.
template <typename V>
DFINE_HD void edge_topk(const V* p, int n, int k, V* top_p, V* top_bin) {
  for (int i = 0; i < k; ++i) {
    top_p[i] = splat<V>(-1);  // probabilities are >= 0
    top_bin[i] = V{};
  }
  for (int j = 0; j < n; ++j) {
    const V v = p[j], bin = splat<V>(j);
    for (int i = k - 1; i > 0; --i) {
      const auto above_prev = v > top_p[i - 1];
      const auto above = v > top_p[i];
      top_p[i] = above_prev ? top_p[i - 1] : (above ? v : top_p[i]);
      top_bin[i] = above_prev ? top_bin[i - 1] : (above ? bin : top_bin[i]);
    }
    const auto above = v > top_p[0];
    top_p[0] = above ? v : top_p[0];
    top_bin[0] = above ? bin : top_bin[0];
  }
  // NaN never compares greater, so a NaN row inserted nothing: one check per row, not per bin
  const V first = p[0];
  for (int i = 0; i < k; ++i) top_p[i] = first == first ? top_p[i] : first;
}

// The last LQE statistic of an edge: the mean of its top-k probabilities.
template <typename V>
DFINE_HD V topk_mean(const V* top_p, int k) {
  V total = V{};
  for (int i = 0; i < k; ++i) total += top_p[i];
  return total / splat<V>(k);
}

// distance2bbox: reference (cx, cy, w, h) and distances (l, t, r, b) -> box (cx, cy, w, h).
template <typename T>
DFINE_HD void distance_to_box(const T* ref, const T* d, T rs, T* box) {
  const T half = T(0.5) * rs;
  const T unit_w = ref[2] / rs, unit_h = ref[3] / rs;
  const T x1 = ref[0] - (half + d[0]) * unit_w;
  const T y1 = ref[1] - (half + d[1]) * unit_h;
  const T x2 = ref[0] + (half + d[2]) * unit_w;
  const T y2 = ref[1] + (half + d[3]) * unit_h;
  box[0] = (x1 + x2) / T(2);
  box[1] = (y1 + y2) / T(2);
  box[2] = x2 - x1;
  box[3] = y2 - y1;
}

// Backward of distance_to_box: given d(box), write d(distances) [4] and d(ref) [4].
template <typename T>
DFINE_HD void distance_to_box_backward(const T* ref, const T* d, T rs, const T* grad_box, T* grad_d, T* grad_ref) {
  // box = ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)
  const T half = T(0.5) * rs;
  const T unit_w = ref[2] / rs, unit_h = ref[3] / rs;
  const T gx1 = T(0.5) * grad_box[0] - grad_box[2], gx2 = T(0.5) * grad_box[0] + grad_box[2];
  const T gy1 = T(0.5) * grad_box[1] - grad_box[3], gy2 = T(0.5) * grad_box[1] + grad_box[3];
  grad_d[0] = -gx1 * unit_w;
  grad_d[1] = -gy1 * unit_h;
  grad_d[2] = gx2 * unit_w;
  grad_d[3] = gy2 * unit_h;
  grad_ref[0] = gx1 + gx2;
  grad_ref[1] = gy1 + gy2;
  grad_ref[2] = (gx2 * (half + d[2]) - gx1 * (half + d[0])) / rs;
  grad_ref[3] = (gy2 * (half + d[3]) - gy1 * (half + d[1])) / rs;
}

// Gradient of one edge's logits gz [n] given p = softmax(z), its expectation d, d(loss)/d(d) and
// the LQE statistics' gradients gs [k + 1] (top-k probabilities, then their mean) at the saved
// top-k bins. Softmax backward: gz_j = p_j * (gp_j - sum_i p_i gp_i) with gp_j = grad_d * W_j
// plus the top-k terms t_j; sum_i p_i W_i is d, so the dot product needs no pass over the bins:
// dot = grad_d * d + sum over the top-k of p * t.
template <typename V, typename S>
DFINE_HD void edge_backward(const V* p, const S* W, int n, int k, V d, V grad_d, const V* top_bin, const V* gs,
                            V* gz) {
  const V grad_mean = gs[k] / splat<V>(k);
  V dot = grad_d * d;
  V terms[kMaxTopk];
  for (int i = 0; i < k; ++i) {
    terms[i] = lane_lookup(p, top_bin[i]) * (gs[i] + grad_mean);
    dot += terms[i];
  }
  for (int j = 0; j < n; ++j) gz[j] = p[j] * (grad_d * W[j] - dot);
  for (int i = 0; i < k; ++i) lane_add_at(gz, n, top_bin[i], terms[i]);
}

// One box (rows): z = 4 * n logits (edges l, t, r, b) -> box (cx, cy, w, h), stats [4, k + 1] and
// the bins of the top-k probabilities [4, k] (kept for the backward pass, which then needs no top-k).
template <typename T>
DFINE_HD void fdr_decode_row_forward(const T* z, const T* W, int n, const T* ref, T rs, int k, T* box, T* stats,
                                     uint8_t* topk_index) {
  T p[kMaxBins];
  T d[4];
  for (int e = 0; e < 4; ++e) {
    T top_p[kMaxTopk], top_bin[kMaxTopk];
    d[e] = edge_softmax_expectation(z + e * n, W, n, p);
    edge_topk(p, n, k, top_p, top_bin);
    for (int i = 0; i < k; ++i) {
      stats[e * (k + 1) + i] = top_p[i];
      topk_index[e * k + i] = static_cast<uint8_t>(top_bin[i]);
    }
    stats[e * (k + 1) + k] = topk_mean(top_p, k);
  }
  distance_to_box(ref, d, rs, box);
}

// Gradients of one box (rows): given d(boxes) and d(stats), write d(z) [4 * n] and d(ref) [4].
template <typename T>
DFINE_HD void fdr_decode_row_backward(const T* z, const T* W, int n, const T* ref, T rs, int k,
                                      const uint8_t* topk_index, const T* grad_box, const T* grad_stats, T* grad_z,
                                      T* grad_ref) {
  T p[4 * kMaxBins];
  T d[4], grad_d[4];
  for (int e = 0; e < 4; ++e) d[e] = edge_softmax_expectation(z + e * n, W, n, p + e * kMaxBins);
  distance_to_box_backward(ref, d, rs, grad_box, grad_d, grad_ref);
  for (int e = 0; e < 4; ++e) {
    T top_bin[kMaxTopk];
    for (int i = 0; i < k; ++i) top_bin[i] = static_cast<T>(topk_index[e * k + i]);
    edge_backward(p + e * kMaxBins, W, n, k, d[e], grad_d[e], top_bin, grad_stats + e * (k + 1), grad_z + e * n);
  }
}

// ---- FGL -------------------------------------------------------------------------------------------

// The left bin is target.long() as published, kept inside [0, n - 2] so the right bin exists
// (NaN -> 0). Returned as an integer value of V.
template <typename V>
DFINE_HD V fgl_left_bin(V target, int n) {
  const V t = target > V{} ? target : V{};
  const V top = splat<V>(n - 2);
  return trunc_int(t < top ? t : top);
}

// One FGL row, CE(z, a) * wl + CE(z, a + 1) * wr (without the row weight), in two steps:
// fgl_row_terms does the pass over the bins and returns the sum of exponentials S, and the shifted
// logits da = z[a] - max, db = z[a + 1] - max; the loss is then fgl_row_loss(log S, da, db, wl, wr).
// When grad_z is not null, fgl_row_terms also writes g * d(loss)/dz from the same exponentials
// (g = upstream * row weight).
template <typename V>
DFINE_HD V fgl_row_terms(const V* z, int n, V target, V wl, V wr, V g, V* grad_z, V& da, V& db) {
  V e[kMaxBins];
  V m;
  const V sum = edge_exp(z, n, e, m);
  const V a = fgl_left_bin(target, n), b = a + 1.0f;
  if (grad_z != nullptr) {
    const V scale = g * (wl + wr) / sum;
    const V gl = g * wl, gr = g * wr;
    for (int j = 0; j < n; ++j) {
      const V bin = splat<V>(j);
      grad_z[j] = (scale * e[j] - (bin == a ? gl : V{})) - (bin == b ? gr : V{});
    }
  }
  da = lane_lookup(z, a) - m;
  db = lane_lookup(z, b) - m;
  return sum;
}

template <typename V>
DFINE_HD V fgl_row_loss(V log_sum, V da, V db, V wl, V wr) {
  return (log_sum - da) * wl + (log_sum - db) * wr;
}

template <typename T>
DFINE_HD T fgl_row(const T* z, int n, T target, T wl, T wr, T g, T* grad_z) {
  T da, db;
  const T sum = fgl_row_terms(z, n, target, wl, wr, g, grad_z, da, db);
  return fgl_row_loss(log_sum_exp_total(sum), da, db, wl, wr);
}

// ---- DDF -------------------------------------------------------------------------------------------

// One DDF row, T^2 * sum_j p_j (log p_j - log q_j) with p = softmax(teacher / T) and
// q = softmax(pred / T), terms with p_j = 0 counting 0, in two steps like the FGL row:
// ddf_row_terms does the pass over the bins and returns the sums of exponentials of the student
// (sum_a) and of the teacher (sum_b), sum_p = sum_j p_j and kl_shifted = sum_j p_j (b_j - a_j) over
// the max-shifted scaled logits a_j = (zs_j - max zs) / T, b_j = (zt_j - max zt) / T; then
// log p_j - log q_j = (b_j - a_j) - (log sum_b - log sum_a), and ddf_row_loss adds the logarithms.
// When pred == teacher both parts are exactly 0 (identical code on identical inputs). When grad_z
// is not null, ddf_row_terms writes g * d(loss)/d(pred) = g * T * (q_j * sum(p) - p_j).
// The maximum is subtracted before the scaling: a_j = zs_j / T - max_a would let the compiler fuse
// the product and the subtraction (FMA contraction, on by default for GCC and nvcc), and at the
// maximum the unrounded zs_j / T minus the rounded max_a is then not 0 but up to half an ulp of
// max_a: exp of it overflows, or every exponential underflows, once |z / T| reaches ~1e9 in
// float32 (logits near 1e10, or T = 1e-30), and the row turned NaN where the reference is finite.
template <typename V, typename S>
DFINE_HD void ddf_row_terms(const V* zs, const V* zt, int n, S temperature, V g, V* grad_z, V& sum_a, V& sum_b,
                            V& kl_shifted, V& sum_p) {
  V ea[kMaxBins], eb[kMaxBins];
  const S inv_t = S(1) / temperature;
  // The shifted logits: a difference, then a product, which no contraction can merge (exactly 0
  // at the maximum). The differences are kept for the second pass (fewer operations than
  // recomputing them: ~2% slower than the fused form on the CPU, recomputing ~6%).
  V max_s = zs[0], max_t = zt[0];
  for (int j = 1; j < n; ++j) {
    max_s = max_(zs[j], max_s);
    max_t = max_(zt[j], max_t);
  }
  V sa = V{}, sb = V{};
  V da[kMaxBins], db[kMaxBins];
  for (int j = 0; j < n; ++j) {
    da[j] = zs[j] - max_s;
    db[j] = zt[j] - max_t;
    const V va = exp_nonpos(da[j] * inv_t);
    const V vb = exp_nonpos(db[j] * inv_t);
    ea[j] = va;
    eb[j] = vb;
    sa += va;
    sb += vb;
  }
  const V inv_a = splat<V>(1) / sa, inv_b = splat<V>(1) / sb;
  V kl = V{}, sp = V{};
  for (int j = 0; j < n; ++j) {
    const V p = eb[j] * inv_b;
    const V shifted_ratio = (db[j] - da[j]) * inv_t;
    kl += p > V{} ? p * shifted_ratio : V{};
    sp += p;
  }
  if (grad_z != nullptr) {
    const V scale = g * temperature;
    const V q_scale = scale * inv_a * sp, p_scale = scale * inv_b;
    for (int j = 0; j < n; ++j) grad_z[j] = ea[j] * q_scale - eb[j] * p_scale;
  }
  sum_a = sa;
  sum_b = sb;
  kl_shifted = kl;
  sum_p = sp;
}

template <typename V, typename S>
DFINE_HD V ddf_row_loss(V log_sum_a, V log_sum_b, V kl_shifted, V sum_p, S temperature) {
  return temperature * temperature * (kl_shifted - (log_sum_b - log_sum_a) * sum_p);
}

template <typename T>
DFINE_HD T ddf_row(const T* zs, const T* zt, int n, T temperature, T g, T* grad_z) {
  T sum_a, sum_b, kl_shifted, sum_p;
  ddf_row_terms(zs, zt, n, temperature, g, grad_z, sum_a, sum_b, kl_shifted, sum_p);
  return ddf_row_loss(log_sum_exp_total(sum_a), log_sum_exp_total(sum_b), kl_shifted, sum_p, temperature);
}

}  // namespace fdr
}  // namespace dfine
