// Argument checks shared by the ops' CPU and CUDA entry points. Every message starts with the op
// and names the argument.
#pragma once

#include <ATen/ATen.h>

namespace dfine {

// t has the dtype and the device of `like` (called like_name in the message).
void check_like(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name, const char* like_name);

// t is a 1-D tensor of `rows` elements with the dtype and the device of `like`.
void check_rows(const at::Tensor& t, int64_t rows, const at::Tensor& like, const char* op, const char* name,
                const char* like_name);

// float16, bfloat16, float32 or float64 (16-bit tensors are computed in float32).
void check_floating_point(const at::Tensor& t, const char* op, const char* name);

}  // namespace dfine
