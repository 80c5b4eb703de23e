// nanobragg_ops: the public C++ API. Plain functions that call the operators
// through the PyTorch dispatcher, so autograd, device dispatch (CPU, CUDA)
// and tracing all apply, exactly as for torch.ops.nanobragg.* in Python.
// The full contract of each operator is docs/CONTRACT.md in the source tree.
//
// Common to both: float32 or float64 data (the tensors on one device, CPU or
// CUDA), any strides; bad input throws c10::Error naming the operator and the
// argument; results do not depend on the thread count; the functions may be
// called from several threads at once (they keep no state between calls).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <string>
#include <type_traits>
#include <variant>

namespace nanobragg_ops {

// Tricubic (4-point Lagrange) interpolation of a structure-factor grid, as
// nanoBragg's polin3.
//   grid:      [Nh, Nk, Nl] float32/float64; grid[i, j, k] is the value at the
//              Miller index (h_min + i, k_min + j, l_min + k).
//   hkl:       [..., 3] fractional Miller indices, grid's dtype and device.
//   index_min: (h_min, k_min, l_min), exactly 3 entries (a single int64
//              converts to an IntArrayRef of one, which is an error).
//   default_value: returned where the 4x4x4 stencil leaves the grid, and
//              for non-finite coordinates.
//   out_of_range: "default" (default_value) or "nearest" (the grid value at
//              the nearest node, ceil(x - 0.5) per axis, or default_value if
//              that node is outside the grid too). Decided per point.
// Returns hkl.shape[:-1], grid's dtype. Differentiable in grid and hkl.
at::Tensor tricubic_interp(const at::Tensor& grid, const at::Tensor& hkl, at::IntArrayRef index_min,
                           double default_value = 0.0, c10::string_view out_of_range = "default");

// Capture fraction of a sensor of finite thickness split into L = thicksteps
// layers, as nanoBragg's -detector_thick/-detector_abs/-thicksteps/
// -oversample_thick. Per pixel and layer t, with the parallax
// rho_t = odet . p_t / |p_t| (|rho_t| clamped to >= 1e-10), dz = thickness / L
// and mu = 1 / attenuation_length:
//   c_t = exp(-t dz mu / rho_t) - exp(-(t+1) dz mu / rho_t)
//   out = sum_t c_t I_t (oversample_thick) or c_{L-1} * mean_t I_t.
//   intensity:    pixel intensities; pixel_coords: [..., 3] pixel positions
//                 relative to the sample, intensity's dtype (any unit: only
//                 their direction p / |p| enters).
//   per_layer:    false: one intensity and position for all layers (they
//                 broadcast to the pixel shape P); true: dimension 0 of both
//                 is the layer dimension, of size L or 1.
//   odet:         [3] detector normal, a unit vector.
//   thickness:    0-dim, finite and >= 0 (0: no thickness modelling, the
//                 mean of the layers' intensities); attenuation_length: 0-dim,
//                 > 0, in thickness's unit (inf: nothing absorbed, out = 0).
//                 odet and both scalars: any floating dtype, read as double;
//                 on intensity's device, or the scalars 0-dim CPU tensors.
//                 Held on a GPU an invalid scalar cannot be checked without
//                 waiting for the device, and gives an all-NaN result.
//   thicksteps:   L >= 1.
// Returns P, intensity's dtype. Differentiable in intensity, pixel_coords,
// odet, thickness and attenuation_length.
at::Tensor detector_absorption(const at::Tensor& intensity, const at::Tensor& pixel_coords,
                               const at::Tensor& odet, const at::Tensor& thickness,
                               const at::Tensor& attenuation_length, int64_t thicksteps,
                               bool oversample_thick, bool per_layer = false);

// The number overload's implementation (below).
namespace detail {
// A length as the library receives it: a tensor as given, or a number.
using Length = std::variant<at::Tensor, double>;
at::Tensor detector_absorption_with_lengths(const at::Tensor& intensity,
                                            const at::Tensor& pixel_coords, const at::Tensor& odet,
                                            const Length& thickness,
                                            const Length& attenuation_length, int64_t thicksteps,
                                            bool oversample_thick, bool per_layer);

template <typename T, typename U = std::remove_cv_t<T>>
inline constexpr bool is_length_number_v =
    std::is_floating_point_v<U> ||
    (std::is_integral_v<U> && !std::is_same_v<U, bool> && !std::is_same_v<U, char> &&
     !std::is_same_v<U, signed char> && !std::is_same_v<U, unsigned char> &&
     !std::is_same_v<U, wchar_t> && !std::is_same_v<U, char16_t> && !std::is_same_v<U, char32_t>);
template <typename T>
inline constexpr bool is_length_v =
    is_length_number_v<T> || std::is_same_v<std::remove_cv_t<T>, at::Tensor>;
template <typename T>
Length to_length(const T& value) {
  if constexpr (is_length_number_v<T>) {
    return Length(static_cast<double>(value));
  } else {
    return Length(value);
  }
}
}  // namespace detail

// The same with thickness and/or attenuation_length as numbers (any integer
// or floating type but bool and the character types; the other may stay a
// tensor), as Python numbers are taken: float64 values (not rounded to
// intensity's dtype), not differentiable, made on intensity's device by a
// fill kernel (no copy from host memory that would wait for the GPU). A
// value outside the ranges above is the error a 0-dim CPU tensor gives. A
// template, so that `{}` (an undefined tensor) still means the tensor
// overload.
template <
    typename Thickness, typename AttenuationLength,
    typename = std::enable_if_t<
        detail::is_length_v<Thickness> && detail::is_length_v<AttenuationLength> &&
        (detail::is_length_number_v<Thickness> || detail::is_length_number_v<AttenuationLength>)>>
at::Tensor detector_absorption(const at::Tensor& intensity, const at::Tensor& pixel_coords,
                               const at::Tensor& odet, const Thickness& thickness,
                               const AttenuationLength& attenuation_length, int64_t thicksteps,
                               bool oversample_thick, bool per_layer = false) {
  return detail::detector_absorption_with_lengths(
      intensity, pixel_coords, odet, detail::to_length(thickness),
      detail::to_length(attenuation_length), thicksteps, oversample_thick, per_layer);
}

// The build of the CPU kernels that runs in this process: "default", "avx2"
// or "avx512", the best this CPU and build support unless the environment
// variable ATEN_CPU_CAPABILITY names a lower one (as for ATen's own
// kernels; read once, the first time a CPU kernel or this function needs
// it; one that was not built runs, and is named, as the next one down); and
// that best one.
std::string cpu_capability();
std::string best_cpu_capability();

}  // namespace nanobragg_ops
