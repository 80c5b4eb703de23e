// Launch geometry shared by every CUDA kernel: blocks of kThreads threads,
// at most as many blocks as the device holds resident at once, and
// grid-stride loops (64-bit indices) over the rest, so that every loop
// iterates more than once on inputs larger than one wave (which the tests
// rely on to cover the loops). Kernels that write a partial sum per block
// take a grid of a fixed size instead (reduction_blocks_for).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <ATen/cuda/CUDAContext.h>
#endif

namespace nanobragg {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

#if defined(__CUDACC__)

// Blocks for n work items (threads), at least 1: one per kThreads items, but
// no more than fill the current device once. Reads cached device properties:
// no synchronisation.
inline int64_t blocks_for(int64_t n) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t resident =
      int64_t(prop->multiProcessorCount) * (prop->maxThreadsPerMultiProcessor / kThreads);
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  const int64_t cap = resident < 1 ? 1 : resident;
  return wanted < 1 ? 1 : (wanted > cap ? cap : wanted);
}

// Blocks of a kernel that writes one partial sum per block: one per kThreads
// items, at most kReductionBlocks. A function of n only, not of the device:
// the partials, and so the sums to the last bit, are the same on GPUs with
// different numbers of SMs (1024 blocks: about one wave on an H100 or H200).
constexpr int64_t kReductionBlocks = 1024;
inline int64_t reduction_blocks_for(int64_t n) {
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  return wanted < 1 ? 1 : (wanted > kReductionBlocks ? kReductionBlocks : wanted);
}

// Calls body(i) for i in [0, n), spread over the whole grid, each thread
// taking every (gridDim.x * blockDim.x)-th index.
template <typename Body>
__device__ __forceinline__ void grid_stride(int64_t n, const Body& body) {
  const int64_t step = int64_t(blockDim.x) * gridDim.x;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += step) {
    body(i);
  }
}

// The same over warps: body(w, lane) for warp-sized work items w in [0, n);
// all 32 lanes of a warp see the same w (so warp shuffles inside are safe).
template <typename Body>
__device__ __forceinline__ void warp_stride(int64_t n, const Body& body) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_grid = int64_t(blockDim.x) * gridDim.x / kWarp;
  for (int64_t w = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp; w < n;
       w += warps_per_grid) {
    body(w, lane);
  }
}

#endif  // __CUDACC__

}  // namespace cuda
}  // namespace nanobragg
