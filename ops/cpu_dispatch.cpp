#include "common/cpu_dispatch.h"

#include <cstdlib>
#include <cstring>

namespace nanobragg {
namespace cpu {

bool use_avx2() {
#if NANOBRAGG_HAVE_AVX2_CLONE
  static const bool avx2 = [] {
    // The same switch as ATen's: ATEN_CPU_CAPABILITY=default forces the
    // baseline code.
    const char* forced = std::getenv("ATEN_CPU_CAPABILITY");
    if (forced != nullptr && std::strcmp(forced, "default") == 0) {
      return false;
    }
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return avx2;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace nanobragg
