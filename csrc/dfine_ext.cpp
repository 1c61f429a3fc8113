// The Python module dfine._C. Importing it registers every kernel under torch.ops.dfine
// (each op's sources carry their own TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL blocks).
#include <torch/extension.h>

namespace dfine {

bool with_cuda() {
#ifdef DFINE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace dfine

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "D-FINE fused kernels (ops are registered under torch.ops.dfine)";
  m.def("with_cuda", &dfine::with_cuda, "whether the CUDA kernels were compiled in");
}
