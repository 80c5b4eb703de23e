// The AVX2 kernels of the common absorption case (intensity and position
// shared by every layer, contiguous [P] and [P, 3]): the formulas of
// absorption_math.h on at::vec::Vectorized, 8 (float) or 4 (double) pixels
// at a time, with SLEEF's vectorised exp/expm1. Built only on x86-64, from
// absorption_cpu_avx2.cpp with -mavx2 -mfma; called only when
// cpu::use_avx2().
#pragma once

#include <cstdint>

#include "absorption/absorption_math.h"

namespace nanobragg {
namespace absorption {
namespace avx2 {

// out[p] = shared_pixel_value(..., I = value[p * value_stride], ...) for p
// in [begin, end): the forward (value = intensity, stride 1) and the
// intensity-only backward (value = the incoming gradient, any stride: 0 for
// the expanded gradient of .sum()), since dL/dI = g * capture.
template <typename T>
void shared_forward(const AbsorptionParams<T>& prm, const T* value, int64_t value_stride,
                    const T* coords, T* out, int64_t begin, int64_t end);

// Writes grad_intensity[p] and grad_coords[3p..3p+2] (either may be null)
// and, when sums is not null, adds per pixel in order of 8/4-wide lanes
// dL/ds and dL/dodet to sums[0..3]. The incoming gradient of pixel p is
// grad[p * grad_stride].
template <typename T>
void shared_backward(const AbsorptionParams<T>& prm, const T* intensity, const T* coords,
                     const T* grad, int64_t grad_stride, T* grad_intensity, T* grad_coords,
                     int64_t begin, int64_t end, double* sums);

}  // namespace avx2
}  // namespace absorption
}  // namespace nanobragg
