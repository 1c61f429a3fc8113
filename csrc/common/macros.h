// Function attributes shared by the CPU and CUDA sources.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DFINE_HOST_DEVICE __host__ __device__
#define DFINE_UNROLL _Pragma("unroll")
#define DFINE_FORCE_INLINE __forceinline__
#else
#define DFINE_HOST_DEVICE
#define DFINE_UNROLL
#if defined(__GNUC__)
// always_inline: the math is then compiled into each ISA copy of the CPU kernel that calls it
// (common/cpu_features.h), instead of once for the baseline ISA.
#define DFINE_FORCE_INLINE inline __attribute__((always_inline))
#else
#define DFINE_FORCE_INLINE inline
#endif
#endif

// Per-element math of the kernels: host and device, always inlined.
#define DFINE_HD DFINE_HOST_DEVICE DFINE_FORCE_INLINE
