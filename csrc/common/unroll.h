// Loop-unrolling hint for the fixed 4-node loops of the stencils, spelled for
// whichever compiler sees the shared host/device headers. Under nvcc the
// device pass defines __CUDA_ARCH__; its host pass (host code of .cu files,
// never the hot CPU kernels, which g++ builds) gets no hint.
#pragma once

#if defined(__CUDA_ARCH__)
#define NANOBRAGG_UNROLL _Pragma("unroll")
#elif defined(__CUDACC__)
#define NANOBRAGG_UNROLL
#elif defined(__clang__)
#define NANOBRAGG_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define NANOBRAGG_UNROLL _Pragma("GCC unroll 4")
#else
#define NANOBRAGG_UNROLL
#endif
