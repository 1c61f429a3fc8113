// Per-sample math of multi-scale deformable attention, shared by the C++ CPU kernel and the CUDA
// kernel: the CPU tests therefore exercise exactly the arithmetic that runs on GPUs.
//
// Sampling follows F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False) on
// normalised locations in [0, 1]: pixel x = loc_x * W - 0.5, y = loc_y * H - 0.5; each of the four
// neighbouring pixels that lies outside the map contributes zero (no clamping), and so does its
// gradient.
//
// Non-finite values propagate as in that reference (grid_sample on CPU tensors): a NaN or +-inf
// location samples NaN; a point with no corner inside the map samples 0, which a non-finite
// attention weight still turns into NaN (inf * 0); a non-finite upstream gradient gives NaN
// gradients for every point of its row, inside the map or not. The corner weights carry the NaN,
// so the kernels need no per-element checks: one multiply and compare per point that misses the map.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace dfine {
namespace msda {

// Most levels any backend accepts (the CUDA kernel passes per-level point counts by value).
constexpr int kMaxLevels = 8;

// Largest H * W of a level: offsets inside a level are ints (and exact as float32).
constexpr int64_t kMaxLevelSize = int64_t{1} << 30;

// Whether a level of H x W positions starting at flat position `start` lies inside the S positions
// of value, with H * W <= kMaxLevelSize, computed without overflow for any int64 values. The CPU
// entry points check the same on the host (with messages); the CUDA kernels, which do not copy
// spatial_shapes to the host, assert it.
DFINE_HOST_DEVICE DFINE_FORCE_INLINE bool level_fits(int64_t H, int64_t W, int64_t start, int64_t S) {
  return H >= 1 && W >= 1 && H <= kMaxLevelSize && W <= kMaxLevelSize / H && start >= 0 && start <= S &&
         H * W <= S - start;
}

// The four neighbours of a sampling location, in the order
//   0 = (y0, x0), 1 = (y0, x0 + 1), 2 = (y0 + 1, x0), 3 = (y0 + 1, x0 + 1).
// Invalid corners (outside the map) have valid = false, zero weight and offset 0; kernels must not
// read value rows for them (0 * inf would be NaN). fx, fy are the fractional parts of the pixel
// coordinate (0 when no corner is valid); the location gradient is derived from them in point_grads,
// which keeps the per-sample state small (the CPU backward plans a few thousand samples ahead).
// A non-finite coordinate has NaN for its fraction and for all four weights (and no valid corner).
template <typename acc_t>
struct BilinearCorners {
  int offset[4];     // y * W + x inside the level
  bool valid[4];
  acc_t weight[4];   // bilinear weight of each corner
  acc_t fx, fy;      // x - floor(x), y - floor(y), in [0, 1)
};

// floor(v) as an int for |v| < 2^31 (callers guarantee -1 < v < size): truncate, then step down
// for negative non-integers. Exact, and cheaper on baseline x86-64 than a libm floorf call.
template <typename acc_t>
DFINE_HOST_DEVICE DFINE_FORCE_INLINE int floor_to_int(acc_t v) {
  const int t = static_cast<int>(v);
  return t - (static_cast<acc_t>(t) > v ? 1 : 0);
}

// Corners and weights of one sampling location on an H x W level. Returns whether any corner is
// inside the map. Far-away and non-finite locations are rejected before any float -> int conversion.
template <typename acc_t>
DFINE_HOST_DEVICE DFINE_FORCE_INLINE bool bilinear_corners(acc_t loc_x, acc_t loc_y, int H, int W,
                                                           BilinearCorners<acc_t>& c) {
  const acc_t x = loc_x * static_cast<acc_t>(W) - acc_t(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(H) - acc_t(0.5);
  // x <= -1 or x >= W leaves no corner inside the map. NaN fails every comparison and lands here
  // too, and |x| is bounded by W + 1 afterwards, so the int conversion in floor_to_int cannot overflow.
  if (!(x > acc_t(-1) && x < static_cast<acc_t>(W) && y > acc_t(-1) && y < static_cast<acc_t>(H))) {
    // v - v is 0 for a finite v and NaN for NaN or +-inf: a non-finite coordinate makes its
    // fraction, and every weight, NaN (the gradient along the other, finite axis stays 0).
    c.fx = x - x;
    c.fy = y - y;
    const acc_t weight = c.fx + c.fy;
DFINE_UNROLL
    for (int k = 0; k < 4; ++k) {
      c.offset[k] = 0;
      c.valid[k] = false;
      c.weight[k] = weight;
    }
    return false;
  }
  const int x0 = floor_to_int(x);
  const int y0 = floor_to_int(y);
  const acc_t fx = x - static_cast<acc_t>(x0);  // distance to the left column, in [0, 1)
  const acc_t fy = y - static_cast<acc_t>(y0);
  const acc_t gx = acc_t(1) - fx;
  const acc_t gy = acc_t(1) - fy;
  const bool x0_in = x0 >= 0;
  const bool x1_in = x0 + 1 < W;
  const bool y0_in = y0 >= 0;
  const bool y1_in = y0 + 1 < H;
  c.valid[0] = y0_in && x0_in;
  c.valid[1] = y0_in && x1_in;
  c.valid[2] = y1_in && x0_in;
  c.valid[3] = y1_in && x1_in;
  const int base = y0 * W + x0;
  c.offset[0] = c.valid[0] ? base : 0;
  c.offset[1] = c.valid[1] ? base + 1 : 0;
  c.offset[2] = c.valid[2] ? base + W : 0;
  c.offset[3] = c.valid[3] ? base + W + 1 : 0;
  c.weight[0] = c.valid[0] ? gx * gy : acc_t(0);
  c.weight[1] = c.valid[1] ? fx * gy : acc_t(0);
  c.weight[2] = c.valid[2] ? gx * fy : acc_t(0);
  c.weight[3] = c.valid[3] ? fx * fy : acc_t(0);
  c.fx = fx;
  c.fy = fy;
  return true;  // -1 < x < W and -1 < y < H: at least one corner is inside
}

// What a point with no corner inside the map (bilinear_corners returned false) adds to the output
// per unit of attention: 0, or NaN for a non-finite location.
template <typename acc_t>
DFINE_HOST_DEVICE DFINE_FORCE_INLINE acc_t outside_sample(const BilinearCorners<acc_t>& c) {
  return c.weight[0];
}

// Whether such a point changes the output: attn * outside_sample is NaN (a non-finite location, or
// a non-finite attention weight times the 0 sample). One multiply and compare per point.
template <typename acc_t>
DFINE_HOST_DEVICE DFINE_FORCE_INLINE bool outside_point_is_nan(const BilinearCorners<acc_t>& c, acc_t attn) {
  return !(attn * c.weight[0] == acc_t(0));
}

// sum_d go[d] * 0: 0, or NaN when the upstream gradient row go [D] holds a NaN or an infinity. The
// dot products of a point with no corner inside the map (whose sampled rows are all zero), so that
// its gradients are NaN exactly when the reference's are. Only computed for such points.
template <typename acc_t, typename scalar_t>
DFINE_HOST_DEVICE DFINE_FORCE_INLINE acc_t zero_row_dot(const scalar_t* go, int64_t D) {
  acc_t total = acc_t(0);
  for (int64_t d = 0; d < D; ++d) total += static_cast<acc_t>(go[d]) * acc_t(0);
  return total;
}

// Gradients of one sample out = attn * sum_k weight[k] * <value_k, .> given
// dots[k] = <grad_out, value row of corner k>, which must be 0 for invalid corners: an invalid
// corner's weight is 0, and so must be its share of the location gradient. For a point with no
// valid corner every dots[k] is zero_row_dot(grad_out).
template <typename acc_t>
struct PointGrads {
  acc_t attn;   // d loss / d attention_weight
  acc_t loc_x;  // d loss / d loc_x
  acc_t loc_y;  // d loss / d loc_y
};

// With x = loc_x * W - 0.5 the corner weights are (1-fx)(1-fy), fx(1-fy), (1-fx)fy, fx fy, so
//   d/d loc_x = W * ((1-fy)(dot1 - dot0) + fy (dot3 - dot2)),
//   d/d loc_y = H * ((1-fx)(dot2 - dot0) + fx (dot3 - dot1)).
template <typename acc_t>
DFINE_HOST_DEVICE DFINE_FORCE_INLINE PointGrads<acc_t> point_grads(const BilinearCorners<acc_t>& c, int H, int W,
                                                                   const acc_t dots[4], acc_t attn) {
  PointGrads<acc_t> g;
  g.attn = c.weight[0] * dots[0] + c.weight[1] * dots[1] + c.weight[2] * dots[2] + c.weight[3] * dots[3];
  const acc_t d_x = (acc_t(1) - c.fy) * (dots[1] - dots[0]) + c.fy * (dots[3] - dots[2]);
  const acc_t d_y = (acc_t(1) - c.fx) * (dots[2] - dots[0]) + c.fx * (dots[3] - dots[1]);
  g.loc_x = attn * static_cast<acc_t>(W) * d_x;
  g.loc_y = attn * static_cast<acc_t>(H) * d_y;
  return g;
}

}  // namespace msda
}  // namespace dfine
