// Per-sample math of multi-scale deformable attention, shared by the C++ CPU kernel and the CUDA
// kernel: the CPU tests therefore exercise exactly the arithmetic that runs on GPUs.
//
// Sampling follows F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False) on
// normalised locations in [0, 1]: pixel x = loc_x * W - 0.5, y = loc_y * H - 0.5; each of the four
// neighbouring pixels that lies outside the map contributes zero (no clamping), and so does its
// gradient.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DFINE_HOST_DEVICE __host__ __device__
#define DFINE_UNROLL _Pragma("unroll")
#define DFINE_FORCE_INLINE __forceinline__
#else
#define DFINE_HOST_DEVICE
#define DFINE_UNROLL
#if defined(__GNUC__)
// Inlined even into the CPU kernel's AVX2 clone (see ms_deform_attn_cpu.cpp).
#define DFINE_FORCE_INLINE inline __attribute__((always_inline))
#else
#define DFINE_FORCE_INLINE inline
#endif
#endif

namespace dfine {
namespace msda {

// Most levels any backend accepts (the CUDA kernel passes per-level point counts by value).
constexpr int kMaxLevels = 8;

// The four neighbours of a sampling location, in the order
//   0 = (y0, x0), 1 = (y0, x0 + 1), 2 = (y0 + 1, x0), 3 = (y0 + 1, x0 + 1).
// Invalid corners (outside the map) have valid = false, zero weight, zero derivatives and
// offset 0; kernels must not read value rows for them (0 * inf would be NaN).
template <typename acc_t>
struct BilinearCorners {
  int offset[4];            // y * W + x inside the level
  bool valid[4];
  acc_t weight[4];          // bilinear weight of each corner
  acc_t dweight_dloc_x[4];  // d weight / d loc_x, loc_x normalised (includes the factor W)
  acc_t dweight_dloc_y[4];  // d weight / d loc_y, loc_y normalised (includes the factor H)
};

// floor(v) as an int for |v| < 2^31 (callers guarantee -1 < v < size): truncate, then step down
// for negative non-integers. Exact, and cheaper on baseline x86-64 than a libm floorf call.
template <typename acc_t>
DFINE_HOST_DEVICE DFINE_FORCE_INLINE int floor_to_int(acc_t v) {
  const int t = static_cast<int>(v);
  return t - (static_cast<acc_t>(t) > v ? 1 : 0);
}

// Corners, weights and (when with_grad) weight derivatives of one sampling location on an
// H x W level. Far-away and NaN locations are rejected before any float -> int conversion.
template <typename acc_t>
DFINE_HOST_DEVICE DFINE_FORCE_INLINE void bilinear_corners(acc_t loc_x, acc_t loc_y, int H, int W, bool with_grad,
                                               BilinearCorners<acc_t>& c) {
DFINE_UNROLL
  for (int k = 0; k < 4; ++k) {
    c.offset[k] = 0;
    c.valid[k] = false;
    c.weight[k] = acc_t(0);
    c.dweight_dloc_x[k] = acc_t(0);
    c.dweight_dloc_y[k] = acc_t(0);
  }
  const acc_t x = loc_x * static_cast<acc_t>(W) - acc_t(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(H) - acc_t(0.5);
  // x <= -1 or x >= W leaves no corner inside the map. NaN fails every comparison and lands here
  // too, and |x| is bounded by W + 1 afterwards, so the int conversion in floor_to_int cannot overflow.
  if (!(x > acc_t(-1) && x < static_cast<acc_t>(W) && y > acc_t(-1) && y < static_cast<acc_t>(H))) {
    return;
  }
  const int x0 = floor_to_int(x);
  const int y0 = floor_to_int(y);
  const acc_t x_floor = static_cast<acc_t>(x0);
  const acc_t y_floor = static_cast<acc_t>(y0);
  const acc_t fx = x - x_floor;  // distance to the left column, in [0, 1)
  const acc_t fy = y - y_floor;
  const acc_t gx = acc_t(1) - fx;
  const acc_t gy = acc_t(1) - fy;

  const bool x0_in = x0 >= 0;
  const bool x1_in = x0 + 1 < W;
  const bool y0_in = y0 >= 0;
  const bool y1_in = y0 + 1 < H;
  const bool corner_in[4] = {y0_in && x0_in, y0_in && x1_in, y1_in && x0_in, y1_in && x1_in};
  const int corner_offset[4] = {y0 * W + x0, y0 * W + x0 + 1, (y0 + 1) * W + x0, (y0 + 1) * W + x0 + 1};
  const acc_t corner_weight[4] = {gx * gy, fx * gy, gx * fy, fx * fy};
  const acc_t sx = static_cast<acc_t>(W);
  const acc_t sy = static_cast<acc_t>(H);
  const acc_t corner_dx[4] = {-gy * sx, gy * sx, -fy * sx, fy * sx};
  const acc_t corner_dy[4] = {-gx * sy, -fx * sy, gx * sy, fx * sy};
DFINE_UNROLL
  for (int k = 0; k < 4; ++k) {
    if (corner_in[k]) {
      c.valid[k] = true;
      c.offset[k] = corner_offset[k];
      c.weight[k] = corner_weight[k];
      if (with_grad) {
        c.dweight_dloc_x[k] = corner_dx[k];
        c.dweight_dloc_y[k] = corner_dy[k];
      }
    }
  }
}

// Gradients of one sample out = attn * sum_k weight[k] * <value_k, .> given
// dots[k] = <grad_out, value row of corner k> (0 for invalid corners).
template <typename acc_t>
struct PointGrads {
  acc_t attn;   // d loss / d attention_weight
  acc_t loc_x;  // d loss / d loc_x
  acc_t loc_y;  // d loss / d loc_y
};

template <typename acc_t>
DFINE_HOST_DEVICE DFINE_FORCE_INLINE PointGrads<acc_t> point_grads(const BilinearCorners<acc_t>& c, const acc_t dots[4],
                                                       acc_t attn) {
  acc_t sampled = acc_t(0);
  acc_t d_x = acc_t(0);
  acc_t d_y = acc_t(0);
DFINE_UNROLL
  for (int k = 0; k < 4; ++k) {
    sampled += c.weight[k] * dots[k];
    d_x += c.dweight_dloc_x[k] * dots[k];
    d_y += c.dweight_dloc_y[k] * dots[k];
  }
  PointGrads<acc_t> g;
  g.attn = sampled;
  g.loc_x = attn * d_x;
  g.loc_y = attn * d_y;
  return g;
}

}  // namespace msda
}  // namespace dfine
