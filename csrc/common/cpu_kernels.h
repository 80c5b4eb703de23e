// The CPU kernels' entry points, declared for each capability's build
// (common/cpu_capability.h): NANOBRAGG_DECLARE_CPU_KERNELS(DEFAULT) declares
// nanobragg::tricubic::DEFAULT::tricubic_interp_cpu, ... The kernel sources
// define them in namespace CPU_CAPABILITY; ops/cpu_registration.cpp registers the
// dispatching kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <tuple>

#define NANOBRAGG_DECLARE_CPU_KERNELS(cap)                                                         \
  namespace nanobragg {                                                                            \
  namespace tricubic {                                                                             \
  namespace cap {                                                                                  \
  at::Tensor tricubic_interp_cpu(const at::Tensor& grid, const at::Tensor& hkl,                    \
                                 c10::IntArrayRef index_min, double default_value,                 \
                                 c10::string_view out_of_range);                                   \
  std::tuple<at::Tensor, at::Tensor> tricubic_interp_backward_cpu(                                 \
      const at::Tensor& grad_output, const at::Tensor& grid, const at::Tensor& hkl,                \
      c10::IntArrayRef index_min, c10::string_view out_of_range, std::array<bool, 2> output_mask); \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> tricubic_interp_double_backward_cpu(              \
      const std::optional<at::Tensor>& grad_grad_grid,                                             \
      const std::optional<at::Tensor>& grad_grad_hkl, const at::Tensor& grad_output,               \
      const at::Tensor& grid, const at::Tensor& hkl, c10::IntArrayRef index_min,                   \
      c10::string_view out_of_range, std::array<bool, 3> output_mask);                             \
  }                                                                                                \
  }                                                                                                \
  namespace absorption {                                                                           \
  namespace cap {                                                                                  \
  at::Tensor detector_absorption_cpu(const at::Tensor& intensity, const at::Tensor& pixel_coords,  \
                                     const at::Tensor& odet, const at::Tensor& thickness,          \
                                     const at::Tensor& attenuation_length, int64_t thicksteps,     \
                                     bool oversample_thick, bool per_layer);                       \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>                           \
  detector_absorption_backward_cpu(const at::Tensor& grad_output, const at::Tensor& intensity,     \
                                   const at::Tensor& pixel_coords, const at::Tensor& odet,         \
                                   const at::Tensor& thickness,                                    \
                                   const at::Tensor& attenuation_length, int64_t thicksteps,       \
                                   bool oversample_thick, bool per_layer,                          \
                                   std::array<bool, 5> output_mask);                               \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>               \
  detector_absorption_double_backward_cpu(                                                         \
      const std::optional<at::Tensor>& gg_intensity, const std::optional<at::Tensor>& gg_coords,   \
      const std::optional<at::Tensor>& gg_odet, const std::optional<at::Tensor>& gg_thickness,     \
      const std::optional<at::Tensor>& gg_att, const at::Tensor& grad_output,                      \
      const at::Tensor& intensity, const at::Tensor& pixel_coords, const at::Tensor& odet,         \
      const at::Tensor& thickness, const at::Tensor& attenuation_length, int64_t thicksteps,       \
      bool oversample_thick, bool per_layer, std::array<bool, 6> output_mask);                     \
  }                                                                                                \
  }                                                                                                \
  }
