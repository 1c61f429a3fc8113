#include "common/checks.h"

namespace dfine {

void check_like(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name, const char* like_name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
              like_name, " has ", like.scalar_type(), "; they must match");
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but ", like_name, " is on ",
              like.device(), "; they must match");
}

void check_rows(const at::Tensor& t, int64_t rows, const at::Tensor& like, const char* op, const char* name,
                const char* like_name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows, op, ": ", name, " must have shape [N=", rows, "], got ", t.sizes());
  check_like(t, like, op, name, like_name);
}

void check_floating_point(const at::Tensor& t, const char* op, const char* name) {
  const at::ScalarType d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kDouble || d == at::kHalf || d == at::kBFloat16, op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", d);
}

}  // namespace dfine
