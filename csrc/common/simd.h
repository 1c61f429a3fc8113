// Width-generic SIMD vectors for the CPU kernels: the GCC/Clang vector extension
// (__attribute__((vector_size(N)))), no intrinsics. The same source compiles to SSE2 in the
// baseline copy of a kernel and to AVX2 in its AVX2 copy (common/cpu_features.h).
//
// Besides loads and stores, this header holds the lane versions of the few operations that
// fdr_math.h's element-wise templates need beyond arithmetic and ?: (truncation, powers of two,
// exponent splitting, per-lane table look-ups); their scalar versions are in fdr_math.h.
// (at::vec::Vectorized needs torch's per-CPU-capability build to get real vector code; in an
// extension built for baseline x86-64 it is a plain array.)
#pragma once

#if defined(__CUDACC__)
#error "common/simd.h is for the CPU sources only"
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "common/macros.h"

#if defined(__GNUC__) && !defined(__clang__)
// Helpers take and return 32-byte vectors; they are always inlined, so no call ABI is involved.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace dfine {
namespace simd {

template <typename T, int W>
struct VecOf {
  typedef T type __attribute__((vector_size(W * sizeof(T))));
};
// W lanes of T.
template <typename T, int W>
using Vec = typename VecOf<T, W>::type;

// GCC vector types (subscriptable values that are neither pointers nor arrays).
template <typename V>
concept IsVec = requires(V v) { v[0]; } && !std::is_pointer_v<V> && !std::is_array_v<V>;

template <typename V>
using Elem = std::remove_cvref_t<decltype(std::declval<V>()[0])>;

template <typename V>
constexpr int kWidth = static_cast<int>(sizeof(V) / sizeof(Elem<V>));

// The integer vector of the same shape (what comparisons of V return).
template <typename V>
using IntVec = Vec<std::conditional_t<sizeof(Elem<V>) == 4, int32_t, int64_t>, kWidth<V>>;

template <typename V>
DFINE_FORCE_INLINE V load(const Elem<V>* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
DFINE_FORCE_INLINE void store(Elem<V>* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// The first `count` lanes from p, the others `fill`.
template <typename V>
DFINE_FORCE_INLINE V load_partial(const Elem<V>* p, int count, Elem<V> fill) {
  if (count == kWidth<V>) return load<V>(p);
  V v = V{} + fill;
  for (int i = 0; i < count; ++i) v[i] = p[i];
  return v;
}

template <typename V>
DFINE_FORCE_INLINE void store_partial(Elem<V>* p, int count, const V& v) {
  if (count == kWidth<V>) return store(p, v);
  for (int i = 0; i < count; ++i) p[i] = v[i];
}

template <typename V>
DFINE_FORCE_INLINE Elem<V> sum_lanes(const V& v) {
  Elem<V> s = Elem<V>(0);
  for (int i = 0; i < kWidth<V>; ++i) s += v[i];
  return s;
}

// ---- transposes: W vectors of W lanes, r[i][j] <-> r[j][i] --------------------------------------

template <typename V, int... I>
DFINE_FORCE_INLINE V shuffle2(const V& a, const V& b, std::integer_sequence<int, I...>) {
  return __builtin_shuffle(a, b, IntVec<V>{I...});
}

// 8 x 8 in the three steps that map onto single AVX instructions (unpack, shufps, vperm2f128):
// GCC recognises the constant shuffle patterns.
template <typename V>
DFINE_FORCE_INLINE void transpose8(V* r) {
  using std::integer_sequence;
  using lo = integer_sequence<int, 0, 8, 1, 9, 4, 12, 5, 13>;
  using hi = integer_sequence<int, 2, 10, 3, 11, 6, 14, 7, 15>;
  using even = integer_sequence<int, 0, 1, 8, 9, 4, 5, 12, 13>;
  using odd = integer_sequence<int, 2, 3, 10, 11, 6, 7, 14, 15>;
  using first = integer_sequence<int, 0, 1, 2, 3, 8, 9, 10, 11>;
  using second = integer_sequence<int, 4, 5, 6, 7, 12, 13, 14, 15>;
  V t[8], u[8];
  for (int k = 0; k < 4; ++k) {
    t[2 * k] = shuffle2(r[2 * k], r[2 * k + 1], lo{});
    t[2 * k + 1] = shuffle2(r[2 * k], r[2 * k + 1], hi{});
  }
  for (int k = 0; k < 2; ++k) {
    for (int h = 0; h < 2; ++h) {
      u[4 * k + 2 * h] = shuffle2(t[4 * k + h], t[4 * k + 2 + h], even{});
      u[4 * k + 2 * h + 1] = shuffle2(t[4 * k + h], t[4 * k + 2 + h], odd{});
    }
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = shuffle2(u[i], u[4 + i], first{});
    r[4 + i] = shuffle2(u[i], u[4 + i], second{});
  }
}

// Any power-of-two W: log2(W) rounds of interleaving rows k and k + W/2 (each round rotates the
// bits of the element index (row, column) by one, so after log2(W) rounds row and column swap).
template <typename V, int... I>
DFINE_FORCE_INLINE V interleave(const V& a, const V& b, int half, std::integer_sequence<int, I...>) {
  constexpr int W = sizeof...(I);
  return half == 0 ? __builtin_shuffle(a, b, IntVec<V>{((I % 2) ? W + I / 2 : I / 2)...})
                   : __builtin_shuffle(a, b, IntVec<V>{((I % 2) ? W + W / 2 + I / 2 : W / 2 + I / 2)...});
}

template <typename V>
DFINE_FORCE_INLINE void transpose(V* r) {
  constexpr int W = kWidth<V>;
  static_assert((W & (W - 1)) == 0, "transpose: the width must be a power of two");
  if constexpr (W == 8) {
    transpose8(r);
  } else {
    using lanes = std::make_integer_sequence<int, W>;
    for (int round = 1; round < W; round *= 2) {
      V t[W];
      for (int k = 0; k < W / 2; ++k) {
        t[2 * k] = interleave(r[k], r[k + W / 2], 0, lanes{});
        t[2 * k + 1] = interleave(r[k], r[k + W / 2], 1, lanes{});
      }
      for (int k = 0; k < W; ++k) r[k] = t[k];
    }
  }
}

// out[j][i] = bin j of row i, for the `count` <= W rows at rows + i * n (n bins each, contiguous);
// the lanes of missing rows are 0.
template <typename V>
DFINE_FORCE_INLINE void load_transposed(const Elem<V>* rows, int n, int count, V* out) {
  constexpr int W = kWidth<V>;
  Elem<V> padded[W * 64];  // n <= 64 (fdr_math.h kMaxBins)
  if (count < W) {
    std::memset(padded, 0, sizeof(Elem<V>) * W * n);
    std::memcpy(padded, rows, sizeof(Elem<V>) * count * n);
    rows = padded;
  }
  int j = 0;
  for (; j + W <= n; j += W) {
    V* block = out + j;
    for (int i = 0; i < W; ++i) block[i] = load<V>(rows + i * n + j);
    transpose(block);
  }
  for (; j < n; ++j) {
    for (int i = 0; i < W; ++i) out[j][i] = rows[i * n + j];
  }
}

// The inverse: rows + i * n (i < count) = bin j of lane i of in[j]. Clobbers in.
template <typename V>
DFINE_FORCE_INLINE void store_transposed(V* in, int n, int count, Elem<V>* rows) {
  constexpr int W = kWidth<V>;
  Elem<V> padded[W * 64];
  Elem<V>* dst = count < W ? padded : rows;
  int j = 0;
  for (; j + W <= n; j += W) {
    V* block = in + j;
    transpose(block);
    for (int i = 0; i < W; ++i) store(dst + i * n + j, block[i]);
  }
  for (; j < n; ++j) {
    for (int i = 0; i < W; ++i) dst[i * n + j] = in[j][i];
  }
  if (count < W) std::memcpy(rows, padded, sizeof(Elem<V>) * count * n);
}

// ---- lane versions of fdr_math.h's scalar helpers ------------------------------------------------

// Truncation towards zero (|x| < 2^31), as an integer-valued V.
template <typename V>
  requires IsVec<V>
DFINE_FORCE_INLINE V trunc_int(V x) {
  return __builtin_convertvector(__builtin_convertvector(x, IntVec<V>), V);
}

// poly * 2^n for integer-valued float lanes n in [-126, 127].
template <typename V>
  requires IsVec<V>
DFINE_FORCE_INLINE V times_pow2(V poly, V n) {
  static_assert(sizeof(Elem<V>) == 4, "times_pow2: float lanes only");
  const IntVec<V> bits = (__builtin_convertvector(n, IntVec<V>) + 127) << 23;
  return poly * (V)bits;  // a vector cast reinterprets the bits
}

// x = m * 2^e with m in [0.5, 1), for positive normal float lanes; returns m, writes e.
template <typename V>
  requires IsVec<V>
DFINE_FORCE_INLINE V split_exponent(V x, V& e) {
  static_assert(sizeof(Elem<V>) == 4, "split_exponent: float lanes only");
  const IntVec<V> bits = (IntVec<V>)x;
  e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, V);
  const IntVec<V> mbits = (bits & 0x007fffff) | 0x3f000000;
  return (V)mbits;
}

// table[bin[i]][i] for every lane i (table: one vector per bin, bin: integer-valued lanes).
template <typename V>
  requires IsVec<V>
DFINE_FORCE_INLINE V lane_lookup(const V* table, V bin) {
  V out;
  for (int i = 0; i < kWidth<V>; ++i) out[i] = table[static_cast<int>(bin[i])][i];
  return out;
}

// table[bin[i]][i] += value[i] for every lane i, over the n vectors of table: by a compare per
// vector rather than scalar stores into the vectors, which would stall their next vector loads
// (store forwarding). Adding 0 elsewhere leaves the values as they are.
template <typename V>
  requires IsVec<V>
DFINE_FORCE_INLINE void lane_add_at(V* table, int n, V bin, V value) {
  for (int j = 0; j < n; ++j) table[j] += bin == static_cast<Elem<V>>(j) ? value : V{};
}

}  // namespace simd

using simd::lane_add_at;
using simd::lane_lookup;
using simd::split_exponent;
using simd::times_pow2;
using simd::trunc_int;

}  // namespace dfine
