// CUDA kernels of multi-scale deformable attention (float32, float64, float16, bfloat16; the
// arithmetic runs in at::opmath_type, i.e. float for the 16-bit types). The kernels are thin:
// the warp bodies and the host sequence are in coalesced.h (design there and in docs/kernels.md),
// shared with the CPU emulation that the tests run (emulated_warps.cpp); the per-sample math is in
// ms_deform_attn_math.h, shared with the CPU kernel.
//
// Backward: grad_value with atomics by default; under torch.use_deterministic_algorithms(True) the
// two-pass gather of coalesced.h, whose result is the same bits from run to run.
// spatial_shapes is read from the device tensor inside the kernels (no host sync); the per-level
// point counts travel by value, capped at kMaxLevels levels.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "ms_deform_attn/cuda/coalesced.h"
#include "ms_deform_attn/ms_deform_attn.h"

namespace dfine {
namespace msda {
namespace coalesced {
namespace {

constexpr int kThreads = 256;  // 8 warps per block
constexpr int kWarpsPerBlock = kThreads / kWarpSize;

// Grid-stride over warp items: the item index is the same in every lane of a warp.
#define DFINE_FOR_EACH_WARP_ITEM(items, item)                                                              \
  for (int64_t item = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarpSize; item < (items); \
       item += static_cast<int64_t>(gridDim.x) * blockDim.x / kWarpSize)

template <int V, typename S>
__global__ void __launch_bounds__(kThreads) forward_kernel(const Inputs<S> in, S* out, int64_t items) {
  const lanes::DeviceWarp w;
  DFINE_FOR_EACH_WARP_ITEM(items, item) { forward_warp<lanes::DeviceWarp, V>(w, in, out, item); }
}

template <int V, bool kDeterministic, typename S>
__global__ void __launch_bounds__(kThreads) backward_kernel(const Inputs<S> in, const Grads<S> g, int64_t items) {
  const lanes::DeviceWarp w;
  DFINE_FOR_EACH_WARP_ITEM(items, item) { backward_warp<lanes::DeviceWarp, V, kDeterministic>(w, in, g, item); }
}

template <int V, typename S>
__global__ void __launch_bounds__(kThreads) gather_kernel(const Gather<S> a, int64_t items) {
  const lanes::DeviceWarp w;
  DFINE_FOR_EACH_WARP_ITEM(items, item) { gather_warp<lanes::DeviceWarp, V>(w, a, item); }
}

int blocks_for(int64_t items) {
  const int64_t blocks = (items + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t{1} << 16)));
}

// What coalesced::forward / backward launch on the GPU.
struct CudaLaunch {
  cudaStream_t stream;

  template <int V, typename S>
  void forward(const Inputs<S>& in, S* out, int64_t items) const {
    forward_kernel<V, S><<<blocks_for(items), kThreads, 0, stream>>>(in, out, items);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <int V, bool kDeterministic, typename S>
  void backward(const Inputs<S>& in, const Grads<S>& g, int64_t items) const {
    backward_kernel<V, kDeterministic, S><<<blocks_for(items), kThreads, 0, stream>>>(in, g, items);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <int V, typename S>
  void gather(const Gather<S>& a, int64_t items) const {
    gather_kernel<V, S><<<blocks_for(items), kThreads, 0, stream>>>(a, items);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                                       at::IntArrayRef num_points_list) {
  constexpr const char* op = "dfine::ms_deform_attn_forward";
  // sum(H*W) == S is not checked here: it would need a device->host copy (the Python layer checks it).
  const Dims dims =
      check_forward_inputs(op, value, spatial_shapes, sampling_locations, attention_weights, num_points_list, false);
  const c10::cuda::CUDAGuard guard(value.device());
  const CudaLaunch launch{c10::cuda::getCurrentCUDAStream()};
  return forward(launch, op, value, spatial_shapes, sampling_locations, attention_weights, num_points_list, dims);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, at::IntArrayRef num_points_list) {
  constexpr const char* op = "dfine::ms_deform_attn_backward";
  const Dims dims =
      check_forward_inputs(op, value, spatial_shapes, sampling_locations, attention_weights, num_points_list, false);
  check_grad_output(op, grad_output, value, dims);
  const c10::cuda::CUDAGuard guard(value.device());
  const CudaLaunch launch{c10::cuda::getCurrentCUDAStream()};
  return backward(launch, op, grad_output, value, spatial_shapes, sampling_locations, attention_weights,
                  num_points_list, dims, deterministic_backward());
}

}  // namespace
}  // namespace coalesced
}  // namespace msda
}  // namespace dfine

TORCH_LIBRARY_IMPL(dfine, CUDA, m) {
  m.impl("ms_deform_attn_forward", &dfine::msda::coalesced::ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &dfine::msda::coalesced::ms_deform_attn_backward_cuda);
}
