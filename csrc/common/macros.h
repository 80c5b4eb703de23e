// Macros of the shared host/device math headers.
#pragma once

#include <c10/macros/Macros.h>

// The per-element functions are small and called per point/tap: always
// inlined, so that the optimiser sees one loop body (GCC's heuristics give up
// on inlining them once the kernels grow).
#if defined(__CUDACC__)
#define NANOBRAGG_INLINE C10_HOST_DEVICE __forceinline__
#else
#define NANOBRAGG_INLINE C10_HOST_DEVICE C10_ALWAYS_INLINE
#endif

// Loop-unrolling hint for the fixed 4-node loops of the stencils, spelled for
// whichever compiler sees the shared host/device headers. Under nvcc the
// device pass defines __CUDA_ARCH__; its host pass (host code of .cu files,
// never the hot CPU kernels, which g++ builds) gets no hint.

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
