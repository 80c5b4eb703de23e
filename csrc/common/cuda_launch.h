// Launch geometry shared by the CUDA kernels: a fixed block size and a grid
// that grid-stride loops (64-bit indices) cover beyond its cap.
#pragma once

#include <cstdint>

namespace nanobragg {
namespace cuda {

constexpr int kThreads = 256;

// Blocks for n elements, at least 1 and at most max_blocks.
inline int64_t blocks_for(int64_t n, int64_t max_blocks = int64_t(1) << 20) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return b < 1 ? 1 : (b > max_blocks ? max_blocks : b);
}

}  // namespace cuda
}  // namespace nanobragg
