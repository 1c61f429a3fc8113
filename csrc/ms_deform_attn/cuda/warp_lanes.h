// The 32 lanes of a warp, as the kernel bodies of coalesced.h see them, so that the same source
// runs on a GPU and, emulated, on the CPU (where the tests run it).
//
// A body is written for a whole warp: per-lane steps are lambdas `[&](int lane) {...}` passed to
// `w.for_lanes`, and values that differ between lanes are `Var<T>`s indexed by the lane. Between
// per-lane steps the body may exchange values with `w.shuffle(x, src)` (lane l receives x of lane
// src(l)); every lane of the warp must reach every shuffle (as __shfl_sync with a full mask needs).
//
//   DeviceWarp    (nvcc only): a thread holds its own lane's value (Var<T> is one T and ignores
//                 the index), for_lanes calls the step once for the thread's lane, shuffle is
//                 __shfl_sync, atomic_add is an atomic.
//   EmulatedWarp  (CPU): Var<T> holds all 32 values, for_lanes runs the step for lanes 0..31 in
//                 turn, shuffle reads the other lanes' values, atomic_add is a plain addition.
#pragma once

#include <cstdint>

#include "common/macros.h"

#if defined(__CUDACC__)
#include <ATen/cuda/Atomic.cuh>
#endif

namespace dfine {
namespace lanes {

constexpr int kWarpSize = 32;

// One value per lane held by this thread (N = 1 on the GPU) or by the emulated warp (N = 32).
template <typename T, int N>
struct PerLane {
  T v[N];
  DFINE_HD T& operator[](int lane) { return v[lane]; }
  DFINE_HD const T& operator[](int lane) const { return v[lane]; }
};

template <typename T>
struct PerLane<T, 1> {
  T v;
  DFINE_HD T& operator[](int) { return v; }
  DFINE_HD const T& operator[](int) const { return v; }
};

struct EmulatedWarp {
  template <typename T>
  using Var = PerLane<T, kWarpSize>;

  template <typename F>
  void for_lanes(F&& step) const {
    for (int lane = 0; lane < kWarpSize; ++lane) step(lane);
  }

  template <typename T, typename Src>
  Var<T> shuffle(const Var<T>& x, Src src) const {
    Var<T> out;
    for (int lane = 0; lane < kWarpSize; ++lane) out[lane] = x[src(lane)];
    return out;
  }

  template <typename T>
  void atomic_add(T* address, T value) const {
    *address += value;
  }
};

#if defined(__CUDACC__)
// The methods are __host__ __device__ so that the __host__ __device__ bodies may call them in both
// compilation passes; the host versions are never run (the bodies run on the GPU only).
struct DeviceWarp {
  template <typename T>
  using Var = PerLane<T, 1>;

  DFINE_HD static int lane() {
#if defined(__CUDA_ARCH__)
    return static_cast<int>(threadIdx.x) & (kWarpSize - 1);
#else
    return 0;
#endif
  }

  template <typename F>
  DFINE_HD void for_lanes(F&& step) const {
    step(lane());
  }

  template <typename T, typename Src>
  DFINE_HD Var<T> shuffle(const Var<T>& x, Src src) const {
    Var<T> out;
#if defined(__CUDA_ARCH__)
    out.v = __shfl_sync(0xffffffffu, x.v, src(lane()));
#else
    out.v = x.v;
#endif
    return out;
  }

  template <typename T>
  DFINE_HD void atomic_add(T* address, T value) const {
#if defined(__CUDA_ARCH__)
    gpuAtomicAdd(address, value);
#else
    *address += value;
#endif
  }
};
#endif

// V consecutive elements of S, aligned to their size: one vector load/store (up to 16 bytes).
template <typename S, int V>
struct alignas(sizeof(S) * V) Pack {
  S x[V];
};

// out[v] = A(p[v]), v < V, in one load; p must be aligned to V * sizeof(S).
template <int V, typename A, typename S>
DFINE_HD void load_vec(const S* p, A* out) {
  const Pack<S, V> pack = *reinterpret_cast<const Pack<S, V>*>(p);
  DFINE_UNROLL
  for (int v = 0; v < V; ++v) out[v] = static_cast<A>(pack.x[v]);
}

// p[v] = S(in[v]), v < V, in one store; p must be aligned to V * sizeof(S).
template <int V, typename A, typename S>
DFINE_HD void store_vec(S* p, const A* in) {
  Pack<S, V> pack;
  DFINE_UNROLL
  for (int v = 0; v < V; ++v) pack.x[v] = static_cast<S>(in[v]);
  *reinterpret_cast<Pack<S, V>*>(p) = pack;
}

}  // namespace lanes
}  // namespace dfine
