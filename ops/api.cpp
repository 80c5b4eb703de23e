// The public C++ API (csrc/include/nanobragg_ops/ops.h): dispatcher calls.
#include "nanobragg_ops/ops.h"

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

std::string cpu_capability() {
  return nanobragg::cpu::capability_name(nanobragg::cpu::capability());
}

std::string best_cpu_capability() {
  return nanobragg::cpu::capability_name(nanobragg::cpu::best_supported_capability());
}

}  // namespace nanobragg_ops
