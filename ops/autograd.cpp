// Autograd kernels, in C++ so that gradients work the same from Python,
// TorchScript and C++. Each forward re-dispatches below autograd to the
// backend kernel; each backward calls the backward op through the dispatcher
// (so it runs on the inputs' device and is traced by torch.compile).
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>

#include "dispatch.h"

namespace nanobragg {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

class TricubicInterpFunction
    : public torch::autograd::Function<TricubicInterpFunction> {
 public:
  static Variable forward(AutogradContext* ctx, const Variable& grid,
                          const Variable& hkl, c10::IntArrayRef index_min,
                          double default_value, c10::string_view out_of_range) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = dispatch::tricubic_interp().call(
        grid, hkl, index_min, default_value, out_of_range);
    ctx->save_for_backward({grid, hkl});
    ctx->saved_data["index_min"] = index_min.vec();
    ctx->saved_data["out_of_range"] =
        std::string(out_of_range.data(), out_of_range.size());
    return out;
  }

  static variable_list backward(AutogradContext* ctx,
                                variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto index_min = ctx->saved_data["index_min"].toIntVector();
    const std::string out_of_range = ctx->saved_data["out_of_range"].toStringRef();
    const std::array<bool, 2> mask = {ctx->needs_input_grad(0),
                                      ctx->needs_input_grad(1)};
    auto grads = dispatch::tricubic_interp_backward().call(
        grad_outputs[0], saved[0], saved[1], index_min, out_of_range, mask);
    // Shape-[0] placeholders stand for the gradients not asked for.
    return {mask[0] ? std::get<0>(grads) : Variable(),
            mask[1] ? std::get<1>(grads) : Variable(), Variable(), Variable(),
            Variable()};
  }
};

// The backward op is differentiable in principle (SPEC section 3); until its
// own derivative exists, differentiating it says so instead of silently
// returning nothing.
class TricubicInterpBackwardFunction
    : public torch::autograd::Function<TricubicInterpBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* /*ctx*/,
                               const Variable& grad_output,
                               const Variable& grid, const Variable& hkl,
                               c10::IntArrayRef index_min,
                               c10::string_view out_of_range,
                               std::array<bool, 2> output_mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto grads = dispatch::tricubic_interp_backward().call(
        grad_output, grid, hkl, index_min, out_of_range, output_mask);
    return {std::get<0>(grads), std::get<1>(grads)};
  }

  static variable_list backward(AutogradContext* /*ctx*/,
                                variable_list /*grad_outputs*/) {
    TORCH_CHECK(false,
                "nanobragg::tricubic_interp_backward: second derivatives "
                "(double backward) of tricubic_interp are not implemented yet");
  }
};

class DetectorAbsorptionFunction
    : public torch::autograd::Function<DetectorAbsorptionFunction> {
 public:
  static Variable forward(AutogradContext* ctx, const Variable& intensity,
                          const Variable& pixel_coords, const Variable& odet,
                          const Variable& thickness,
                          const Variable& attenuation_length,
                          int64_t thicksteps, bool oversample_thick,
                          bool per_layer) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = dispatch::detector_absorption().call(
        intensity, pixel_coords, odet, thickness, attenuation_length,
        thicksteps, oversample_thick, per_layer);
    ctx->save_for_backward(
        {intensity, pixel_coords, odet, thickness, attenuation_length});
    ctx->saved_data["thicksteps"] = thicksteps;
    ctx->saved_data["oversample_thick"] = oversample_thick;
    ctx->saved_data["per_layer"] = per_layer;
    return out;
  }

  static variable_list backward(AutogradContext* ctx,
                                variable_list grad_outputs) {
    const auto s = ctx->get_saved_variables();
    std::array<bool, 5> mask;
    for (size_t i = 0; i < 5; ++i) {
      mask[i] = ctx->needs_input_grad(i);
    }
    auto grads = dispatch::detector_absorption_backward().call(
        grad_outputs[0], s[0], s[1], s[2], s[3], s[4],
        ctx->saved_data["thicksteps"].toInt(),
        ctx->saved_data["oversample_thick"].toBool(),
        ctx->saved_data["per_layer"].toBool(), mask);
    return {mask[0] ? std::get<0>(grads) : Variable(),
            mask[1] ? std::get<1>(grads) : Variable(),
            mask[2] ? std::get<2>(grads) : Variable(),
            mask[3] ? std::get<3>(grads) : Variable(),
            mask[4] ? std::get<4>(grads) : Variable(),
            Variable(),
            Variable(),
            Variable()};
  }
};

class DetectorAbsorptionBackwardFunction
    : public torch::autograd::Function<DetectorAbsorptionBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* /*ctx*/,
                               const Variable& grad_output,
                               const Variable& intensity,
                               const Variable& pixel_coords,
                               const Variable& odet, const Variable& thickness,
                               const Variable& attenuation_length,
                               int64_t thicksteps, bool oversample_thick,
                               bool per_layer, std::array<bool, 5> output_mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto g = dispatch::detector_absorption_backward().call(
        grad_output, intensity, pixel_coords, odet, thickness,
        attenuation_length, thicksteps, oversample_thick, per_layer,
        output_mask);
    return {std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g),
            std::get<4>(g)};
  }

  static variable_list backward(AutogradContext* /*ctx*/,
                                variable_list /*grad_outputs*/) {
    TORCH_CHECK(false,
                "nanobragg::detector_absorption_backward: second derivatives "
                "(double backward) of detector_absorption are not implemented "
                "yet");
  }
};

at::Tensor tricubic_interp_autograd(const at::Tensor& grid,
                                    const at::Tensor& hkl,
                                    c10::IntArrayRef index_min,
                                    double default_value,
                                    c10::string_view out_of_range) {
  return TricubicInterpFunction::apply(grid, hkl, index_min, default_value,
                                       out_of_range);
}

std::tuple<at::Tensor, at::Tensor> tricubic_interp_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& grid,
    const at::Tensor& hkl, c10::IntArrayRef index_min,
    c10::string_view out_of_range, std::array<bool, 2> output_mask) {
  auto grads = TricubicInterpBackwardFunction::apply(
      grad_output, grid, hkl, index_min, out_of_range, output_mask);
  return {grads[0], grads[1]};
}

at::Tensor detector_absorption_autograd(const at::Tensor& intensity,
                                        const at::Tensor& pixel_coords,
                                        const at::Tensor& odet,
                                        const at::Tensor& thickness,
                                        const at::Tensor& attenuation_length,
                                        int64_t thicksteps,
                                        bool oversample_thick, bool per_layer) {
  return DetectorAbsorptionFunction::apply(intensity, pixel_coords, odet,
                                           thickness, attenuation_length,
                                           thicksteps, oversample_thick,
                                           per_layer);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
detector_absorption_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& intensity,
    const at::Tensor& pixel_coords, const at::Tensor& odet,
    const at::Tensor& thickness, const at::Tensor& attenuation_length,
    int64_t thicksteps, bool oversample_thick, bool per_layer,
    std::array<bool, 5> output_mask) {
  auto g = DetectorAbsorptionBackwardFunction::apply(
      grad_output, intensity, pixel_coords, odet, thickness,
      attenuation_length, thicksteps, oversample_thick, per_layer,
      output_mask);
  return {g[0], g[1], g[2], g[3], g[4]};
}

}  // namespace
}  // namespace nanobragg

TORCH_LIBRARY_IMPL(nanobragg, Autograd, m) {
  m.impl("detector_absorption",
         TORCH_FN(nanobragg::detector_absorption_autograd));
  m.impl("detector_absorption_backward",
         TORCH_FN(nanobragg::detector_absorption_backward_autograd));
  m.impl("tricubic_interp", TORCH_FN(nanobragg::tricubic_interp_autograd));
  m.impl("tricubic_interp_backward",
         TORCH_FN(nanobragg::tricubic_interp_backward_autograd));
}
