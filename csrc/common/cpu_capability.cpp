#include "common/cpu_capability.h"

#include <cstdlib>
#include <cstring>

namespace nanobragg {
namespace cpu {

Capability best_supported_capability() {
  static const Capability best = [] {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
#if NANOBRAGG_HAVE_AVX512_KERNELS
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("fma")) {
      return Capability::AVX512;
    }
#endif
#if NANOBRAGG_HAVE_AVX2_KERNELS
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      return Capability::AVX2;
    }
#endif
#endif
    return Capability::Default;
  }();
  return best;
}

Capability capability() {
  static const Capability chosen = [] {
    const Capability best = best_supported_capability();
    // ATen's switch and spelling: a lower capability than the CPU's is
    // honoured, a higher one is capped (as ATen does).
    const char* forced = std::getenv("ATEN_CPU_CAPABILITY");
    Capability want = best;
    if (forced != nullptr) {
      if (std::strcmp(forced, "default") == 0) want = Capability::Default;
      if (std::strcmp(forced, "avx2") == 0) want = Capability::AVX2;
      if (std::strcmp(forced, "avx512") == 0) want = Capability::AVX512;
    }
    Capability runs = want < best ? want : best;
#if !NANOBRAGG_HAVE_AVX2_KERNELS
    // Not built: pick() runs the build below it, and so is it named.
    if (runs == Capability::AVX2) runs = Capability::Default;
#endif
    return runs;
  }();
  return chosen;
}

const char* capability_name(Capability c) {
  switch (c) {
    case Capability::AVX512:
      return "avx512";
    case Capability::AVX2:
      return "avx2";
    default:
      return "default";
  }
}

}  // namespace cpu
}  // namespace nanobragg
