// Runs the CPU kernels' inner loops compiled for the best instruction set the
// machine has: AVX2 + FMA on x86-64 CPUs that have them (twice the speed of
// the baseline x86-64 code on the tricubic stencil), else the baseline. The
// choice follows ATen's (at::native::get_cpu_capability, so
// ATEN_CPU_CAPABILITY=default forces the baseline, e.g. in tests).
//
// Usage: for_each_index(body, begin, end) with
//   auto body = [&](int64_t i) NANOBRAGG_LAMBDA_INLINE { ... };
// The body must be inlinable (always_inline) so that it is compiled inside
// the AVX2-targeted loop; the math headers' functions are always_inline.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define NANOBRAGG_HAVE_AVX2_CLONE 1
#define NANOBRAGG_LAMBDA_INLINE __attribute__((always_inline))
#else
#define NANOBRAGG_HAVE_AVX2_CLONE 0
#define NANOBRAGG_LAMBDA_INLINE
#endif

namespace nanobragg {
namespace cpu {

// True when the AVX2 clones are used (decided once per process).
bool use_avx2();

template <typename Body>
C10_NOINLINE void for_each_index_baseline(const Body& body, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    body(i);
  }
}

#if NANOBRAGG_HAVE_AVX2_CLONE
template <typename Body>
__attribute__((target("avx2,fma"))) C10_NOINLINE void for_each_index_avx2(const Body& body,
                                                                          int64_t begin,
                                                                          int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    body(i);
  }
}
#endif

template <typename Body>
void for_each_index(const Body& body, int64_t begin, int64_t end) {
#if NANOBRAGG_HAVE_AVX2_CLONE
  if (use_avx2()) {
    for_each_index_avx2(body, begin, end);
    return;
  }
#endif
  for_each_index_baseline(body, begin, end);
}

}  // namespace cpu
}  // namespace nanobragg
