// The Python module dfine._C. Importing it registers every kernel under torch.ops.dfine
// (each op's sources carry their own TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL blocks).
#include <torch/extension.h>

#include <string>

// setup.py passes the nvcc -gencode targets as DFINE_CUDA_ARCHS=sm_80,compute_80 (a bare token list: the
// variadic stringify keeps its commas)
#define DFINE_STRINGIFY_ALL(...) #__VA_ARGS__
#define DFINE_STRINGIFY(...) DFINE_STRINGIFY_ALL(__VA_ARGS__)

namespace dfine {

bool with_cuda() {
#ifdef DFINE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string cuda_archs() {
#if defined(DFINE_WITH_CUDA) && defined(DFINE_CUDA_ARCHS)
  return DFINE_STRINGIFY(DFINE_CUDA_ARCHS);
#else
  return "";
#endif
}

}  // namespace dfine

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "D-FINE fused kernels (ops are registered under torch.ops.dfine)";
  m.def("with_cuda", &dfine::with_cuda, "whether the CUDA kernels were compiled in");
  m.def("cuda_archs", &dfine::cuda_archs,
        "the CUDA targets the kernels were compiled for, e.g. \"sm_80,compute_80\" (empty without CUDA)");
}
