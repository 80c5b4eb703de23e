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

}  // namespace
}  // namespace nanobragg

TORCH_LIBRARY_IMPL(nanobragg, Autograd, m) {
  m.impl("tricubic_interp", TORCH_FN(nanobragg::tricubic_interp_autograd));
  m.impl("tricubic_interp_backward",
         TORCH_FN(nanobragg::tricubic_interp_backward_autograd));
}
