// How the FDR CPU kernels feed fdr_math.h: groups of W consecutive rows, transposed so that one
// vector holds the same bin of W rows (V z[bin]); the math then runs once per group, W rows at a
// time, with no horizontal reductions. Groups start at row 0 (which kernel code computes a row
// never depends on the thread split); the last group is padded with zero rows.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>

#include "common/cpu_features.h"
#include "common/simd.h"
#include "common/stream_copy.h"

namespace dfine {
namespace fdr {

// Lanes per group: one AVX2 register (two SSE2 registers in the baseline copy) of float32.
constexpr int kLanes = 8;
using VecF = simd::Vec<float, kLanes>;

constexpr int kDfineBins = 33;  // reg_max = 32: compile-time loops over the bins
constexpr int64_t kGrainRows = 128;

// Whether float32 rows go through the vector groups: in the AVX2 copy only. In the baseline copy
// (SSE2) every 32-byte vector operation is split in two and the 8-lane shuffles are lowered
// element by element (~20x slower), so it runs the scalar instantiation of the same templates.
inline bool use_lanes() { return cpu::has_avx2(); }

// body(g0, g1) on groups [g0, g1) of `group` rows (rows split over threads), from the best ISA copy.
template <typename Body>
void for_each_group(int64_t rows, int64_t group, int64_t grain_rows, const Body& body) {
  const int64_t groups = (rows + group - 1) / group;
  at::parallel_for(0, groups, std::max<int64_t>(grain_rows / group, 1), [&](int64_t g0, int64_t g1) {
    cpu::run_best_isa(DFINE_ISA_BODY { body(g0, g1); });
  });
}

// Writes a group's gradient rows: transposed back through an L1 buffer and streamed out when the
// rows are aligned (a fresh [N, 33] gradient is 1 MiB per decoder layer, more than L2 holds).
DFINE_FORCE_INLINE void store_group_rows(VecF* in, int n, int count, float* rows) {
  alignas(64) float buffer[kLanes * 64];
  simd::store_transposed<VecF>(in, n, kLanes, buffer);
  stream_copy(rows, buffer, sizeof(float) * count * n);
}

}  // namespace fdr
}  // namespace dfine

// The per-group body of for_each_group: always inlined into each ISA copy.
#define DFINE_GROUP_BODY [&](int64_t g0, int64_t g1) __attribute__((always_inline))
