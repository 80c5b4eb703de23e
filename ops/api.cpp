// The public C++ API (csrc/include/nanobragg_ops/ops.h): dispatcher calls.
#include "nanobragg_ops/ops.h"

#include <ATen/ops/full.h>
#include <ATen/ops/scalar_tensor.h>

#include <cmath>

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

// A number as the operator's 0-dim float64 scalar: on intensity's device
// when valid, so that no copy from host memory waits for a GPU; else on the
// CPU, where the operator reads it and raises its argument error (on a GPU
// it could only give NaN). As the Python package's _scalar_like.
at::Tensor length_scalar(double value, bool valid, const at::Tensor& intensity) {
  if (valid && intensity.defined()) {
    return at::full({}, value, at::TensorOptions().dtype(at::kDouble).device(intensity.device()));
  }
  return at::scalar_tensor(value, at::kDouble);
}

}  // namespace

at::Tensor detector_absorption_with_lengths(const at::Tensor& intensity,
                                            const at::Tensor& pixel_coords, const at::Tensor& odet,
                                            double thickness, double attenuation_length,
                                            int64_t thicksteps, bool oversample_thick,
                                            bool per_layer) {
  // The contract's ranges: thickness finite and >= 0, attenuation length > 0
  // (infinity included); NaN fails both.
  const bool thickness_valid = thickness >= 0.0 && std::isfinite(thickness);
  const bool attenuation_valid = attenuation_length > 0.0;
  return detector_absorption(intensity, pixel_coords, odet,
                             length_scalar(thickness, thickness_valid, intensity),
                             length_scalar(attenuation_length, attenuation_valid, intensity),
                             thicksteps, oversample_thick, per_layer);
}

std::string cpu_capability() {
  return nanobragg::cpu::capability_name(nanobragg::cpu::capability());
}

std::string best_cpu_capability() {
  return nanobragg::cpu::capability_name(nanobragg::cpu::best_supported_capability());
}

}  // namespace nanobragg_ops
