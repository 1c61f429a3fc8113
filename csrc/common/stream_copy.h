// Copies into memory that the kernel writes once and does not read again (a gradient), with
// non-temporal (streaming) stores when the destination is 16-byte aligned: no read-for-ownership of
// its lines, and no eviction of the inputs still being read. SSE2 stores, part of baseline x86-64,
// so every ISA copy of a kernel uses them.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "common/macros.h"

namespace dfine {

// dst[0:bytes) = src[0:bytes) (bytes a multiple of 16 for the streaming path). Call stream_fence()
// before the thread's results are used.
DFINE_FORCE_INLINE void stream_copy(void* dst, const void* src, size_t bytes) {
#if defined(__SSE2__)
  if (reinterpret_cast<uintptr_t>(dst) % 16 == 0 && bytes % 16 == 0) {
    const char* s = static_cast<const char*>(src);
    char* d = static_cast<char*>(dst);
    for (size_t c = 0; c < bytes; c += 16) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + c), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + c)));
    }
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

// Streaming stores are weakly ordered: complete them before the task ends.
DFINE_FORCE_INLINE void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

}  // namespace dfine
