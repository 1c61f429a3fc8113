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

// The kernels compute in float32 or float64.
void check_float32_or_64(const at::Tensor& t, const char* op, const char* name);

}  // namespace dfine
