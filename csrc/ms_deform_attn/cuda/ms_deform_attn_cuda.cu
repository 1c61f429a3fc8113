// CUDA kernels of multi-scale deformable attention (float32, float64, float16, bfloat16; the
// arithmetic runs in at::opmath_type, i.e. float for the 16-bit types). The per-sample math is in
// ms_deform_attn_math.h, shared with (and tested through) the CPU kernel.
//
// Forward: one thread per output element (b, q, m, d); neighbouring threads read neighbouring d of
//   the same value rows, so loads are coalesced.
// Backward: one thread per sampling point (b, q, m, p), looping over d. grad_value is accumulated
//   with atomicAdd (into a float32 buffer for 16-bit inputs), so its low bits may differ from run to
//   run on GPUs; grad_sampling_locations and grad_attention_weights are written once per thread and
//   are deterministic. (The CPU kernel is fully deterministic.)
// spatial_shapes is read from the device tensor inside the kernels (no host sync); the per-level
// point counts travel by value in a small struct, capped at kMaxLevels levels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ms_deform_attn/ms_deform_attn.h"
#include "ms_deform_attn/ms_deform_attn_math.h"

namespace dfine {
namespace msda {
namespace {

struct PointsPerLevel {
  int count[kMaxLevels];
  int num_levels;
};

constexpr int kThreads = 256;

PointsPerLevel make_points_per_level(const char* op, at::IntArrayRef num_points_list) {
  TORCH_CHECK(static_cast<int64_t>(num_points_list.size()) <= kMaxLevels, op, ": the CUDA kernel supports at most ",
              kMaxLevels, " levels, got num_points_list with ", num_points_list.size(), " entries");
  PointsPerLevel ppl{};
  ppl.num_levels = static_cast<int>(num_points_list.size());
  for (int l = 0; l < ppl.num_levels; ++l) ppl.count[l] = static_cast<int>(num_points_list[l]);
  return ppl;
}

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
                               const scalar_t* __restrict__ loc, const scalar_t* __restrict__ attn,
                               scalar_t* __restrict__ out, int64_t B, int64_t S, int64_t M, int64_t D, int64_t Q,
                               int64_t P, PointsPerLevel ppl) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = B * Q * M * D;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = i % D;
    const int64_t bqm = i / D;  // (b, q, m)
    const int64_t m = bqm % M;
    const int64_t b = bqm / (M * Q);
    const scalar_t* loc_row = loc + bqm * P * 2;
    const scalar_t* attn_row = attn + bqm * P;
    const scalar_t* value_bm = value + (b * S * M + m) * D + d;
    acc_t acc = acc_t(0);
    int64_t level_start = 0;
    int p = 0;
    for (int l = 0; l < ppl.num_levels; ++l) {
      // spatial_shapes is not read on the host here (no sync): a level outside value is an error
      // raised at the next synchronisation (device-side assert), never an out-of-bounds read.
      CUDA_KERNEL_ASSERT(level_fits(spatial_shapes[2 * l], spatial_shapes[2 * l + 1], level_start, S));
      const int H = static_cast<int>(spatial_shapes[2 * l]);
      const int W = static_cast<int>(spatial_shapes[2 * l + 1]);
      const scalar_t* value_level = value_bm + level_start * M * D;
      for (int j = 0; j < ppl.count[l]; ++j, ++p) {
        BilinearCorners<acc_t> c;
        const bool any_valid = bilinear_corners<acc_t>(static_cast<acc_t>(loc_row[2 * p]),
                                                       static_cast<acc_t>(loc_row[2 * p + 1]), H, W, c);
        acc_t sampled = any_valid ? acc_t(0) : outside_sample(c);  // NaN for a non-finite location
        DFINE_UNROLL
        for (int k = 0; k < 4; ++k) {
          if (c.valid[k]) {
            sampled += c.weight[k] * static_cast<acc_t>(value_level[static_cast<int64_t>(c.offset[k]) * M * D]);
          }
        }
        acc += static_cast<acc_t>(attn_row[p]) * sampled;
      }
      level_start += static_cast<int64_t>(H) * W;
    }
    out[i] = static_cast<scalar_t>(acc);
  }
}

// grad_value_acc has the layout of value, in scalar_t for float/double, in float for 16-bit types.
template <typename scalar_t, typename grad_value_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ spatial_shapes, const scalar_t* __restrict__ loc,
                                const scalar_t* __restrict__ attn, grad_value_t* __restrict__ grad_value_acc,
                                scalar_t* __restrict__ grad_loc, scalar_t* __restrict__ grad_attn, int64_t B,
                                int64_t S, int64_t M, int64_t D, int64_t Q, int64_t P, PointsPerLevel ppl) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = B * Q * M * P;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = i % P;
    const int64_t bqm = i / P;
    const int64_t m = bqm % M;
    const int64_t b = bqm / (M * Q);
    // Find the level of point p and where it starts in S.
    int level = 0;
    int64_t level_start = 0;
    int first_point = 0;
    for (int l = 0; l < ppl.num_levels; ++l) {
      CUDA_KERNEL_ASSERT(level_fits(spatial_shapes[2 * l], spatial_shapes[2 * l + 1], level_start, S));
      if (p < first_point + ppl.count[l]) {
        level = l;
        break;
      }
      first_point += ppl.count[l];
      level_start += spatial_shapes[2 * l] * spatial_shapes[2 * l + 1];
    }
    const int H = static_cast<int>(spatial_shapes[2 * level]);
    const int W = static_cast<int>(spatial_shapes[2 * level + 1]);
    BilinearCorners<acc_t> c;
    const bool any_valid =
        bilinear_corners<acc_t>(static_cast<acc_t>(loc[2 * i]), static_cast<acc_t>(loc[2 * i + 1]), H, W, c);
    const acc_t a = static_cast<acc_t>(attn[i]);
    const int64_t base = (b * S * M + m) * D + level_start * M * D;
    const scalar_t* go = grad_out + bqm * D;
    // a point outside the map reads no row: its dot products are <go, 0> (NaN if go is not finite)
    const acc_t zero_dot = any_valid ? acc_t(0) : zero_row_dot<acc_t>(go, D);
    acc_t dots[4] = {zero_dot, zero_dot, zero_dot, zero_dot};
    DFINE_UNROLL
    for (int k = 0; k < 4; ++k) {
      if (!c.valid[k]) continue;
      const int64_t row = base + static_cast<int64_t>(c.offset[k]) * M * D;
      const acc_t w = a * c.weight[k];
      acc_t dot = acc_t(0);
      for (int64_t d = 0; d < D; ++d) {
        const acc_t g = static_cast<acc_t>(go[d]);
        dot += g * static_cast<acc_t>(value[row + d]);
        gpuAtomicAdd(grad_value_acc + row + d, static_cast<grad_value_t>(w * g));
      }
      dots[k] = dot;
    }
    const PointGrads<acc_t> g = point_grads<acc_t>(c, H, W, dots, a);
    grad_attn[i] = static_cast<scalar_t>(g.attn);
    grad_loc[2 * i] = static_cast<scalar_t>(g.loc_x);
    grad_loc[2 * i + 1] = static_cast<scalar_t>(g.loc_y);
  }
}

int64_t num_blocks(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t{1} << 20));  // grid-stride loops cover the rest
}

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                                       at::IntArrayRef num_points_list) {
  constexpr const char* op = "dfine::ms_deform_attn_forward";
  // sum(H*W) == S is not checked here: it would need a device->host copy (the Python layer checks it).
  const Dims dims =
      check_forward_inputs(op, value, spatial_shapes, sampling_locations, attention_weights, num_points_list, false);
  const PointsPerLevel ppl = make_points_per_level(op, num_points_list);
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor out = at::zeros({dims.B, dims.Q, dims.M * dims.D}, value.options());
  if (out.numel() == 0) return out;
  const at::Tensor value_c = value.contiguous();
  const at::Tensor shapes_c = spatial_shapes.contiguous();
  const at::Tensor loc_c = sampling_locations.contiguous();
  const at::Tensor attn_c = attention_weights.contiguous();
  const int64_t total = out.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    forward_kernel<scalar_t><<<num_blocks(total), kThreads, 0, stream>>>(
        value_c.const_data_ptr<scalar_t>(), shapes_c.const_data_ptr<int64_t>(), loc_c.const_data_ptr<scalar_t>(),
        attn_c.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), dims.B, dims.S, dims.M, dims.D, dims.Q,
        dims.P, ppl);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, at::IntArrayRef num_points_list) {
  constexpr const char* op = "dfine::ms_deform_attn_backward";
  const Dims dims =
      check_forward_inputs(op, value, spatial_shapes, sampling_locations, attention_weights, num_points_list, false);
  check_grad_output(op, grad_output, value, dims);
  const PointsPerLevel ppl = make_points_per_level(op, num_points_list);
  const c10::cuda::CUDAGuard guard(value.device());
  const bool wide = value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble;
  at::Tensor grad_value_acc = at::zeros(value.sizes(), value.options().dtype(wide ? value.scalar_type() : at::kFloat));
  at::Tensor grad_loc = at::zeros(sampling_locations.sizes(), value.options());
  at::Tensor grad_attn = at::zeros(attention_weights.sizes(), value.options());
  const int64_t total = dims.B * dims.Q * dims.M * dims.P;
  if (total > 0 && dims.D > 0) {
    const at::Tensor go_c = grad_output.contiguous();
    const at::Tensor value_c = value.contiguous();
    const at::Tensor shapes_c = spatial_shapes.contiguous();
    const at::Tensor loc_c = sampling_locations.contiguous();
    const at::Tensor attn_c = attention_weights.contiguous();
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
      using grad_value_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      backward_kernel<scalar_t, grad_value_t><<<num_blocks(total), kThreads, 0, stream>>>(
          go_c.const_data_ptr<scalar_t>(), value_c.const_data_ptr<scalar_t>(), shapes_c.const_data_ptr<int64_t>(),
          loc_c.const_data_ptr<scalar_t>(), attn_c.const_data_ptr<scalar_t>(),
          grad_value_acc.mutable_data_ptr<grad_value_t>(), grad_loc.mutable_data_ptr<scalar_t>(),
          grad_attn.mutable_data_ptr<scalar_t>(), dims.B, dims.S, dims.M, dims.D, dims.Q, dims.P, ppl);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor grad_value = wide ? grad_value_acc : grad_value_acc.to(value.scalar_type());
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace
}  // namespace msda
}  // namespace dfine

TORCH_LIBRARY_IMPL(dfine, CUDA, m) {
  m.impl("ms_deform_attn_forward", &dfine::msda::ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &dfine::msda::ms_deform_attn_backward_cuda);
}
