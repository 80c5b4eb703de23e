// One CPU-capability dispatch, in ATen's style (ATen/native/DispatchStub.h):
// every CPU kernel source (csrc/*/*_cpu.cpp) is compiled once per capability
// with that capability's flags, CPU_CAPABILITY=<name> and
// CPU_CAPABILITY_<name> defined (CMakeLists.txt, nanobragg_cpu_kernels), so
// its functions live in namespace CPU_CAPABILITY (DEFAULT, AVX2, AVX512) and
// at::vec::Vectorized is that capability's (8/4 lanes with AVX2, 16/8 with
// AVX-512, a plain array by default). ops/cpu_registration.cpp registers one CPU
// kernel per op that calls the build chosen here, once per process: the best
// the CPU has, or the one ATEN_CPU_CAPABILITY names (default, avx2, avx512,
// as ATen reads it; capped at what the CPU has).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

// Lambdas of kernel loops are always inlined, so that the whole loop body is
// compiled with the capability's flags and vectorised as one.
#if (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define NANOBRAGG_LAMBDA_INLINE __attribute__((always_inline))
#else
#define NANOBRAGG_LAMBDA_INLINE
#endif

namespace nanobragg {
namespace cpu {

enum class Capability : int { Default = 0, AVX2 = 1, AVX512 = 2 };

// The capability whose kernels run (decided once per process).
Capability capability();
// Its name as ATEN_CPU_CAPABILITY spells it: "default", "avx2", "avx512".
const char* capability_name(Capability c);
// What the CPU and this build support, ignoring ATEN_CPU_CAPABILITY.
Capability best_supported_capability();

// The function of the chosen capability; a build without a capability
// passes nullptr for it (then the next lower one runs).
template <typename Fn>
Fn pick(Fn default_fn, Fn avx2_fn, Fn avx512_fn) {
  const Capability c = capability();
  if (c == Capability::AVX512 && avx512_fn != nullptr) return avx512_fn;
  if (c >= Capability::AVX2 && avx2_fn != nullptr) return avx2_fn;
  return default_fn;
}

// body(i) for i in [begin, end): a plain loop, compiled in the kernel's own
// translation unit (hence with its capability's flags).
template <typename Body>
C10_ALWAYS_INLINE void for_each_index(const Body& body, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    body(i);
  }
}

}  // namespace cpu
}  // namespace nanobragg
