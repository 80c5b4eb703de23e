// Meta kernels: shapes, dtypes and argument checks only, with symbolic sizes,
// so FakeTensor, torch.compile and torch.export can trace the operators
// (dynamic shapes included) without running them.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/library_init.h"

#include <array>
#include <tuple>

#include "common/checks.h"

namespace nanobragg {
namespace {

at::Tensor tricubic_interp_meta(const at::Tensor& grid, const at::Tensor& hkl,
                                c10::IntArrayRef index_min, double /*default_value*/,
                                c10::string_view out_of_range) {
  checks::check_tricubic_args("nanobragg::tricubic_interp", grid, hkl, index_min, out_of_range);
  return at::empty_symint(hkl.sym_sizes().slice(0, hkl.dim() - 1), grid.options());
}

std::tuple<at::Tensor, at::Tensor> tricubic_interp_backward_meta(
    const at::Tensor& grad_output, const at::Tensor& grid, const at::Tensor& hkl,
    c10::IntArrayRef index_min, c10::string_view out_of_range, std::array<bool, 2> output_mask) {
  constexpr const char* op = "nanobragg::tricubic_interp_backward";
  checks::check_tricubic_args(op, grid, hkl, index_min, out_of_range);
  checks::check_tricubic_grad_output(op, grad_output, grid, hkl);
  // Contiguous, as the CPU and CUDA kernels return them.
  at::Tensor grad_grid = output_mask[0] ? at::empty_symint(grid.sym_sizes(), grid.options())
                                        : at::empty({0}, grid.options());
  at::Tensor grad_hkl = output_mask[1] ? at::empty_symint(hkl.sym_sizes(), hkl.options())
                                       : at::empty({0}, hkl.options());
  return {grad_grid, grad_hkl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tricubic_interp_double_backward_meta(
    const std::optional<at::Tensor>& grad_grad_grid, const std::optional<at::Tensor>& grad_grad_hkl,
    const at::Tensor& grad_output, const at::Tensor& grid, const at::Tensor& hkl,
    c10::IntArrayRef index_min, c10::string_view out_of_range, std::array<bool, 3> output_mask) {
  constexpr const char* op = "nanobragg::tricubic_interp_double_backward";
  checks::check_tricubic_args(op, grid, hkl, index_min, out_of_range);
  checks::check_tricubic_grad_output(op, grad_output, grid, hkl);
  checks::check_cotangent(op, "grad_grad_grid", grad_grad_grid, "grid", grid);
  checks::check_cotangent(op, "grad_grad_hkl", grad_grad_hkl, "hkl", hkl);
  const at::Tensor* like[3] = {&grad_output, &grid, &hkl};
  at::Tensor grads[3];
  for (int i = 0; i < 3; ++i) {
    grads[i] = output_mask[i] ? at::empty_symint(like[i]->sym_sizes(), like[i]->options())
                              : at::empty({0}, like[i]->options());
  }
  return {grads[0], grads[1], grads[2]};
}

at::Tensor detector_absorption_meta(const at::Tensor& intensity, const at::Tensor& pixel_coords,
                                    const at::Tensor& odet, const at::Tensor& thickness,
                                    const at::Tensor& attenuation_length, int64_t thicksteps,
                                    bool /*oversample_thick*/, bool per_layer) {
  const auto layout =
      checks::check_absorption_args("nanobragg::detector_absorption", intensity, pixel_coords, odet,
                                    thickness, attenuation_length, thicksteps, per_layer);
  checks::check_host_absorption_lengths("nanobragg::detector_absorption", thickness,
                                        attenuation_length);
  return at::empty_symint(layout.pixel_shape, intensity.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
detector_absorption_backward_meta(const at::Tensor& grad_output, const at::Tensor& intensity,
                                  const at::Tensor& pixel_coords, const at::Tensor& odet,
                                  const at::Tensor& thickness, const at::Tensor& attenuation_length,
                                  int64_t thicksteps, bool /*oversample_thick*/, bool per_layer,
                                  std::array<bool, 5> output_mask) {
  constexpr const char* op = "nanobragg::detector_absorption_backward";
  const auto layout = checks::check_absorption_args(op, intensity, pixel_coords, odet, thickness,
                                                    attenuation_length, thicksteps, per_layer);
  checks::check_host_absorption_lengths(op, thickness, attenuation_length);
  checks::check_absorption_grad_output(op, grad_output, intensity, layout);
  // Each gradient has its input's shape, contiguous, as the kernels return.
  const at::Tensor* inputs[5] = {&intensity, &pixel_coords, &odet, &thickness, &attenuation_length};
  at::Tensor grads[5];
  for (int i = 0; i < 5; ++i) {
    grads[i] = output_mask[i] ? at::empty_symint(inputs[i]->sym_sizes(), inputs[i]->options())
                              : at::empty({0}, inputs[i]->options());
  }
  return {grads[0], grads[1], grads[2], grads[3], grads[4]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
detector_absorption_double_backward_meta(
    const std::optional<at::Tensor>& gg_intensity, const std::optional<at::Tensor>& gg_coords,
    const std::optional<at::Tensor>& gg_odet, const std::optional<at::Tensor>& gg_thickness,
    const std::optional<at::Tensor>& gg_att, const at::Tensor& grad_output,
    const at::Tensor& intensity, const at::Tensor& pixel_coords, const at::Tensor& odet,
    const at::Tensor& thickness, const at::Tensor& attenuation_length, int64_t thicksteps,
    bool /*oversample_thick*/, bool per_layer, std::array<bool, 6> output_mask) {
  constexpr const char* op = "nanobragg::detector_absorption_double_backward";
  const auto layout = checks::check_absorption_args(op, intensity, pixel_coords, odet, thickness,
                                                    attenuation_length, thicksteps, per_layer);
  checks::check_host_absorption_lengths(op, thickness, attenuation_length);
  checks::check_absorption_grad_output(op, grad_output, intensity, layout);
  checks::check_absorption_cotangents(
      op, {gg_intensity, gg_coords, gg_odet, gg_thickness, gg_att},
      {intensity, pixel_coords, odet, thickness, attenuation_length});
  const at::Tensor* like[6] = {&grad_output, &intensity, &pixel_coords,
                               &odet,        &thickness, &attenuation_length};
  at::Tensor grads[6];
  for (int i = 0; i < 6; ++i) {
    grads[i] = output_mask[i] ? at::empty_symint(like[i]->sym_sizes(), like[i]->options())
                              : at::empty({0}, like[i]->options());
  }
  return {grads[0], grads[1], grads[2], grads[3], grads[4], grads[5]};
}

}  // namespace
}  // namespace nanobragg

NANOBRAGG_LIBRARY_IMPL(Meta, m) {
  m.impl("tricubic_interp_double_backward",
         TORCH_FN(nanobragg::tricubic_interp_double_backward_meta));
  m.impl("detector_absorption_double_backward",
         TORCH_FN(nanobragg::detector_absorption_double_backward_meta));
  m.impl("tricubic_interp", TORCH_FN(nanobragg::tricubic_interp_meta));
  m.impl("tricubic_interp_backward", TORCH_FN(nanobragg::tricubic_interp_backward_meta));
  m.impl("detector_absorption", TORCH_FN(nanobragg::detector_absorption_meta));
  m.impl("detector_absorption_backward", TORCH_FN(nanobragg::detector_absorption_backward_meta));
}
