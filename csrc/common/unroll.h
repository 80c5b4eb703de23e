// Loop-unrolling hint for the fixed 4-node loops of the stencils, spelled for
// whichever compiler sees the shared host/device headers.
#pragma once

#if defined(__CUDACC__) || defined(__clang__)
#define NANOBRAGG_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define NANOBRAGG_UNROLL _Pragma("GCC unroll 4")
#else
#define NANOBRAGG_UNROLL
#endif
