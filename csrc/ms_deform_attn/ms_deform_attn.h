// Host-side declarations shared by the CPU and CUDA implementations of dfine::ms_deform_attn_*.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace dfine {
namespace msda {

// Sizes of a validated call.
struct Dims {
  int64_t B, S, M, D, Q, P, L;
};

// Checks ranks, shapes, dtypes and devices; every message names the argument and what was expected.
// check_level_sizes reads spatial_shapes on the host (CPU tensors only: on CUDA it would sync).
Dims check_forward_inputs(const char* op, const at::Tensor& value, const at::Tensor& spatial_shapes,
                          const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                          at::IntArrayRef num_points_list, bool check_level_sizes);

void check_grad_output(const char* op, const at::Tensor& grad_output, const at::Tensor& value, const Dims& dims);

}  // namespace msda
}  // namespace dfine
