// The public C++ API (csrc/include/nanobragg_ops/ops.h): dispatcher calls.
#include "nanobragg_ops/ops.h"

#include <ATen/ops/full.h>
#include <ATen/ops/scalar_tensor.h>

#include "absorption/absorption_scalars.h"
#include "common/cpu_capability.h"
#include "dispatch.h"

namespace nanobragg_ops {

at::Tensor tricubic_interp(const at::Tensor& grid, const at::Tensor& hkl, at::IntArrayRef index_min,
                           double default_value, c10::string_view out_of_range) {
  return nanobragg::dispatch::tricubic_interp().call(grid, hkl, index_min, default_value,
                                                     out_of_range);
}

at::Tensor detector_absorption(const at::Tensor& intensity, const at::Tensor& pixel_coords,
                               const at::Tensor& odet, const at::Tensor& thickness,
                               const at::Tensor& attenuation_length, int64_t thicksteps,
                               bool oversample_thick, bool per_layer) {
  return nanobragg::dispatch::detector_absorption().call(intensity, pixel_coords, odet, thickness,
                                                         attenuation_length, thicksteps,
                                                         oversample_thick, per_layer);
}

namespace {

// A length for the operator: a tensor as given; a number as a 0-dim float64
// scalar, on intensity's device when valid, so that no copy from host memory
// waits for a GPU, else on the CPU, where the operator reads it and raises
// its argument error (on a GPU it could only give NaN). As the Python
// package's _scalar_like.
at::Tensor length_tensor(const detail::Length& length, bool (*valid)(double),
                         const at::Tensor& intensity) {
  if (const auto* tensor = std::get_if<at::Tensor>(&length)) {
    return *tensor;
  }
  const double value = std::get<double>(length);
  if (valid(value) && intensity.defined()) {
    return at::full({}, value, at::TensorOptions().dtype(at::kDouble).device(intensity.device()));
  }
  return at::scalar_tensor(value, at::kDouble);
}

}  // namespace

at::Tensor detail::detector_absorption_with_lengths(const at::Tensor& intensity,
                                                    const at::Tensor& pixel_coords,
                                                    const at::Tensor& odet, const Length& thickness,
                                                    const Length& attenuation_length,
                                                    int64_t thicksteps, bool oversample_thick,
                                                    bool per_layer) {
  // The contract's ranges, as the kernels test them (absorption_scalars.h).
  return detector_absorption(
      intensity, pixel_coords, odet,
      length_tensor(thickness, &nanobragg::absorption::thickness_valid, intensity),
      length_tensor(attenuation_length, &nanobragg::absorption::attenuation_length_valid,
                    intensity),
      thicksteps, oversample_thick, per_layer);
}

std::string cpu_capability() {
  return nanobragg::cpu::capability_name(nanobragg::cpu::capability());
}

std::string best_cpu_capability() {
  return nanobragg::cpu::capability_name(nanobragg::cpu::best_supported_capability());
}

}  // namespace nanobragg_ops
