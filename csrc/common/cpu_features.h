// Run-time choice between ISA copies of the CPU kernels.
//
// The extension is compiled for baseline x86-64 (a portable binary: 128-bit SSE2). Each CPU kernel's
// task loop is therefore compiled twice from the same source: once for the baseline and once with
// AVX2 (+ FMA) enabled through a target attribute; the math it calls is always_inline, so it is
// generated for the ISA of the loop. The AVX2 copy runs when the CPU has it.
//
// Environment: DFINE_CPU_DISABLE_AVX2=1 forces the baseline copies (read once; the tests compare
// the copies). DFINE_CPU_DISABLE_AVX512=1 is accepted and has no effect: there is no AVX-512 copy.
#pragma once

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__AVX2__)
#define DFINE_CPU_DISPATCH_AVX2 1
// Without FMA: the ms_deform_attn copies then round identically (same operations, same order).
#define DFINE_TARGET_AVX2 __attribute__((target("avx2")))
// With FMA: GCC contracts a * b + c in C++ (its default -ffp-contract=fast), so the two copies of
// the FDR kernels may differ in the last bits; the tests compare them with a tolerance.
#define DFINE_TARGET_AVX2_FMA __attribute__((target("avx2,fma")))
#else
#define DFINE_CPU_DISPATCH_AVX2 0
#endif

#if defined(__GNUC__)
#define DFINE_ALWAYS_INLINE __attribute__((always_inline))
#else
#define DFINE_ALWAYS_INLINE
#endif

namespace dfine {
namespace cpu {

// Whether the AVX2 copies run: the CPU has AVX2 and FMA and DFINE_CPU_DISABLE_AVX2 is not 1.
bool has_avx2();

#if DFINE_CPU_DISPATCH_AVX2
template <typename Body>
DFINE_TARGET_AVX2_FMA void run_avx2_fma(const Body& body) {
  body();
}
#endif

template <typename Body>
void run_baseline(const Body& body) {
  body();
}

// body() from the AVX2 + FMA copy or the baseline one. `body` must be an always_inline lambda
// (DFINE_ISA_BODY), or it is compiled once, for the baseline.
template <typename Body>
DFINE_ALWAYS_INLINE inline void run_best_isa(const Body& body) {
#if DFINE_CPU_DISPATCH_AVX2
  if (has_avx2()) return run_avx2_fma(body);
#endif
  run_baseline(body);
}

}  // namespace cpu
}  // namespace dfine

#define DFINE_ISA_BODY [&]() __attribute__((always_inline))
