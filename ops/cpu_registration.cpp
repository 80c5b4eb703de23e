// The CPU kernels of every op, registered once: each calls the build of its
// kernel for the capability chosen at run time (common/cpu_capability.h),
// as ATen's DispatchStub does for its native/cpu kernels.
#include <torch/library.h>

#include "common/library_init.h"

#include "common/cpu_capability.h"
#include "common/cpu_kernels.h"

NANOBRAGG_DECLARE_CPU_KERNELS(DEFAULT)
#if NANOBRAGG_HAVE_AVX2_KERNELS
NANOBRAGG_DECLARE_CPU_KERNELS(AVX2)
#define NANOBRAGG_AVX2_FN(ns, fn) &::nanobragg::ns::AVX2::fn
#else
#define NANOBRAGG_AVX2_FN(ns, fn) nullptr
#endif
#if NANOBRAGG_HAVE_AVX512_KERNELS
NANOBRAGG_DECLARE_CPU_KERNELS(AVX512)
#define NANOBRAGG_AVX512_FN(ns, fn) &::nanobragg::ns::AVX512::fn
#else
#define NANOBRAGG_AVX512_FN(ns, fn) nullptr
#endif

namespace nanobragg {
namespace cpu_stub {

#define NANOBRAGG_STUB_FN(ns, fn, ret, params, args)                                            \
  ret fn params {                                                                               \
    static const auto chosen = ::nanobragg::cpu::pick<decltype(&::nanobragg::ns::DEFAULT::fn)>( \
        &::nanobragg::ns::DEFAULT::fn, NANOBRAGG_AVX2_FN(ns, fn), NANOBRAGG_AVX512_FN(ns, fn)); \
    return chosen args;                                                                         \
  }

using T = at::Tensor;
using OT = std::optional<at::Tensor>;
using Tuple2 = std::tuple<T, T>;
using Tuple3 = std::tuple<T, T, T>;
using Tuple5 = std::tuple<T, T, T, T, T>;
using Tuple6 = std::tuple<T, T, T, T, T, T>;

NANOBRAGG_STUB_FN(tricubic, tricubic_interp_cpu, T,
                  (const T& grid, const T& hkl, c10::IntArrayRef index_min, double default_value,
                   c10::string_view out_of_range),
                  (grid, hkl, index_min, default_value, out_of_range))
NANOBRAGG_STUB_FN(tricubic, tricubic_interp_backward_cpu, Tuple2,
                  (const T& grad_output, const T& grid, const T& hkl, c10::IntArrayRef index_min,
                   c10::string_view out_of_range, std::array<bool, 2> output_mask),
                  (grad_output, grid, hkl, index_min, out_of_range, output_mask))
NANOBRAGG_STUB_FN(tricubic, tricubic_interp_double_backward_cpu, Tuple3,
                  (const OT& gg_grid, const OT& gg_hkl, const T& grad_output, const T& grid,
                   const T& hkl, c10::IntArrayRef index_min, c10::string_view out_of_range,
                   std::array<bool, 3> output_mask),
                  (gg_grid, gg_hkl, grad_output, grid, hkl, index_min, out_of_range, output_mask))
NANOBRAGG_STUB_FN(absorption, detector_absorption_cpu, T,
                  (const T& intensity, const T& pixel_coords, const T& odet, const T& thickness,
                   const T& attenuation_length, int64_t thicksteps, bool oversample_thick,
                   bool per_layer),
                  (intensity, pixel_coords, odet, thickness, attenuation_length, thicksteps,
                   oversample_thick, per_layer))
NANOBRAGG_STUB_FN(absorption, detector_absorption_backward_cpu, Tuple5,
                  (const T& grad_output, const T& intensity, const T& pixel_coords, const T& odet,
                   const T& thickness, const T& attenuation_length, int64_t thicksteps,
                   bool oversample_thick, bool per_layer, std::array<bool, 5> output_mask),
                  (grad_output, intensity, pixel_coords, odet, thickness, attenuation_length,
                   thicksteps, oversample_thick, per_layer, output_mask))
NANOBRAGG_STUB_FN(absorption, detector_absorption_double_backward_cpu, Tuple6,
                  (const OT& gg_intensity, const OT& gg_coords, const OT& gg_odet,
                   const OT& gg_thickness, const OT& gg_att, const T& grad_output,
                   const T& intensity, const T& pixel_coords, const T& odet, const T& thickness,
                   const T& attenuation_length, int64_t thicksteps, bool oversample_thick,
                   bool per_layer, std::array<bool, 6> output_mask),
                  (gg_intensity, gg_coords, gg_odet, gg_thickness, gg_att, grad_output, intensity,
                   pixel_coords, odet, thickness, attenuation_length, thicksteps, oversample_thick,
                   per_layer, output_mask))

}  // namespace cpu_stub
}  // namespace nanobragg

NANOBRAGG_LIBRARY_IMPL(CPU, m) {
  namespace s = nanobragg::cpu_stub;
  m.impl("tricubic_interp", TORCH_FN(s::tricubic_interp_cpu));
  m.impl("tricubic_interp_backward", TORCH_FN(s::tricubic_interp_backward_cpu));
  m.impl("tricubic_interp_double_backward", TORCH_FN(s::tricubic_interp_double_backward_cpu));
  m.impl("detector_absorption", TORCH_FN(s::detector_absorption_cpu));
  m.impl("detector_absorption_backward", TORCH_FN(s::detector_absorption_backward_cpu));
  m.impl("detector_absorption_double_backward",
         TORCH_FN(s::detector_absorption_double_backward_cpu));
}
