// The CUDA kernels of ms_deform_attn, run on the CPU: the warp bodies and the host sequence of
// coalesced.h (exactly what ms_deform_attn_cuda.cu launches) over emulated 32-lane warps
// (lanes::EmulatedWarp). Compiled in every build, CUDA or not, for the tests only:
//
//   torch.ops.dfine_testing.ms_deform_attn_forward_emulated(value, spatial_shapes, sampling_locations,
//       attention_weights, num_points_list, vec=0, group=0) -> out
//   torch.ops.dfine_testing.ms_deform_attn_backward_emulated(grad_output, value, spatial_shapes,
//       sampling_locations, attention_weights, num_points_list, deterministic=None, vec=0, group=0,
//       warp_order_seed=-1) -> (grad_value, grad_sampling_locations, grad_attention_weights)
//   torch.ops.dfine_testing.ms_deform_attn_cuda_layout(D, elem_size, max_vec, vec=0, group=0)
//       -> [vec, group, rounds]
//
// deterministic=None decides as the CUDA op does (torch.use_deterministic_algorithms), True/False
// force the two-pass gather / the atomics. vec / group > 0 force the layout (0: the one the GPU
// would get). warp_order_seed >= 0 runs the
// warps in a seeded random order, standing in for a GPU's scheduling: the atomic backward then
// adds in another order, the deterministic one must not change. CPU tensors only.
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <optional>
#include <random>
#include <vector>

#include "ms_deform_attn/cuda/coalesced.h"
#include "ms_deform_attn/ms_deform_attn.h"

namespace dfine {
namespace msda {
namespace coalesced {
namespace {

struct EmulatedLaunch {
  int64_t warp_order_seed = -1;

  std::vector<int64_t> order(int64_t items) const {
    std::vector<int64_t> items_in_order(static_cast<size_t>(items));
    std::iota(items_in_order.begin(), items_in_order.end(), int64_t{0});
    if (warp_order_seed >= 0) {
      std::mt19937_64 rng(static_cast<uint64_t>(warp_order_seed));
      std::shuffle(items_in_order.begin(), items_in_order.end(), rng);
    }
    return items_in_order;
  }

  template <int V, typename S>
  void forward(const Inputs<S>& in, S* out, int64_t items) const {
    const lanes::EmulatedWarp w;
    for (int64_t item : order(items)) forward_warp<lanes::EmulatedWarp, V>(w, in, out, item);
  }

  template <int V, bool kDeterministic, typename S>
  void backward(const Inputs<S>& in, const Grads<S>& g, int64_t items) const {
    const lanes::EmulatedWarp w;
    for (int64_t item : order(items)) backward_warp<lanes::EmulatedWarp, V, kDeterministic>(w, in, g, item);
  }

  template <int V, typename S>
  void gather(const Gather<S>& a, int64_t items) const {
    const lanes::EmulatedWarp w;
    for (int64_t item : order(items)) gather_warp<lanes::EmulatedWarp, V>(w, a, item);
  }
};

void check_cpu(const char* op, const at::Tensor& value) {
  TORCH_CHECK(value.device().is_cpu(), op, ": the emulated CUDA kernels take CPU tensors, got value on ",
              value.device());
}

at::Tensor forward_emulated(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                            at::IntArrayRef num_points_list, int64_t vec, int64_t group) {
  constexpr const char* op = "dfine_testing::ms_deform_attn_forward_emulated";
  check_cpu(op, value);
  const Dims dims =
      check_forward_inputs(op, value, spatial_shapes, sampling_locations, attention_weights, num_points_list, true);
  return forward(EmulatedLaunch{}, op, value, spatial_shapes, sampling_locations, attention_weights, num_points_list,
                 dims, Overrides{vec, group});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_emulated(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, at::IntArrayRef num_points_list,
    std::optional<bool> deterministic, int64_t vec, int64_t group, int64_t warp_order_seed) {
  constexpr const char* op = "dfine_testing::ms_deform_attn_backward_emulated";
  check_cpu(op, value);
  const Dims dims =
      check_forward_inputs(op, value, spatial_shapes, sampling_locations, attention_weights, num_points_list, true);
  check_grad_output(op, grad_output, value, dims);
  return backward(EmulatedLaunch{warp_order_seed}, op, grad_output, value, spatial_shapes, sampling_locations,
                  attention_weights, num_points_list, dims, deterministic.value_or(deterministic_backward()),
                  Overrides{vec, group});
}

std::vector<int64_t> cuda_layout(int64_t D, int64_t elem_size, int64_t max_vec, int64_t vec, int64_t group) {
  const Layout layout = choose_layout(D, static_cast<int>(elem_size), static_cast<int>(max_vec), vec, group);
  return {layout.vec, layout.group, layout.rounds};
}

}  // namespace
}  // namespace coalesced
}  // namespace msda
}  // namespace dfine

TORCH_LIBRARY_FRAGMENT(dfine_testing, m) {
  m.def(
      "ms_deform_attn_forward_emulated(Tensor value, Tensor spatial_shapes, Tensor sampling_locations, "
      "Tensor attention_weights, int[] num_points_list, int vec=0, int group=0) -> Tensor");
  m.def(
      "ms_deform_attn_backward_emulated(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor sampling_locations, Tensor attention_weights, int[] num_points_list, bool? deterministic=None, "
      "int vec=0, int group=0, int warp_order_seed=-1) -> (Tensor, Tensor, Tensor)");
  m.def("ms_deform_attn_cuda_layout(int D, int elem_size, int max_vec, int vec=0, int group=0) -> int[]",
        &dfine::msda::coalesced::cuda_layout);
}

TORCH_LIBRARY_IMPL(dfine_testing, CPU, m) {
  m.impl("ms_deform_attn_forward_emulated", &dfine::msda::coalesced::forward_emulated);
  m.impl("ms_deform_attn_backward_emulated", &dfine::msda::coalesced::backward_emulated);
}
