// Per-row math of the FDR decode and of the GO-LSD losses (FGL, DDF), shared by the C++ CPU kernels
// (fdr_cpu.cpp) and the CUDA kernels (fdr_cuda.cu): whatever ships to GPUs is tested through the CPU
// kernel. A "row" is the K+1 bin logits of one box edge (losses) or the 4 edges of one box (decode).
// All functions are numerically stable (max subtraction) and need no workspace beyond fixed arrays.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DFINE_HD __host__ __device__ __forceinline__
#define DFINE_SIMD_SUM(acc)
#define DFINE_SIMD_MAX(acc)
#define DFINE_SIMD_MIN(acc)
#define DFINE_SIMD_SUM2(a, b)
#define DFINE_SIMD_MAX2(a, b)
#define DFINE_SIMD_MAX4(a, b, c, d)
#define DFINE_SIMD_MIN4(a, b, c, d)
#else
#define DFINE_HD inline __attribute__((always_inline))
// Lets the compiler vectorise a float sum (it may reassociate inside this loop only).
#define DFINE_PRAGMA(x) _Pragma(#x)
#define DFINE_SIMD_SUM(acc) DFINE_PRAGMA(omp simd reduction(+ : acc))
#define DFINE_SIMD_MAX(acc) DFINE_PRAGMA(omp simd reduction(max : acc))
#define DFINE_SIMD_MIN(acc) DFINE_PRAGMA(omp simd reduction(min : acc))
#define DFINE_SIMD_SUM2(a, b) DFINE_PRAGMA(omp simd reduction(+ : a, b))
#define DFINE_SIMD_MAX2(a, b) DFINE_PRAGMA(omp simd reduction(max : a, b))
#define DFINE_SIMD_MAX4(a, b, c, d) DFINE_PRAGMA(omp simd reduction(max : a, b, c, d))
#define DFINE_SIMD_MIN4(a, b, c, d) DFINE_PRAGMA(omp simd reduction(min : a, b, c, d))
#endif

namespace dfine {
namespace fdr {

constexpr int kMaxBins = 64;  // K + 1 <= 64 (D-FINE uses 33)
constexpr int kMaxTopk = 8;   // LQE uses k = 4

// exp(x) for x <= 0 (every exponent here is a logit minus its row maximum).
DFINE_HD double exp_nonpos(double x) { return ::exp(x); }

// Cephes expf: below kExpLowest the result is under FLT_MIN (returned as 0); polynomial of
// exp(r) - 1 - r for |r| <= ln2 / 2, highest power first (also used by the CPU lane kernels).
constexpr float kExpLowest = -87.33654f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

DFINE_HD float exp_nonpos(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  // Branch-free expf (Cephes polynomial, ~1 ulp) so that loops over the bins vectorise on the CPU.
  const float lowest = kExpLowest;
  const float xc = x < lowest ? lowest : x;
  // n = round(x / ln2) with the 1.5 * 2^23 trick (no -ffast-math here, so it is kept as written)
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float poly = kExpPoly[0];
  for (int i = 1; i < 6; ++i) poly = poly * r + kExpPoly[i];
  poly = poly * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  const float y = poly * scale;
  return x < lowest ? 0.0f : y;
#endif
}

DFINE_HD double log_(double x) { return ::log(x); }
DFINE_HD float log_(float x) { return ::logf(x); }

// log(x) of a row's sum of exponentials, x in [1, n] (its largest term is exp(0) = 1), or NaN.
DFINE_HD double log_sum_exp_total(double x) { return ::log(x); }

DFINE_HD float log_sum_exp_total(float x) {
#if defined(__CUDA_ARCH__)
  return ::logf(x);
#else
  // Branch-free logf (Cephes polynomial, ~1 ulp) for positive normal x, so that a loop over the sums
  // of several rows vectorises on the CPU instead of calling logf once per row. x = 2^e * f with
  // f in [sqrt(1/2), sqrt(2)), log x = e * ln2 + log1p(f - 1). NaN is passed through.
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(float));
  int32_t e = ((bits >> 23) & 0xff) - 126;  // x = 2^e * m, m in [0.5, 1)
  const int32_t mbits = (bits & 0x007fffff) | 0x3f000000;
  float m;
  std::memcpy(&m, &mbits, sizeof(float));
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  const float t = small ? m + m - 1.0f : m - 1.0f;
  const float z = t * t;
  float y = 7.0376836292e-2f;
  y = y * t - 1.1514610310e-1f;
  y = y * t + 1.1676998740e-1f;
  y = y * t - 1.2420140846e-1f;
  y = y * t + 1.4249322787e-1f;
  y = y * t - 1.6668057665e-1f;
  y = y * t + 2.0000714765e-1f;
  y = y * t - 2.4999993993e-1f;
  y = y * t + 3.3333331174e-1f;
  y = y * t * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  const float r = (t + y) + 0.693359375f * fe;
  return x == x ? r : x;
#endif
}

// e[j] = exp(z[j] - max), returns sum_j e[j]; the maximum is written to `max_out`.
template <typename T>
DFINE_HD T edge_exp(const T* z, int n, T* e, T& max_out) {
  T m = z[0];
  DFINE_SIMD_MAX(m)
  for (int j = 1; j < n; ++j) m = z[j] > m ? z[j] : m;
  T sum = T(0);
  DFINE_SIMD_SUM(sum)
  for (int j = 0; j < n; ++j) {
    const T v = exp_nonpos(z[j] - m);
    e[j] = v;
    sum += v;
  }
  max_out = m;
  return sum;
}

// p = softmax(z); returns sum_j p[j] * W[j] (the expected distance of the edge).
template <typename T>
DFINE_HD T edge_softmax_expectation(const T* z, const T* W, int n, T* p) {
  T m;
  const T inv = T(1) / edge_exp(z, n, p, m);
  T acc = T(0);
  DFINE_SIMD_SUM(acc)
  for (int j = 0; j < n; ++j) {
    p[j] *= inv;
    acc += p[j] * W[j];
  }
  return acc;
}

// The k largest of p[0..n) in descending order (ties: the lower index first) and their indices.
// Pass i takes the largest (value, -index) pair below the one found in pass i - 1: two
// branch-free sweeps over the bins per pass, without writes, so they vectorise.
template <typename T>
DFINE_HD void topk_small(const T* p, int n, int k, T* vals, int* idx) {
  T prev_v = T(0);
  int prev_i = -1;
  for (int i = 0; i < k; ++i) {
    T m = T(-1);  // probabilities are >= 0
    DFINE_SIMD_MAX(m)
    for (int j = 0; j < n; ++j) {
      const T v = p[j];
      const bool eligible = i == 0 || v < prev_v || (v == prev_v && j > prev_i);
      const T c = eligible ? v : T(-1);
      m = c > m ? c : m;
    }
    int first = n;
    DFINE_SIMD_MIN(first)
    for (int j = 0; j < n; ++j) {
      const T v = p[j];
      const bool eligible = i == 0 || v < prev_v || (v == prev_v && j > prev_i);
      const int candidate = (eligible && v == m) ? j : n;
      first = candidate < first ? candidate : first;
    }
    if (first >= n) first = prev_i + 1 < n ? prev_i + 1 : 0;  // only with NaN probabilities
    vals[i] = m;
    idx[i] = first;
    prev_v = m;
    prev_i = first;
  }
}

// topk_small for the 4 edges of a box at once (p: 4 rows of stride kMaxBins; vals/idx: [4][k]).
// The four edges' reductions are independent, so running them in the same sweeps lets the CPU
// overlap them instead of waiting for one horizontal reduction after the other.
DFINE_HD bool topk_eligible(float v, int j, float prev_v, int prev_i, bool first) {
  return first || v < prev_v || (v == prev_v && j > prev_i);
}
DFINE_HD bool topk_eligible(double v, int j, double prev_v, int prev_i, bool first) {
  return first || v < prev_v || (v == prev_v && j > prev_i);
}

template <typename T>
DFINE_HD void topk_small_4edges(const T* p, int n, int k, T* vals, int* idx) {
  const T* p0 = p;
  const T* p1 = p + kMaxBins;
  const T* p2 = p + 2 * kMaxBins;
  const T* p3 = p + 3 * kMaxBins;
  T pv0 = T(0), pv1 = T(0), pv2 = T(0), pv3 = T(0);
  int pi0 = -1, pi1 = -1, pi2 = -1, pi3 = -1;
  for (int i = 0; i < k; ++i) {
    const bool first = i == 0;
    T m0 = T(-1), m1 = T(-1), m2 = T(-1), m3 = T(-1);
    DFINE_SIMD_MAX4(m0, m1, m2, m3)
    for (int j = 0; j < n; ++j) {
      const T c0 = topk_eligible(p0[j], j, pv0, pi0, first) ? p0[j] : T(-1);
      const T c1 = topk_eligible(p1[j], j, pv1, pi1, first) ? p1[j] : T(-1);
      const T c2 = topk_eligible(p2[j], j, pv2, pi2, first) ? p2[j] : T(-1);
      const T c3 = topk_eligible(p3[j], j, pv3, pi3, first) ? p3[j] : T(-1);
      m0 = c0 > m0 ? c0 : m0;
      m1 = c1 > m1 ? c1 : m1;
      m2 = c2 > m2 ? c2 : m2;
      m3 = c3 > m3 ? c3 : m3;
    }
    int f0 = n, f1 = n, f2 = n, f3 = n;
    DFINE_SIMD_MIN4(f0, f1, f2, f3)
    for (int j = 0; j < n; ++j) {
      const int c0 = (p0[j] == m0 && topk_eligible(p0[j], j, pv0, pi0, first)) ? j : n;
      const int c1 = (p1[j] == m1 && topk_eligible(p1[j], j, pv1, pi1, first)) ? j : n;
      const int c2 = (p2[j] == m2 && topk_eligible(p2[j], j, pv2, pi2, first)) ? j : n;
      const int c3 = (p3[j] == m3 && topk_eligible(p3[j], j, pv3, pi3, first)) ? j : n;
      f0 = c0 < f0 ? c0 : f0;
      f1 = c1 < f1 ? c1 : f1;
      f2 = c2 < f2 ? c2 : f2;
      f3 = c3 < f3 ? c3 : f3;
    }
    // f == n only with NaN probabilities: keep the index in range
    f0 = f0 < n ? f0 : (pi0 + 1 < n ? pi0 + 1 : 0);
    f1 = f1 < n ? f1 : (pi1 + 1 < n ? pi1 + 1 : 0);
    f2 = f2 < n ? f2 : (pi2 + 1 < n ? pi2 + 1 : 0);
    f3 = f3 < n ? f3 : (pi3 + 1 < n ? pi3 + 1 : 0);
    vals[0 * k + i] = m0, idx[0 * k + i] = f0, pv0 = m0, pi0 = f0;
    vals[1 * k + i] = m1, idx[1 * k + i] = f1, pv1 = m1, pi1 = f1;
    vals[2 * k + i] = m2, idx[2 * k + i] = f2, pv2 = m2, pi2 = f2;
    vals[3 * k + i] = m3, idx[3 * k + i] = f3, pv3 = m3, pi3 = f3;
  }
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

// One box: z = 4 * n logits (edges l, t, r, b) -> box (cx, cy, w, h), stats [4, k + 1] and the
// bins of the top-k probabilities [4, k] (kept for the backward pass, which then needs no top-k).
template <typename T>
DFINE_HD void fdr_decode_row_forward(const T* z, const T* W, int n, const T* ref, T rs, int k, T* box, T* stats,
                                     uint8_t* topk_index) {
  T p[4 * kMaxBins];
  T d[4];
  T vals[4 * kMaxTopk];
  int idx[4 * kMaxTopk];
  for (int e = 0; e < 4; ++e) d[e] = edge_softmax_expectation(z + e * n, W, n, p + e * kMaxBins);
  topk_small_4edges(p, n, k, vals, idx);
  for (int e = 0; e < 4; ++e) {
    T total = T(0);
    for (int i = 0; i < k; ++i) {
      stats[e * (k + 1) + i] = vals[e * k + i];
      topk_index[e * k + i] = static_cast<uint8_t>(idx[e * k + i]);
      total += vals[e * k + i];
    }
    stats[e * (k + 1) + k] = total / T(k);
  }
  distance_to_box(ref, d, rs, box);
}

// Gradients of one box: given d(boxes) and d(stats), write d(z) [4 * n] and d(ref) [4].
template <typename T>
DFINE_HD void fdr_decode_row_backward(const T* z, const T* W, int n, const T* ref, T rs, int k,
                                      const uint8_t* topk_index, const T* grad_box, const T* grad_stats, T* grad_z,
                                      T* grad_ref) {
  T p[4 * kMaxBins];
  T d[4];
  for (int e = 0; e < 4; ++e) d[e] = edge_softmax_expectation(z + e * n, W, n, p + e * kMaxBins);
  // box = ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)
  const T half = T(0.5) * rs;
  const T unit_w = ref[2] / rs, unit_h = ref[3] / rs;
  const T gx1 = T(0.5) * grad_box[0] - grad_box[2], gx2 = T(0.5) * grad_box[0] + grad_box[2];
  const T gy1 = T(0.5) * grad_box[1] - grad_box[3], gy2 = T(0.5) * grad_box[1] + grad_box[3];
  const T grad_d[4] = {-gx1 * unit_w, -gy1 * unit_h, gx2 * unit_w, gy2 * unit_h};
  grad_ref[0] = gx1 + gx2;
  grad_ref[1] = gy1 + gy2;
  grad_ref[2] = (gx2 * (half + d[2]) - gx1 * (half + d[0])) / rs;
  grad_ref[3] = (gy2 * (half + d[3]) - gy1 * (half + d[1])) / rs;
  // Softmax backward: gz_j = p_j * (gp_j - sum_i p_i gp_i) with gp_j = grad_d * W_j plus the top-k
  // terms t_j; sum_i p_i W_i is the expectation d already computed, so the dot product needs no
  // pass over the bins: dot = grad_d * d + sum over the top-k of p * t.
  for (int e = 0; e < 4; ++e) {
    const T* pe = p + e * kMaxBins;
    const T* gs = grad_stats + e * (k + 1);
    const uint8_t* top = topk_index + e * k;
    const T grad_mean = gs[k] / T(k);
    T dot = grad_d[e] * d[e];
    for (int i = 0; i < k; ++i) dot += pe[top[i]] * (gs[i] + grad_mean);
    T* gz = grad_z + e * n;
    const T g = grad_d[e];
    for (int j = 0; j < n; ++j) gz[j] = pe[j] * (g * W[j] - dot);
    for (int i = 0; i < k; ++i) gz[top[i]] += pe[top[i]] * (gs[i] + grad_mean);
  }
}

// FGL: the left bin is target.long() as published, kept inside [0, n - 2] so the right bin exists.
template <typename T>
DFINE_HD int fgl_left_bin(T target, int n) {
  if (!(target > T(0))) return 0;  // also NaN
  if (target >= T(n - 2)) return n - 2;
  return static_cast<int>(target);
}

// One FGL row, CE(z, a) * wl + CE(z, a + 1) * wr (without the row weight), in two steps:
// fgl_row_terms does the pass over the bins and returns the sum of exponentials S, and the shifted
// logits da = z[a] - max, db = z[a + 1] - max; the loss is then fgl_row_loss(log S, da, db, wl, wr).
// When grad_z is
// not null, fgl_row_terms also writes g * d(loss)/dz from the same exponentials (g = upstream * row
// weight). The CPU kernel takes the logarithms of several rows at once (one vector instruction
// stream instead of a logf call per row); fgl_row does both steps for one row.
template <typename T>
DFINE_HD T fgl_row_terms(const T* z, int n, T target, T wl, T wr, T g, T* grad_z, T& da, T& db) {
  T e[kMaxBins];
  T m;
  const T sum = edge_exp(z, n, e, m);
  const int a = fgl_left_bin(target, n);
  if (grad_z != nullptr) {
    const T scale = g * (wl + wr) / sum;
    for (int j = 0; j < n; ++j) grad_z[j] = scale * e[j];
    grad_z[a] -= g * wl;
    grad_z[a + 1] -= g * wr;
  }
  da = z[a] - m;
  db = z[a + 1] - m;
  return sum;
}

template <typename T>
DFINE_HD T fgl_row_loss(T log_sum, T da, T db, T wl, T wr) {
  return (log_sum - da) * wl + (log_sum - db) * wr;
}

template <typename T>
DFINE_HD T fgl_row(const T* z, int n, T target, T wl, T wr, T g, T* grad_z) {
  T da, db;
  const T sum = fgl_row_terms(z, n, target, wl, wr, g, grad_z, da, db);
  return fgl_row_loss(log_sum_exp_total(sum), da, db, wl, wr);
}

// One DDF row, T^2 * sum_j p_j (log p_j - log q_j) with p = softmax(teacher / T) and
// q = softmax(pred / T), terms with p_j = 0 counting 0, in two steps like the FGL row:
// ddf_row_terms does the pass over the bins and returns the sums of exponentials of the student
// (sum_a) and of the teacher (sum_b), sum_p = sum_j p_j and kl_shifted = sum_j p_j (b_j - a_j) over
// the max-shifted scaled logits a_j = zs_j / T - max_a, b_j = zt_j / T - max_b; then
// log p_j - log q_j = (b_j - a_j) - (log sum_b - log sum_a), and ddf_row_loss adds the logarithms.
// When pred == teacher both parts are exactly 0 (identical code on identical inputs). When grad_z
// is not null, ddf_row_terms writes g * d(loss)/d(pred) = g * T * (q_j * sum(p) - p_j).
template <typename T>
DFINE_HD void ddf_row_terms(const T* zs, const T* zt, int n, T temperature, T g, T* grad_z, T& sum_a, T& sum_b,
                            T& kl_shifted, T& sum_p) {
  T ea[kMaxBins], eb[kMaxBins];
  const T inv_t = T(1) / temperature;
  // max(z * inv_t) == max(z) * inv_t exactly (rounding is monotone), so the scaled logits are
  // never stored: zs_j * inv_t and zt_j * inv_t are recomputed where needed.
  T max_s = zs[0], max_t = zt[0];
  DFINE_SIMD_MAX2(max_s, max_t)
  for (int j = 1; j < n; ++j) {
    max_s = zs[j] > max_s ? zs[j] : max_s;
    max_t = zt[j] > max_t ? zt[j] : max_t;
  }
  const T max_a = max_s * inv_t, max_b = max_t * inv_t;
  T sa = T(0), sb = T(0);
  DFINE_SIMD_SUM2(sa, sb)
  for (int j = 0; j < n; ++j) {
    const T va = exp_nonpos(zs[j] * inv_t - max_a);
    const T vb = exp_nonpos(zt[j] * inv_t - max_b);
    ea[j] = va;
    eb[j] = vb;
    sa += va;
    sb += vb;
  }
  const T inv_a = T(1) / sa, inv_b = T(1) / sb;
  T kl = T(0), sp = T(0);
  DFINE_SIMD_SUM2(kl, sp)
  for (int j = 0; j < n; ++j) {
    const T p = eb[j] * inv_b;
    const T shifted_ratio = (zt[j] * inv_t - max_b) - (zs[j] * inv_t - max_a);
    kl += p > T(0) ? p * shifted_ratio : T(0);
    sp += p;
  }
  if (grad_z != nullptr) {
    const T scale = g * temperature;
    for (int j = 0; j < n; ++j) grad_z[j] = scale * (ea[j] * inv_a * sp - eb[j] * inv_b);
  }
  sum_a = sa;
  sum_b = sb;
  kl_shifted = kl;
  sum_p = sp;
}

template <typename T>
DFINE_HD T ddf_row_loss(T log_sum_a, T log_sum_b, T kl_shifted, T sum_p, T temperature) {
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
