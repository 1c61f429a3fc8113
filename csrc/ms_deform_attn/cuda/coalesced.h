// The CUDA kernels of multi-scale deformable attention, written once as warp bodies
// (__host__ __device__, over the lanes of warp_lanes.h) and as the host code that plans and launches
// them. ms_deform_attn_cuda.cu runs them on the GPU; emulated_warps.cpp runs the very same bodies
// and host code on the CPU over emulated warps (torch.ops.dfine_testing.*), which is how the tests
// check them without a GPU. Design and memory traffic: docs/kernels.md, "The CUDA kernels of
// ms_deform_attn".
//
// Layout: a *group* of G lanes (a power of two <= 32) owns one (b, q, m) row, i.e. the D channels
// of one query and head; lane j of the group covers the channels [j * V, j * V + V) of every
// V * G wide round (V = 1, 2, 4 or 8 channels per vector load, at most 16 bytes). A warp holds
// 32 / G groups. Per point the corners and weights are computed once, by one lane of the group
// (points are dealt to the lanes G at a time), and broadcast to the group with shuffles.
//
// Forward: per point, every lane loads its vector of the four corner rows (coalesced: the group
//   reads D contiguous channels of each corner row) and accumulates in registers; one vector store.
// Backward: per point, lanes load their vector of the four corner rows and form partial dot
//   products with grad_out; the four dots are summed over the group with a shuffle butterfly (a
//   fixed order: grad_sampling_locations and grad_attention_weights are deterministic) and the
//   lane that owns the point turns them into its gradients (ms_deform_attn_math.h's point_grads).
//   grad_value, by default, is accumulated with atomics; consecutive lanes add to consecutive
//   channels (the "strided" layout below), so a warp's atomics hit few 32-byte sectors.
// Deterministic backward (torch.use_deterministic_algorithms): pass 1 is the same kernel without
//   the atomics; the owner lane writes, for each corner of its point, the coefficient
//   attn * weight and the value row it lands on (key). The keys are sorted (stable, so ties keep
//   the (b, q, m, p, corner) order) and pass 2 gathers: a group per value row sums
//   coefficient * grad_out over the row's entries in sorted order and writes grad_value once.
//   The summation order depends on the inputs only, not on the launch or on scheduling.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>

#include "ms_deform_attn/ms_deform_attn.h"
#include "ms_deform_attn/ms_deform_attn_math.h"
#include "ms_deform_attn/cuda/warp_lanes.h"

namespace dfine {
namespace msda {
namespace coalesced {

using lanes::kWarpSize;

// Per-level point counts, passed to the kernels by value.
struct PointsPerLevel {
  int count[kMaxLevels];
  int num_levels;
};

// How the lanes of a warp cover the channels of one (b, q, m) row.
struct Layout {
  int vec;     // V: channels per vector load (1, 2, 4, 8), V * sizeof(S) <= 16, D % V == 0
  int group;   // G: lanes per row, a power of two <= 32
  int rounds;  // passes over the channels: ceil(D / (V * G))
};

// The sizes and inputs the bodies read.
template <typename S>
struct Inputs {
  const S* value;              // [B, S, M, D]
  const int64_t* shapes;       // [L, 2] (H, W), read on the device
  const S* loc;                // [B, Q, M, P, 2]
  const S* attn;               // [B, Q, M, P]
  int64_t B, S_len, M, D, Q, P;
  PointsPerLevel ppl;
  Layout layout;

  DFINE_HD int64_t rows() const { return B * Q * M; }  // (b, q, m) rows
};

template <typename S>
using acc_t = at::opmath_type<S>;

// What the backward bodies write.
template <typename S>
struct Grads {
  using A = acc_t<S>;
  const S* grad_out;  // [B, Q, M * D]
  A* grad_value;      // [B, S, M, D] in A, atomics (default backward); null in deterministic pass 1
  S* grad_loc;        // [B, Q, M, P, 2]
  S* grad_attn;       // [B, Q, M, P]
  A* coef;            // deterministic pass 1: [B, Q, M, P, 4] attn * corner weight
  int64_t* key;       // deterministic pass 1: [B, Q, M, P, 4] value row (b * S + s) * M + m, or no_key
  int64_t no_key;     // B * S * M: the key of corners outside the map (sorts last)
};

// What the gather pass (deterministic pass 2) reads and writes.
template <typename S>
struct Gather {
  using A = acc_t<S>;
  const S* grad_out;       // [B, Q, M * D]
  const A* coef;           // [B * Q * M * P * 4]
  const int64_t* order;    // entries sorted by key (stable)
  const int64_t* starts;   // [B * S * M + 1]: first sorted entry of every value row
  S* grad_value;           // [B, S, M, D]
  int64_t value_rows, D, P;
  Layout layout;
};

// ---- per-lane steps --------------------------------------------------------------------------

// One sampling point as its owner lane sees it.
template <typename A>
struct PointSlot {
  BilinearCorners<A> corners;
  int pos[4];   // flat position of each corner in S (level start + y * W + x), -1 outside the map
  A coef[4];    // attn * corner weight
  A attn;
  int H, W;
  bool live;    // (b, q, m, p) exists
};

// Corners and weights of point p of row bqm (a lane's share of the per-point work).
template <typename S, typename A = acc_t<S>>
DFINE_HD void setup_point(const Inputs<S>& in, int64_t bqm, int64_t p, PointSlot<A>& s) {
  s.live = bqm < in.rows() && p < in.P;
  s.attn = A(0);
  s.H = s.W = 1;
  DFINE_UNROLL
  for (int k = 0; k < 4; ++k) {
    s.pos[k] = -1;
    s.coef[k] = A(0);
  }
  if (!s.live) {
    bilinear_corners<A>(A(-2), A(-2), 1, 1, s.corners);  // nothing inside: zero weights
    return;
  }
  // The level of p and where it starts in S. Unrolled over kMaxLevels so that count[l] has a
  // constant index (a dynamic one would put the whole argument struct in local memory).
  int level = 0, first = 0;
  int64_t start = 0;
  bool found = false;
  DFINE_UNROLL
  for (int l = 0; l < kMaxLevels; ++l) {
    if (found || l >= in.ppl.num_levels) continue;
    // spatial_shapes is read on the device only (no sync): a level outside value stops the kernel
    // (an error at the next synchronisation), never an out-of-bounds read. The host checks CPU calls.
    CUDA_KERNEL_ASSERT(level_fits(in.shapes[2 * l], in.shapes[2 * l + 1], start, in.S_len));
    level = l;
    if (p < first + in.ppl.count[l]) {
      found = true;
    } else {
      first += in.ppl.count[l];
      start += in.shapes[2 * l] * in.shapes[2 * l + 1];
    }
  }
  s.H = static_cast<int>(in.shapes[2 * level]);
  s.W = static_cast<int>(in.shapes[2 * level + 1]);
  const int64_t i = bqm * in.P + p;
  s.attn = static_cast<A>(in.attn[i]);
  bilinear_corners<A>(static_cast<A>(in.loc[2 * i]), static_cast<A>(in.loc[2 * i + 1]), s.H, s.W, s.corners);
  DFINE_UNROLL
  for (int k = 0; k < 4; ++k) {
    s.pos[k] = s.corners.valid[k] ? static_cast<int>(start) + s.corners.offset[k] : -1;
    s.coef[k] = s.attn * s.corners.weight[k];
  }
}

// ---- warp bodies -----------------------------------------------------------------------------

// Lane `lane` of a group reads from lane j of its own group.
struct FromGroupLane {
  int group, j;
  DFINE_HD int operator()(int lane) const { return (lane & ~(group - 1)) + j; }
};

struct XorLane {
  int mask;
  DFINE_HD int operator()(int lane) const { return lane ^ mask; }
};

template <typename Warp, typename T>
using VarOf = typename Warp::template Var<T>;

// The corner positions and coefficients of a batch's points, as shuffle sources.
template <typename Warp, typename A>
struct BatchSources {
  VarOf<Warp, int> pos[4];
  VarOf<Warp, A> coef[4];

  DFINE_HD void take(const Warp& w, const VarOf<Warp, PointSlot<A>>& slot) {
    w.for_lanes([&](int lane) {
      DFINE_UNROLL
      for (int k = 0; k < 4; ++k) {
        pos[k][lane] = slot[lane].pos[k];
        coef[k][lane] = slot[lane].coef[k];
      }
    });
  }
};

// The first (b, q, m) row of warp item `item` plus the lane's group.
DFINE_HD int64_t row_of_lane(int64_t item, int group, int lane) {
  return item * (kWarpSize / group) + lane / group;
}

// The bodies take their argument structs by value: on the GPU a reference would be the address of
// the kernel parameter, which nvcc then copies to local memory (and loads through generic pointers).

// Forward of the rows of warp item `item`: out [B, Q, M * D].
template <typename Warp, int V, typename S>
DFINE_HD void forward_warp(const Warp& w, const Inputs<S> in, S* out, int64_t item) {
  using A = acc_t<S>;
  const int G = in.layout.group;
  const int64_t C = in.D / V;  // vectors per row
  const int64_t rows = in.rows();
  const int64_t P = in.P;
  VarOf<Warp, int64_t> bqm, row0;  // the lane's (b, q, m) row; value row of (b, position 0, m)
  w.for_lanes([&](int lane) {
    bqm[lane] = row_of_lane(item, G, lane);
    row0[lane] = (bqm[lane] / (in.Q * in.M)) * in.S_len * in.M + bqm[lane] % in.M;
  });
  for (int r = 0; r < in.layout.rounds; ++r) {
    VarOf<Warp, A> acc[V];
    w.for_lanes([&](int lane) {
      DFINE_UNROLL
      for (int v = 0; v < V; ++v) acc[v][lane] = A(0);
    });
    for (int64_t p0 = 0; p0 < P; p0 += G) {
      VarOf<Warp, PointSlot<A>> slot;
      w.for_lanes([&](int lane) { setup_point(in, bqm[lane], p0 + (lane & (G - 1)), slot[lane]); });
      BatchSources<Warp, A> src;
      src.take(w, slot);
      const int batch = static_cast<int>(P - p0 < G ? P - p0 : G);
      for (int j = 0; j < batch; ++j) {
        const FromGroupLane from{G, j};
        VarOf<Warp, int> pos[4];
        VarOf<Warp, A> coef[4];
        DFINE_UNROLL
        for (int k = 0; k < 4; ++k) {
          pos[k] = w.shuffle(src.pos[k], from);
          coef[k] = w.shuffle(src.coef[k], from);
        }
        w.for_lanes([&](int lane) {
          const int64_t c = (lane & (G - 1)) + static_cast<int64_t>(r) * G;
          if (bqm[lane] >= rows || c >= C) return;
          const S* base = in.value + row0[lane] * in.D + c * V;
          bool any_inside = false;
          DFINE_UNROLL
          for (int k = 0; k < 4; ++k) {
            if (pos[k][lane] < 0) continue;  // outside the map: not read (0 * inf would be NaN)
            any_inside = true;
            A x[V];
            lanes::load_vec<V>(base + static_cast<int64_t>(pos[k][lane]) * in.M * in.D, x);
            DFINE_UNROLL
            for (int v = 0; v < V; ++v) acc[v][lane] += coef[k][lane] * x[v];
          }
          // A point with no corner inside adds attn * outside_sample: 0, or NaN for a non-finite
          // location or attention weight (ms_deform_attn_math.h), which is coef[0].
          if (!any_inside && !(coef[0][lane] == A(0))) {
            DFINE_UNROLL
            for (int v = 0; v < V; ++v) acc[v][lane] += coef[0][lane];
          }
        });
      }
    }
    w.for_lanes([&](int lane) {
      const int64_t c = (lane & (G - 1)) + static_cast<int64_t>(r) * G;
      if (bqm[lane] >= rows || c >= C) return;
      A vals[V];
      DFINE_UNROLL
      for (int v = 0; v < V; ++v) vals[v] = acc[v][lane];
      lanes::store_vec<V>(out + bqm[lane] * in.D + c * V, vals);
    });
  }
}

// Backward of the rows of warp item `item`. kDeterministic: pass 1 of the deterministic backward
// (coefficients and keys instead of the atomics on grad_value).
template <typename Warp, int V, bool kDeterministic, typename S>
DFINE_HD void backward_warp(const Warp& w, const Inputs<S> in, const Grads<S> g, int64_t item) {
  using A = acc_t<S>;
  const int G = in.layout.group;
  const int64_t D = in.D, C = D / V;
  const int64_t rows = in.rows();
  const int64_t P = in.P;
  VarOf<Warp, int64_t> bqm, row0;  // the lane's (b, q, m) row; value row of (b, position 0, m)
  w.for_lanes([&](int lane) {
    bqm[lane] = row_of_lane(item, G, lane);
    row0[lane] = (bqm[lane] / (in.Q * in.M)) * in.S_len * in.M + bqm[lane] % in.M;
  });
  for (int64_t p0 = 0; p0 < P; p0 += G) {
    VarOf<Warp, PointSlot<A>> slot;
    w.for_lanes([&](int lane) { setup_point(in, bqm[lane], p0 + (lane & (G - 1)), slot[lane]); });
    BatchSources<Warp, A> src;
    src.take(w, slot);
    const int batch = static_cast<int>(P - p0 < G ? P - p0 : G);
    VarOf<Warp, A> dots[4];  // the owner lane's totals for its point
    w.for_lanes([&](int lane) {
      DFINE_UNROLL
      for (int k = 0; k < 4; ++k) dots[k][lane] = A(0);
    });
    for (int r = 0; r < in.layout.rounds; ++r) {
      // grad_out of the lane's channels twice: as one vector (for the dots with the value
      // vectors) and strided, channel r * G * V + t * G + j for t < V (for the atomics: the G
      // lanes of a group then add to G consecutive channels at each step t).
      VarOf<Warp, A> go_vec[V], go_str[V];
      w.for_lanes([&](int lane) {
        const int64_t c = (lane & (G - 1)) + static_cast<int64_t>(r) * G;
        const bool row_ok = bqm[lane] < rows;
        const S* go = g.grad_out + (row_ok ? bqm[lane] : 0) * D;
        A x[V];
        if (row_ok && c < C) {
          lanes::load_vec<V>(go + c * V, x);
        } else {
          DFINE_UNROLL
          for (int v = 0; v < V; ++v) x[v] = A(0);
        }
        DFINE_UNROLL
        for (int v = 0; v < V; ++v) {
          go_vec[v][lane] = x[v];
          const int64_t e = static_cast<int64_t>(r) * G * V + static_cast<int64_t>(v) * G + (lane & (G - 1));
          go_str[v][lane] = row_ok && e < D ? static_cast<A>(go[e]) : A(0);
        }
      });
      for (int j = 0; j < batch; ++j) {
        const FromGroupLane from{G, j};
        VarOf<Warp, int> pos[4];
        VarOf<Warp, A> coef[4];
        DFINE_UNROLL
        for (int k = 0; k < 4; ++k) {
          pos[k] = w.shuffle(src.pos[k], from);
          coef[k] = w.shuffle(src.coef[k], from);
        }
        VarOf<Warp, A> part[4];
        w.for_lanes([&](int lane) {
          DFINE_UNROLL
          for (int k = 0; k < 4; ++k) part[k][lane] = A(0);
          if (bqm[lane] >= rows) return;
          const int64_t c = (lane & (G - 1)) + static_cast<int64_t>(r) * G;
          if (pos[0][lane] < 0 && pos[1][lane] < 0 && pos[2][lane] < 0 && pos[3][lane] < 0) {
            // No corner inside: the dots are <grad_out, 0> (zero_row_dot), 0 unless grad_out holds
            // a NaN or an infinity, summed over the group like any dot.
            A zero = A(0);
            DFINE_UNROLL
            for (int v = 0; v < V; ++v) zero += go_vec[v][lane] * A(0);
            DFINE_UNROLL
            for (int k = 0; k < 4; ++k) part[k][lane] = zero;
            return;
          }
          DFINE_UNROLL
          for (int k = 0; k < 4; ++k) {
            if (pos[k][lane] < 0) continue;
            const int64_t row = row0[lane] + static_cast<int64_t>(pos[k][lane]) * in.M;
            if (c < C) {
              A x[V];
              lanes::load_vec<V>(in.value + row * D + c * V, x);
              A dot = A(0);
              DFINE_UNROLL
              for (int v = 0; v < V; ++v) dot += go_vec[v][lane] * x[v];
              part[k][lane] = dot;
            }
            if constexpr (!kDeterministic) {
              DFINE_UNROLL
              for (int v = 0; v < V; ++v) {
                const int64_t e = static_cast<int64_t>(r) * G * V + static_cast<int64_t>(v) * G + (lane & (G - 1));
                if (e < D) w.atomic_add(g.grad_value + row * D + e, coef[k][lane] * go_str[v][lane]);
              }
            }
          }
        });
        // The group's sum of each dot, in every lane of the group (butterfly: fixed order).
        for (int mask = G / 2; mask > 0; mask /= 2) {
          DFINE_UNROLL
          for (int k = 0; k < 4; ++k) {
            const VarOf<Warp, A> other = w.shuffle(part[k], XorLane{mask});
            w.for_lanes([&](int lane) { part[k][lane] += other[lane]; });
          }
        }
        w.for_lanes([&](int lane) {
          if ((lane & (G - 1)) != j) return;
          DFINE_UNROLL
          for (int k = 0; k < 4; ++k) dots[k][lane] += part[k][lane];
        });
      }
    }
    // Every owner lane writes the gradients of its point (G consecutive points per group).
    w.for_lanes([&](int lane) {
      const PointSlot<A>& s = slot[lane];
      if (!s.live) return;
      const int64_t i = bqm[lane] * P + p0 + (lane & (G - 1));
      A d[4];
      DFINE_UNROLL
      for (int k = 0; k < 4; ++k) d[k] = dots[k][lane];
      const PointGrads<A> pg = point_grads<A>(s.corners, s.H, s.W, d, s.attn);
      g.grad_attn[i] = static_cast<S>(pg.attn);
      g.grad_loc[2 * i] = static_cast<S>(pg.loc_x);
      g.grad_loc[2 * i + 1] = static_cast<S>(pg.loc_y);
      if constexpr (kDeterministic) {
        DFINE_UNROLL
        for (int k = 0; k < 4; ++k) {
          g.coef[4 * i + k] = s.coef[k];
          g.key[4 * i + k] = s.pos[k] < 0 ? g.no_key : row0[lane] + static_cast<int64_t>(s.pos[k]) * in.M;
        }
      }
    });
  }
}

// Pass 2 of the deterministic backward for the value rows of warp item `item`: grad_value of a
// row = sum over its sorted entries of coefficient * grad_out row (in the sorted order).
template <typename Warp, int V, typename S>
DFINE_HD void gather_warp(const Warp& w, const Gather<S> a, int64_t item) {
  using A = acc_t<S>;
  const int G = a.layout.group;
  const int64_t C = a.D / V;
  for (int r = 0; r < a.layout.rounds; ++r) {
    w.for_lanes([&](int lane) {
      const int64_t row = row_of_lane(item, G, lane);
      const int64_t c = (lane & (G - 1)) + static_cast<int64_t>(r) * G;
      if (row >= a.value_rows || c >= C) return;
      A acc[V];
      DFINE_UNROLL
      for (int v = 0; v < V; ++v) acc[v] = A(0);
      for (int64_t e = a.starts[row]; e < a.starts[row + 1]; ++e) {
        const int64_t entry = a.order[e];
        const A coef = a.coef[entry];
        const int64_t bqm = entry / (4 * a.P);
        A x[V];
        lanes::load_vec<V>(a.grad_out + bqm * a.D + c * V, x);
        DFINE_UNROLL
        for (int v = 0; v < V; ++v) acc[v] += coef * x[v];
      }
      lanes::store_vec<V>(a.grad_value + row * a.D + c * V, acc);
    });
  }
}

// ---- host side: layout, dispatch and the sequence of launches ------------------------------------

// The largest vector width (in elements of elem_size bytes, a power of two <= 16 bytes) that every
// pointer is aligned to.
inline int aligned_vec(std::initializer_list<const void*> pointers, int elem_size) {
  int vec = 16 / elem_size;
  for (const void* p : pointers) {
    const auto address = reinterpret_cast<std::uintptr_t>(p);
    while (vec > 1 && address % (static_cast<std::uintptr_t>(vec) * elem_size) != 0) vec /= 2;
  }
  return std::max(vec, 1);
}

// The layout for D channels of elem_size bytes whose pointers allow vectors of up to max_vec
// elements. forced_vec / forced_group (> 0) override the choice (tests); they must be valid.
inline Layout choose_layout(int64_t D, int elem_size, int max_vec, int64_t forced_vec = 0,
                            int64_t forced_group = 0) {
  TORCH_CHECK(D >= 1, "ms_deform_attn CUDA layout: D must be >= 1, got ", D);
  int vec = 1;
  if (forced_vec > 0) {
    TORCH_CHECK(forced_vec <= 8 && (forced_vec & (forced_vec - 1)) == 0 && forced_vec * elem_size <= 16 &&
                    D % forced_vec == 0 && forced_vec <= max_vec,
                "ms_deform_attn CUDA layout: vec=", forced_vec, " is not a valid vector width for D=", D,
                " and ", elem_size, "-byte elements aligned to ", max_vec, " elements");
    vec = static_cast<int>(forced_vec);
  } else {
    for (int v = 8; v > 1; v /= 2) {
      if (v * elem_size <= 16 && D % v == 0 && v <= max_vec) {
        vec = v;
        break;
      }
    }
  }
  const int64_t vectors = D / vec;
  int group = 1;
  if (forced_group > 0) {
    TORCH_CHECK(forced_group <= kWarpSize && (forced_group & (forced_group - 1)) == 0,
                "ms_deform_attn CUDA layout: group=", forced_group, " must be a power of two <= 32");
    group = static_cast<int>(forced_group);
  } else {
    while (group < kWarpSize && group < vectors) group *= 2;
  }
  const int rounds = static_cast<int>((vectors + group - 1) / group);
  return Layout{vec, group, rounds};
}

inline PointsPerLevel make_points_per_level(const char* op, at::IntArrayRef num_points_list) {
  TORCH_CHECK(static_cast<int64_t>(num_points_list.size()) <= kMaxLevels, op, ": the CUDA kernel supports at most ",
              kMaxLevels, " levels, got num_points_list with ", num_points_list.size(), " entries");
  PointsPerLevel ppl{};
  ppl.num_levels = static_cast<int>(num_points_list.size());
  for (int l = 0; l < ppl.num_levels; ++l) ppl.count[l] = static_cast<int>(num_points_list[l]);
  return ppl;
}

// Calls f(std::integral_constant<int, V>{}) for the layout's vector width (only widths that fit
// 16 bytes of S are instantiated).
template <typename S, typename F>
void dispatch_vec(int vec, F&& f) {
  switch (vec) {
    case 8:
      if constexpr (8 * sizeof(S) <= 16) return f(std::integral_constant<int, 8>{});
      break;
    case 4:
      if constexpr (4 * sizeof(S) <= 16) return f(std::integral_constant<int, 4>{});
      break;
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 1:
      return f(std::integral_constant<int, 1>{});
  }
  TORCH_CHECK(false, "ms_deform_attn CUDA: no kernel for vector width ", vec);
}

// Warp items (work units of one warp) for `rows` rows of the layout.
inline int64_t warp_items(int64_t rows, const Layout& layout) {
  const int64_t per_warp = kWarpSize / layout.group;
  return (rows + per_warp - 1) / per_warp;
}

// Whether the backward takes the deterministic two-pass gather: under
// torch.use_deterministic_algorithms(True), also with warn_only=True (what train.py --deterministic sets).
inline bool deterministic_backward() { return at::globalContext().deterministicAlgorithms(); }

// Options of a call that only tests set (the layout and, emulated, the order of the warps).
struct Overrides {
  int64_t vec = 0, group = 0;
};

template <typename S>
Inputs<S> make_inputs(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& loc, const at::Tensor& attn,
                      const Dims& d, const PointsPerLevel& ppl, const Layout& layout) {
  return Inputs<S>{value.const_data_ptr<S>(), shapes.const_data_ptr<int64_t>(), loc.const_data_ptr<S>(),
                   attn.const_data_ptr<S>(), d.B, d.S, d.M, d.D, d.Q, d.P, ppl, layout};
}

// The forward op on `launch` (CudaLaunch in ms_deform_attn_cuda.cu, EmulatedLaunch in
// emulated_warps.cpp). The inputs are checked by the caller.
template <typename Launch>
at::Tensor forward(const Launch& launch, const char* op, const at::Tensor& value, const at::Tensor& spatial_shapes,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                   at::IntArrayRef num_points_list, const Dims& dims, const Overrides& overrides = {}) {
  const PointsPerLevel ppl = make_points_per_level(op, num_points_list);
  TORCH_CHECK(dims.S <= std::numeric_limits<int>::max(), op, ": value has S=", dims.S,
              " positions; the CUDA kernel supports at most 2^31 - 1");
  if (dims.B * dims.Q * dims.M * dims.D == 0) return at::zeros({dims.B, dims.Q, dims.M * dims.D}, value.options());
  const at::Tensor value_c = value.contiguous(), shapes_c = spatial_shapes.contiguous();
  const at::Tensor loc_c = sampling_locations.contiguous(), attn_c = attention_weights.contiguous();
  at::Tensor out = at::empty({dims.B, dims.Q, dims.M * dims.D}, value.options());  // every element is written
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    const int elem = static_cast<int>(sizeof(scalar_t));
    const Layout layout = choose_layout(dims.D, elem, aligned_vec({value_c.const_data_ptr(), out.const_data_ptr()}, elem),
                                        overrides.vec, overrides.group);
    const Inputs<scalar_t> in = make_inputs<scalar_t>(value_c, shapes_c, loc_c, attn_c, dims, ppl, layout);
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    dispatch_vec<scalar_t>(layout.vec, [&](auto v) {
      launch.template forward<decltype(v)::value>(in, out_ptr, warp_items(in.rows(), layout));
    });
  });
  return out;
}

// The backward op on `launch`; `deterministic` picks the two-pass gather (the caller passes
// at::globalContext().deterministicAlgorithms()).
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const Launch& launch, const char* op,
                                                        const at::Tensor& grad_output, const at::Tensor& value,
                                                        const at::Tensor& spatial_shapes,
                                                        const at::Tensor& sampling_locations,
                                                        const at::Tensor& attention_weights,
                                                        at::IntArrayRef num_points_list, const Dims& dims,
                                                        bool deterministic, const Overrides& overrides = {}) {
  const PointsPerLevel ppl = make_points_per_level(op, num_points_list);
  TORCH_CHECK(dims.S <= std::numeric_limits<int>::max(), op, ": value has S=", dims.S,
              " positions; the CUDA kernel supports at most 2^31 - 1");
  const int64_t rows = dims.B * dims.Q * dims.M;
  if (rows * dims.P == 0 || dims.D == 0) {
    return {at::zeros(value.sizes(), value.options()), at::zeros(sampling_locations.sizes(), value.options()),
            at::zeros(attention_weights.sizes(), value.options())};
  }
  const at::Tensor go_c = grad_output.contiguous(), value_c = value.contiguous();
  const at::Tensor shapes_c = spatial_shapes.contiguous(), loc_c = sampling_locations.contiguous();
  const at::Tensor attn_c = attention_weights.contiguous();
  // every (b, q, m, p) is written by its owner lane
  at::Tensor grad_loc = at::empty(sampling_locations.sizes(), value.options());
  at::Tensor grad_attn = at::empty(attention_weights.sizes(), value.options());
  const at::ScalarType acc_dtype = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_value;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    using A = acc_t<scalar_t>;
    const int elem = static_cast<int>(sizeof(scalar_t));
    const Layout layout = choose_layout(
        dims.D, elem, aligned_vec({value_c.const_data_ptr(), go_c.const_data_ptr()}, elem), overrides.vec,
        overrides.group);
    const Inputs<scalar_t> in = make_inputs<scalar_t>(value_c, shapes_c, loc_c, attn_c, dims, ppl, layout);
    Grads<scalar_t> g{};
    g.grad_out = go_c.const_data_ptr<scalar_t>();
    g.grad_loc = grad_loc.mutable_data_ptr<scalar_t>();
    g.grad_attn = grad_attn.mutable_data_ptr<scalar_t>();
    g.no_key = dims.B * dims.S * dims.M;
    const int64_t items = warp_items(rows, layout);
    if (!deterministic) {
      at::Tensor acc = at::zeros(value.sizes(), value.options().dtype(acc_dtype));
      g.grad_value = acc.mutable_data_ptr<A>();
      dispatch_vec<scalar_t>(layout.vec, [&](auto v) {
        launch.template backward<decltype(v)::value, false>(in, g, items);
      });
      grad_value = acc_dtype == value.scalar_type() ? acc : acc.to(value.scalar_type());
      return;
    }
    const int64_t entries = rows * dims.P * 4;
    at::Tensor coef = at::empty({entries}, value.options().dtype(acc_dtype));
    at::Tensor key = at::empty({entries}, value.options().dtype(at::kLong));
    g.coef = coef.mutable_data_ptr<A>();
    g.key = key.mutable_data_ptr<int64_t>();
    dispatch_vec<scalar_t>(layout.vec, [&](auto v) {
      launch.template backward<decltype(v)::value, true>(in, g, items);
    });
    // A stable sort keeps entries of one value row in (b, q, m, p, corner) order.
    const auto [sorted_keys, order] = at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const int64_t value_rows = dims.B * dims.S * dims.M;
    const at::Tensor starts = at::searchsorted(sorted_keys, at::arange(value_rows + 1, key.options()));
    grad_value = at::empty(value.sizes(), value.options());  // every element is written
    Gather<scalar_t> ga{go_c.const_data_ptr<scalar_t>(), coef.const_data_ptr<A>(), order.const_data_ptr<int64_t>(),
                        starts.const_data_ptr<int64_t>(), grad_value.mutable_data_ptr<scalar_t>(), value_rows,
                        dims.D, dims.P, layout};
    dispatch_vec<scalar_t>(layout.vec, [&](auto v) {
      launch.template gather<decltype(v)::value>(ga, warp_items(value_rows, layout));
    });
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace coalesced
}  // namespace msda
}  // namespace dfine
