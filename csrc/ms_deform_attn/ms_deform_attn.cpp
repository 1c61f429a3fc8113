// Schemas of the multi-scale deformable attention ops (kernels: cpu/, cuda/; autograd: autograd/)
// and the argument checks the CPU and CUDA kernels share.
#include "ms_deform_attn/ms_deform_attn.h"

#include <torch/library.h>

#include <limits>

#include "ms_deform_attn/ms_deform_attn_math.h"

namespace dfine {
namespace msda {

Dims check_forward_inputs(const char* op, const at::Tensor& value, const at::Tensor& spatial_shapes,
                          const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                          at::IntArrayRef num_points_list, bool check_level_sizes) {
  TORCH_CHECK(value.dim() == 4, op, ": value must have shape [B, S, M, D] (4 dims), got ", value.sizes());
  TORCH_CHECK(at::isFloatingType(value.scalar_type()), op,
              ": value must be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
              value.scalar_type());
  TORCH_CHECK(sampling_locations.dim() == 5 && sampling_locations.size(4) == 2, op,
              ": sampling_locations must have shape [B, Q, M, P, 2] (5 dims), got ", sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 4, op, ": attention_weights must have shape [B, Q, M, P] (4 dims), got ",
              attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2, op,
              ": spatial_shapes must have shape [L, 2] (rows of (H, W)), got ", spatial_shapes.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong, op, ": spatial_shapes must be an int64 tensor, got ",
              spatial_shapes.scalar_type());

  Dims d;
  d.B = value.size(0);
  d.S = value.size(1);
  d.M = value.size(2);
  d.D = value.size(3);
  d.Q = sampling_locations.size(1);
  d.P = sampling_locations.size(3);
  d.L = spatial_shapes.size(0);
  TORCH_CHECK(sampling_locations.size(0) == d.B && sampling_locations.size(2) == d.M, op,
              ": sampling_locations must have shape [B=", d.B, ", Q, M=", d.M, ", P, 2] to match value [B, S, M, D]=",
              value.sizes(), ", got ", sampling_locations.sizes());
  TORCH_CHECK(attention_weights.size(0) == d.B && attention_weights.size(1) == d.Q &&
                  attention_weights.size(2) == d.M && attention_weights.size(3) == d.P,
              op, ": attention_weights must have shape [B, Q, M, P]=[", d.B, ", ", d.Q, ", ", d.M, ", ", d.P,
              "], got ", attention_weights.sizes());

  const at::Tensor* same_dtype[2] = {&sampling_locations, &attention_weights};
  const char* same_dtype_names[2] = {"sampling_locations", "attention_weights"};
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(same_dtype[i]->scalar_type() == value.scalar_type(), op, ": ", same_dtype_names[i], " has dtype ",
                same_dtype[i]->scalar_type(), " but value has ", value.scalar_type(), "; they must match");
    TORCH_CHECK(same_dtype[i]->device() == value.device(), op, ": ", same_dtype_names[i], " is on ",
                same_dtype[i]->device(), " but value is on ", value.device(), "; they must match");
  }
  TORCH_CHECK(spatial_shapes.device() == value.device(), op, ": spatial_shapes is on ", spatial_shapes.device(),
              " but value is on ", value.device(), "; they must match");

  TORCH_CHECK(!num_points_list.empty(), op, ": num_points_list must be a non-empty list of ints >= 1");
  TORCH_CHECK(static_cast<int64_t>(num_points_list.size()) == d.L, op, ": num_points_list has ",
              num_points_list.size(), " entries but spatial_shapes [L, 2] has L=", d.L, " levels; they must match");
  // The kernels index points, and the positions inside a level, with ints.
  TORCH_CHECK(d.P <= std::numeric_limits<int>::max(), op, ": sampling_locations [B, Q, M, P, 2] has P=", d.P,
              " points; at most ", std::numeric_limits<int>::max(), " are supported");
  int64_t total_points = 0;
  for (int64_t p : num_points_list) {
    // p <= P keeps the sum from wrapping around: at most L * P
    TORCH_CHECK(p >= 1 && p <= d.P, op, ": every entry of num_points_list must be in [1, P=", d.P,
                "] (P: the points in sampling_locations [B, Q, M, P, 2]), got ", num_points_list);
    total_points += p;
  }
  TORCH_CHECK(total_points == d.P, op, ": sum(num_points_list)=", total_points,
              " must equal P=", d.P, ", the number of points in sampling_locations [B, Q, M, P, 2]");

  if (check_level_sizes) {
    const at::Tensor shapes = spatial_shapes.contiguous();
    const int64_t* hw = shapes.data_ptr<int64_t>();
    int64_t total = 0;
    for (int64_t l = 0; l < d.L; ++l) {
      const int64_t H = hw[2 * l], W = hw[2 * l + 1];
      TORCH_CHECK(H >= 1 && W >= 1, op, ": every (H, W) in spatial_shapes must be >= 1, got (", H, ", ", W,
                  ") at level ", l);
      // W <= limit / H is H * W <= limit without computing the product (which may not fit in int64)
      TORCH_CHECK(H <= kMaxLevelSize && W <= kMaxLevelSize / H, op, ": level ", l, " of spatial_shapes is too large (",
                  H, " x ", W, "); H * W must be at most ", kMaxLevelSize);
      // each level adds at most 2^30: the sum only wraps past 2^33 levels, but the check costs nothing
      TORCH_CHECK(!__builtin_add_overflow(total, H * W, &total), op, ": spatial_shapes sum to more than ",
                  std::numeric_limits<int64_t>::max(), " positions");
    }
    TORCH_CHECK(total == d.S, op, ": spatial_shapes sum to sum(H*W)=", total, " positions but value has S=", d.S,
                " (value is [B, S, M, D]=", value.sizes(), ")");
    // what the kernels rely on (the CUDA kernels assert the same on the device)
    for (int64_t l = 0, start = 0; l < d.L; start += hw[2 * l] * hw[2 * l + 1], ++l) {
      TORCH_INTERNAL_ASSERT(level_fits(hw[2 * l], hw[2 * l + 1], start, d.S));
    }
  }
  return d;
}

void check_grad_output(const char* op, const at::Tensor& grad_output, const at::Tensor& value, const Dims& d) {
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == d.B && grad_output.size(1) == d.Q &&
                  grad_output.size(2) == d.M * d.D,
              op, ": grad_output must have shape [B, Q, M*D]=[", d.B, ", ", d.Q, ", ", d.M * d.D, "], got ",
              grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(), op, ": grad_output has dtype ",
              grad_output.scalar_type(), " but value has ", value.scalar_type(), "; they must match");
  TORCH_CHECK(grad_output.device() == value.device(), op, ": grad_output is on ", grad_output.device(),
              " but value is on ", value.device(), "; they must match");
}

}  // namespace msda
}  // namespace dfine

TORCH_LIBRARY_FRAGMENT(dfine, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor sampling_locations, "
      "Tensor attention_weights, int[] num_points_list) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor sampling_locations, Tensor attention_weights, int[] num_points_list) -> (Tensor, Tensor, Tensor)");
}
