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

  // The data pair must agree once cast (half precision and float32 both run
  // in float32; float64 stays); a pair that does not is named by the dtypes
  // the caller gave, not by the cast ones the kernels' check would see.
  static void check_cast_pair(const char* op, const char* arg, const at::Tensor& t,
                              const char* ref_arg, const at::Tensor& ref) {
    // Only tensors f32 casts (cached_cast's rule); other dtypes and devices:
    // the kernels' own checks say what is wrong.
    const bool castable = at::autocast::is_autocast_eligible(t, kDevice) &&
                          at::autocast::is_autocast_eligible(ref, kDevice);
    const bool agree = (t.scalar_type() == at::kDouble) == (ref.scalar_type() == at::kDouble);
    TORCH_CHECK(!castable || agree, op, ": argument '", arg, "' must have the dtype of '", ref_arg,
                "' (", ref.scalar_type(), "), got ", t.scalar_type(),
                " (under autocast, float16 and bfloat16 run in float32 and "
                "match float32; float64 stays float64)");
  }

  static at::Tensor tricubic_interp(const at::Tensor& grid, const at::Tensor& hkl,
                                    c10::IntArrayRef index_min, double default_value,
                                    c10::string_view out_of_range) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
    check_cast_pair("nanobragg::tricubic_interp", "hkl", hkl, "grid", grid);
    return dispatch::tricubic_interp()
        .call(f32(grid), f32(hkl), index_min, default_value, out_of_range)
        .to(grid.scalar_type());
  }

  static at::Tensor detector_absorption(const at::Tensor& intensity, const at::Tensor& pixel_coords,
                                        const at::Tensor& odet, const at::Tensor& thickness,
                                        const at::Tensor& attenuation_length, int64_t thicksteps,
                                        bool oversample_thick, bool per_layer) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
    check_cast_pair("nanobragg::detector_absorption", "pixel_coords", pixel_coords, "intensity",
                    intensity);
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
