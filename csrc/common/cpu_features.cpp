#include "common/cpu_features.h"

#include <cstdlib>
#include <cstring>

namespace dfine {
namespace cpu {

bool has_avx2() {
#if DFINE_CPU_DISPATCH_AVX2
  static const bool has = [] {
    const char* disable = std::getenv("DFINE_CPU_DISABLE_AVX2");
    if (disable != nullptr && std::strcmp(disable, "1") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace dfine
