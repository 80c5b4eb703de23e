// Autocast kernels (CPU and CUDA), as torchvision has for its ops: under
// torch.autocast both operators run half-precision inputs in float32 (their
// accuracy depends on it: Lagrange weights of fractional Miller indices, exp
// of thickness/mu; float64 ones stay float64, as cached_cast leaves them)
// and return the dtype of the data argument, so that a float16/bfloat16 model
// keeps working. Outside autocast, half-precision inputs are an error that
// says so (csrc/common/checks.cpp). Gradients flow through the casts.
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "common/library_init.h"

#include "dispatch.h"

namespace nanobragg {
namespace {

template <c10::DispatchKey kKey, c10::DeviceType kDevice>
struct Autocast {
  static at::Tensor f32(const at::Tensor& t) {
    return at::autocast::cached_cast(at::kFloat, t, kDevice);
  }

  static at::Tensor tricubic_interp(const at::Tensor& grid, const at::Tensor& hkl,
                                    c10::IntArrayRef index_min, double default_value,
                                    c10::string_view out_of_range) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
    return dispatch::tricubic_interp()
        .call(f32(grid), f32(hkl), index_min, default_value, out_of_range)
        .to(grid.scalar_type());
  }

  static at::Tensor detector_absorption(const at::Tensor& intensity, const at::Tensor& pixel_coords,
                                        const at::Tensor& odet, const at::Tensor& thickness,
                                        const at::Tensor& attenuation_length, int64_t thicksteps,
                                        bool oversample_thick, bool per_layer) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
    return dispatch::detector_absorption()
        .call(f32(intensity), f32(pixel_coords), f32(odet), f32(thickness), f32(attenuation_length),
              thicksteps, oversample_thick, per_layer)
        .to(intensity.scalar_type());
  }
};

using AutocastCpu = Autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>;
using AutocastCuda = Autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>;

}  // namespace
}  // namespace nanobragg

NANOBRAGG_LIBRARY_IMPL(AutocastCPU, m) {
  m.impl("tricubic_interp", TORCH_FN(nanobragg::AutocastCpu::tricubic_interp));
  m.impl("detector_absorption", TORCH_FN(nanobragg::AutocastCpu::detector_absorption));
}

NANOBRAGG_LIBRARY_IMPL(AutocastCUDA, m) {
  m.impl("tricubic_interp", TORCH_FN(nanobragg::AutocastCuda::tricubic_interp));
  m.impl("detector_absorption", TORCH_FN(nanobragg::AutocastCuda::detector_absorption));
}
