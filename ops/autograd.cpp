// Autograd kernels, in C++ so that gradients work the same from Python,
// TorchScript and C++. Each operator has three levels, each an op with its
// own backend kernels:
//   op  --backward-->  op_backward  --backward-->  op_double_backward
// so create_graph=True gives exact second derivatives (SPEC section 3).
// The double backward is linear in the cotangents it is given, and its
// derivative with respect to them is again made of the backward and the
// double backward (the Hessian is symmetric), so that part is exact too;
// this is what torch.autograd.functional.hvp's double-backward trick needs.
// Its derivatives with respect to grad_output and the operator's inputs
// (third derivatives) raise NotImplementedError.
//
// The kernels are written the way PyTorch's generated VariableType kernels
// are (a Node per op holding SavedVariables, a redispatch below autograd),
// not as torch::autograd::Function: functorch transforms (torch.func.grad,
// vmap, jacrev) refuse C++ Functions but run these like any ATen op.
// Forward-mode AD (torch.func.jvp, jacfwd) of the two operators comes from
// the double backward, whose d/d(grad_output) is the directional derivative
// of the forward along the cotangents; that of the backward ops
// (forward-over-reverse, torch.func.hessian) from the backward and the
// double backward again.
#include <ATen/ops/ones.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "dispatch.h"

namespace nanobragg {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// A Node that keeps the op's non-tensor arguments by value and its tensor
// inputs as SavedVariables (which check, on unpacking, that none was
// modified in place since).
class SavingNode : public torch::autograd::TraceableFunction {
 public:
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& s : saved_) {
      s.reset_data();
    }
  }
  // Compiled autograd (torch._dynamo.config.compiled_autograd): what makes
  // two nodes the same graph, and running apply on its proxies.
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(saved_, /*is_output=*/false);
    collect_arguments(args);
  }
  variable_list apply_with_saved(const variable_list& inputs,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    saved.before(saved_);
    variable_list out = apply(variable_list(inputs));
    saved.after(saved_);
    return out;
  }

 protected:
  // The op's non-tensor arguments, for compiled_args.
  virtual void collect_arguments(torch::dynamo::autograd::CompiledNodeArgs& args) const = 0;
  void save(std::initializer_list<at::Tensor> tensors) {
    for (const auto& t : tensors) {
      saved_.emplace_back(t, /*is_output=*/false);
    }
  }
  // task_should_compute_output of next edges first .. first + N - 1.
  template <size_t N>
  std::array<bool, N> needed(size_t first = 0) const {
    std::array<bool, N> mask;
    for (size_t i = 0; i < N; ++i) mask[i] = task_should_compute_output(first + i);
    return mask;
  }
  // Call under mutex_.
  std::vector<at::Tensor> unpack() {
    std::vector<at::Tensor> out;
    out.reserve(saved_.size());
    for (auto& s : saved_) {
      out.push_back(s.unpack(shared_from_this()));
    }
    return out;
  }
  std::vector<SavedVariable> saved_;
};

// Which outputs of the differentiated op were computed (not placeholders).
template <size_t N>
void collect(torch::dynamo::autograd::CompiledNodeArgs& args, const std::array<bool, N>& computed) {
  for (bool c : computed) args.collect(c);
}

// An optional tensor for an op argument: absent when undefined.
std::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

template <typename... Args>
bool any_forward_grad(const Args&... args) {
  return (torch::autograd::isFwGradDefined(args) || ...);
}

[[noreturn]] void third_derivative_not_implemented(const char* op) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, op,
                              ": third derivatives are not implemented (first and second "
                              "derivatives are exact)");
}

// a + b where either may be undefined.
at::Tensor add_defined(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined()) return b;
  if (!b.defined()) return a;
  return a.add(b);
}

template <typename... T>
variable_list as_list(const std::tuple<T...>& t) {
  return std::apply([](const auto&... x) { return variable_list{x...}; }, t);
}

template <size_t N>
bool any_of(const std::array<bool, N>& mask) {
  return std::any_of(mask.begin(), mask.end(), [](bool b) { return b; });
}

// The entries of `all` asked for by `mask` (undefined elsewhere).
template <size_t N>
variable_list masked(variable_list all, const std::array<bool, N>& mask) {
  for (size_t i = 0; i < N; ++i) {
    if (!mask[i]) all[i] = at::Tensor();
  }
  return all;
}

template <typename NodeT>
std::shared_ptr<NodeT> adopt(NodeT* node) {
  return std::shared_ptr<NodeT>(node, torch::autograd::deleteNode);
}

// ---------------------------------------------------------------------------
// tricubic_interp

struct TricubicArgs {
  std::vector<int64_t> index_min;
  std::string out_of_range;
};

void collect(torch::dynamo::autograd::CompiledNodeArgs& args, const TricubicArgs& a) {
  args.collect(a.index_min);
  args.collect(a.out_of_range);
}

// The derivative of backward(g; grid, hkl) = (grad_grid, grad_hkl) along
// (dg, dgrid, dhkl): backward(dg) + g H (dgrid, dhkl), the second term being
// the double backward's (d_grid, d_hkl). By the symmetry of the Hessian it
// is also the double backward's derivative in its cotangents. Entries not in
// `want` are undefined.
std::array<at::Tensor, 2> tricubic_backward_along(
    const at::Tensor& dg, const std::optional<at::Tensor>& dgrid,
    const std::optional<at::Tensor>& dhkl, const at::Tensor& g, const at::Tensor& grid,
    const at::Tensor& hkl, const TricubicArgs& a, std::array<bool, 2> want) {
  std::array<at::Tensor, 2> out;
  if (dg.defined()) {
    auto b = dispatch::tricubic_interp_backward().call(dg, grid, hkl, a.index_min,
                                                       a.out_of_range, want);
    out = {std::get<0>(b), std::get<1>(b)};
  }
  if (dgrid || dhkl) {
    auto d = dispatch::tricubic_interp_double_backward().call(
        dgrid, dhkl, g, grid, hkl, a.index_min, a.out_of_range, {false, want[0], want[1]});
    // (Only where wanted: the others are shape-[0] placeholders.)
    if (want[0]) out[0] = add_defined(out[0], std::get<1>(d));
    if (want[1]) out[1] = add_defined(out[1], std::get<2>(d));
  }
  for (size_t i = 0; i < 2; ++i) {
    if (!want[i]) out[i] = at::Tensor();
  }
  return out;
}

// d/d(grid, hkl) of tricubic_interp.
class TricubicInterpBackwardNode : public SavingNode {
 public:
  TricubicInterpBackwardNode(const at::Tensor& grid, const at::Tensor& hkl, TricubicArgs args)
      : args_(std::move(args)) {
    save({grid, hkl});
  }
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto in = unpack();
    const auto mask = needed<2>();
    if (!grads[0].defined() || !any_of(mask)) {
      return variable_list(2);
    }
    return masked(as_list(dispatch::tricubic_interp_backward().call(
                      grads[0], in[0], in[1], args_.index_min, args_.out_of_range, mask)),
                  mask);
  }
  std::string name() const override { return "TricubicInterpBackward"; }

 protected:
  void collect_arguments(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    collect(args, args_);
  }

 private:
  TricubicArgs args_;
};

// d/d(grad_output, grid, hkl) of tricubic_interp_backward.
class TricubicInterpDoubleBackwardNode : public SavingNode {
 public:
  TricubicInterpDoubleBackwardNode(const at::Tensor& grad_output, const at::Tensor& grid,
                                   const at::Tensor& hkl, TricubicArgs args,
                                   std::array<bool, 2> computed)
      : args_(std::move(args)), computed_(computed) {
    save({grad_output, grid, hkl});
  }
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto in = unpack();
    // Cotangents of outputs that were shape-[0] placeholders are ignored.
    const auto gg_grid = computed_[0] ? maybe(grads[0]) : std::nullopt;
    const auto gg_hkl = computed_[1] ? maybe(grads[1]) : std::nullopt;
    const auto mask = needed<3>();
    if ((!gg_grid && !gg_hkl) || !any_of(mask)) {
      return variable_list(3);
    }
    return masked(as_list(dispatch::tricubic_interp_double_backward().call(
                      gg_grid, gg_hkl, in[0], in[1], in[2], args_.index_min,
                      args_.out_of_range, mask)),
                  mask);
  }
  std::string name() const override { return "TricubicInterpBackwardBackward"; }

 protected:
  void collect_arguments(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    collect(args, args_);
    collect(args, computed_);
  }

 private:
  TricubicArgs args_;
  std::array<bool, 2> computed_;
};

at::Tensor tricubic_interp_autograd(c10::DispatchKeySet ks, const at::Tensor& grid,
                                    const at::Tensor& hkl, c10::IntArrayRef index_min,
                                    double default_value, c10::string_view out_of_range) {
  std::shared_ptr<TricubicInterpBackwardNode> node;
  if (torch::autograd::compute_requires_grad(grid, hkl)) {
    node = adopt(
        new TricubicInterpBackwardNode(grid, hkl, {index_min.vec(), std::string(out_of_range)}));
    node->set_next_edges(torch::autograd::collect_next_edges(grid, hkl));
  }
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = dispatch::tricubic_interp().redispatch(ks & c10::after_autograd_keyset, grid, hkl,
                                                 index_min, default_value, out_of_range);
  }
  if (node) {
    torch::autograd::set_history(out, node);
  }
  if (any_forward_grad(grid, hkl)) {
    // dF along (dgrid, dhkl): the double backward's d/dg at g = 1.
    const at::Tensor grid_p = grid._fw_primal(0), hkl_p = hkl._fw_primal(0);
    auto jvp = dispatch::tricubic_interp_double_backward().call(
        maybe(grid._fw_grad(0)), maybe(hkl._fw_grad(0)), at::ones(out.sizes(), out.options()),
        grid_p, hkl_p, index_min, out_of_range, {true, false, false});
    out._set_fw_grad(std::get<0>(jvp), /*level=*/0, /*is_inplace_op=*/false);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> tricubic_interp_backward_autograd(
    c10::DispatchKeySet ks, const at::Tensor& grad_output, const at::Tensor& grid,
    const at::Tensor& hkl, c10::IntArrayRef index_min, c10::string_view out_of_range,
    std::array<bool, 2> output_mask) {
  std::shared_ptr<TricubicInterpDoubleBackwardNode> node;
  if (torch::autograd::compute_requires_grad(grad_output, grid, hkl)) {
    node = adopt(new TricubicInterpDoubleBackwardNode(
        grad_output, grid, hkl, {index_min.vec(), std::string(out_of_range)}, output_mask));
    node->set_next_edges(torch::autograd::collect_next_edges(grad_output, grid, hkl));
  }
  std::tuple<at::Tensor, at::Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = dispatch::tricubic_interp_backward().redispatch(
        ks & c10::after_autograd_keyset, grad_output, grid, hkl, index_min, out_of_range,
        output_mask);
  }
  if (node) {
    torch::autograd::set_history(as_list(out), node);
  }
  if (any_forward_grad(grad_output, grid, hkl)) {
    // Forward-over-reverse (torch.func.hessian).
    const auto tangent = tricubic_backward_along(
        grad_output._fw_grad(0), maybe(grid._fw_grad(0)), maybe(hkl._fw_grad(0)),
        grad_output._fw_primal(0), grid._fw_primal(0), hkl._fw_primal(0),
        {index_min.vec(), std::string(out_of_range)}, output_mask);
    if (output_mask[0]) std::get<0>(out)._set_fw_grad(tangent[0], 0, false);
    if (output_mask[1]) std::get<1>(out)._set_fw_grad(tangent[1], 0, false);
  }
  return out;
}

// Of tricubic_interp_double_backward: d/d(grad_grad_grid, grad_grad_hkl).
// With cotangents (w_g, w_grid, w_hkl) of its outputs this is
// backward(w_g) + double_backward(w_grid, w_hkl).(d_grid, d_hkl).
class TricubicInterpTripleBackwardNode : public SavingNode {
 public:
  TricubicInterpTripleBackwardNode(const at::Tensor& grad_output, const at::Tensor& grid,
                                   const at::Tensor& hkl, TricubicArgs args,
                                   std::array<bool, 3> computed)
      : args_(std::move(args)), computed_(computed) {
    save({grad_output, grid, hkl});
  }
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = 2; i < 5; ++i) {
      if (task_should_compute_output(i)) {
        third_derivative_not_implemented("nanobragg::tricubic_interp_double_backward");
      }
    }
    const auto in = unpack();
    variable_list out(5);
    const auto want = needed<2>();
    if (!any_of(want)) {
      return out;
    }
    const auto d = tricubic_backward_along(
        computed_[0] ? grads[0] : at::Tensor(), computed_[1] ? maybe(grads[1]) : std::nullopt,
        computed_[2] ? maybe(grads[2]) : std::nullopt, in[0], in[1], in[2], args_, want);
    out[0] = d[0];
    out[1] = d[1];
    return out;
  }
  std::string name() const override { return "TricubicInterpBackwardBackwardBackward"; }

 protected:
  void collect_arguments(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    collect(args, args_);
    collect(args, computed_);
  }

 private:
  TricubicArgs args_;
  std::array<bool, 3> computed_;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> tricubic_interp_double_backward_autograd(
    c10::DispatchKeySet ks, const std::optional<at::Tensor>& gg_grid,
    const std::optional<at::Tensor>& gg_hkl, const at::Tensor& grad_output,
    const at::Tensor& grid, const at::Tensor& hkl, c10::IntArrayRef index_min,
    c10::string_view out_of_range, std::array<bool, 3> output_mask) {
  constexpr const char* op = "nanobragg::tricubic_interp_double_backward";
  TORCH_CHECK_NOT_IMPLEMENTED(!any_forward_grad(gg_grid, gg_hkl, grad_output, grid, hkl), op,
                              ": forward-mode AD of the double backward (a third derivative) "
                              "is not implemented");
  std::shared_ptr<TricubicInterpTripleBackwardNode> node;
  if (torch::autograd::compute_requires_grad(gg_grid, gg_hkl, grad_output, grid, hkl)) {
    node = adopt(new TricubicInterpTripleBackwardNode(
        grad_output, grid, hkl, {index_min.vec(), std::string(out_of_range)}, output_mask));
    node->set_next_edges(
        torch::autograd::collect_next_edges(gg_grid, gg_hkl, grad_output, grid, hkl));
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = dispatch::tricubic_interp_double_backward().redispatch(
        ks & c10::after_autograd_keyset, gg_grid, gg_hkl, grad_output, grid, hkl, index_min,
        out_of_range, output_mask);
  }
  if (node) {
    torch::autograd::set_history(as_list(out), node);
  }
  return out;
}

// ---------------------------------------------------------------------------
// detector_absorption

struct AbsorptionArgs {
  int64_t thicksteps;
  bool oversample_thick;
  bool per_layer;
};

void collect(torch::dynamo::autograd::CompiledNodeArgs& args, const AbsorptionArgs& a) {
  args.collect(a.thicksteps);
  args.collect(a.oversample_thick);
  args.collect(a.per_layer);
}

// As tricubic_backward_along: the derivative of the backward's five
// gradients along (dg, d inputs): backward(dg) + the double backward's
// input gradients for cotangents d. `in` is (grad_output, intensity,
// pixel_coords, odet, thickness, attenuation_length).
std::array<at::Tensor, 5> absorption_backward_along(
    const at::Tensor& dg, const std::array<std::optional<at::Tensor>, 5>& d,
    const std::array<at::Tensor, 6>& in, const AbsorptionArgs& a, std::array<bool, 5> want) {
  std::array<at::Tensor, 5> out;
  if (dg.defined()) {
    const auto b = as_list(dispatch::detector_absorption_backward().call(
        dg, in[1], in[2], in[3], in[4], in[5], a.thicksteps, a.oversample_thick, a.per_layer,
        want));
    std::copy(b.begin(), b.end(), out.begin());
  }
  if (d[0] || d[1] || d[2] || d[3] || d[4]) {
    const auto dd = as_list(dispatch::detector_absorption_double_backward().call(
        d[0], d[1], d[2], d[3], d[4], in[0], in[1], in[2], in[3], in[4], in[5], a.thicksteps,
        a.oversample_thick, a.per_layer, {false, want[0], want[1], want[2], want[3], want[4]}));
    for (size_t i = 0; i < 5; ++i) {
      if (want[i]) out[i] = add_defined(out[i], dd[i + 1]);  // (others: placeholders)
    }
  }
  for (size_t i = 0; i < 5; ++i) {
    if (!want[i]) out[i] = at::Tensor();
  }
  return out;
}

// d/d(intensity, pixel_coords, odet, thickness, attenuation_length).
class DetectorAbsorptionBackwardNode : public SavingNode {
 public:
  DetectorAbsorptionBackwardNode(std::initializer_list<at::Tensor> inputs, AbsorptionArgs args)
      : args_(args) {
    save(inputs);
  }
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto in = unpack();
    const auto mask = needed<5>();
    if (!grads[0].defined() || !any_of(mask)) {
      return variable_list(5);
    }
    return masked(as_list(dispatch::detector_absorption_backward().call(
                      grads[0], in[0], in[1], in[2], in[3], in[4], args_.thicksteps,
                      args_.oversample_thick, args_.per_layer, mask)),
                  mask);
  }
  std::string name() const override { return "DetectorAbsorptionBackward"; }

 protected:
  void collect_arguments(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    collect(args, args_);
  }

 private:
  AbsorptionArgs args_;
};

// d/d(grad_output, intensity, ..., attenuation_length) of the backward.
class DetectorAbsorptionDoubleBackwardNode : public SavingNode {
 public:
  DetectorAbsorptionDoubleBackwardNode(std::initializer_list<at::Tensor> inputs,
                                       AbsorptionArgs args, std::array<bool, 5> computed)
      : args_(args), computed_(computed) {
    save(inputs);
  }
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto in = unpack();
    // Cotangents of outputs that were shape-[0] placeholders are ignored.
    std::array<std::optional<at::Tensor>, 5> gg;
    for (size_t i = 0; i < 5; ++i) {
      gg[i] = computed_[i] ? maybe(grads[i]) : std::nullopt;
    }
    const auto mask = needed<6>();
    if (!(gg[0] || gg[1] || gg[2] || gg[3] || gg[4]) || !any_of(mask)) {
      return variable_list(6);
    }
    return masked(as_list(dispatch::detector_absorption_double_backward().call(
                      gg[0], gg[1], gg[2], gg[3], gg[4], in[0], in[1], in[2], in[3], in[4],
                      in[5], args_.thicksteps, args_.oversample_thick, args_.per_layer, mask)),
                  mask);
  }
  std::string name() const override { return "DetectorAbsorptionBackwardBackward"; }

 protected:
  void collect_arguments(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    collect(args, args_);
    collect(args, computed_);
  }

 private:
  AbsorptionArgs args_;
  std::array<bool, 5> computed_;
};

at::Tensor detector_absorption_autograd(c10::DispatchKeySet ks, const at::Tensor& intensity,
                                        const at::Tensor& pixel_coords, const at::Tensor& odet,
                                        const at::Tensor& thickness,
                                        const at::Tensor& attenuation_length,
                                        int64_t thicksteps, bool oversample_thick,
                                        bool per_layer) {
  std::shared_ptr<DetectorAbsorptionBackwardNode> node;
  if (torch::autograd::compute_requires_grad(intensity, pixel_coords, odet, thickness,
                                             attenuation_length)) {
    node = adopt(new DetectorAbsorptionBackwardNode(
        {intensity, pixel_coords, odet, thickness, attenuation_length},
        {thicksteps, oversample_thick, per_layer}));
    node->set_next_edges(torch::autograd::collect_next_edges(intensity, pixel_coords, odet,
                                                             thickness, attenuation_length));
  }
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = dispatch::detector_absorption().redispatch(
        ks & c10::after_autograd_keyset, intensity, pixel_coords, odet, thickness,
        attenuation_length, thicksteps, oversample_thick, per_layer);
  }
  if (node) {
    torch::autograd::set_history(out, node);
  }
  if (any_forward_grad(intensity, pixel_coords, odet, thickness, attenuation_length)) {
    // d out along the input tangents: the double backward's d/dg at g = 1.
    auto jvp = dispatch::detector_absorption_double_backward().call(
        maybe(intensity._fw_grad(0)), maybe(pixel_coords._fw_grad(0)), maybe(odet._fw_grad(0)),
        maybe(thickness._fw_grad(0)), maybe(attenuation_length._fw_grad(0)),
        at::ones(out.sizes(), out.options()), intensity._fw_primal(0),
        pixel_coords._fw_primal(0), odet._fw_primal(0), thickness._fw_primal(0),
        attenuation_length._fw_primal(0), thicksteps, oversample_thick, per_layer,
        {true, false, false, false, false, false});
    out._set_fw_grad(std::get<0>(jvp), /*level=*/0, /*is_inplace_op=*/false);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
detector_absorption_backward_autograd(c10::DispatchKeySet ks, const at::Tensor& grad_output,
                                      const at::Tensor& intensity,
                                      const at::Tensor& pixel_coords, const at::Tensor& odet,
                                      const at::Tensor& thickness,
                                      const at::Tensor& attenuation_length, int64_t thicksteps,
                                      bool oversample_thick, bool per_layer,
                                      std::array<bool, 5> output_mask) {
  std::shared_ptr<DetectorAbsorptionDoubleBackwardNode> node;
  if (torch::autograd::compute_requires_grad(grad_output, intensity, pixel_coords, odet,
                                             thickness, attenuation_length)) {
    node = adopt(new DetectorAbsorptionDoubleBackwardNode(
        {grad_output, intensity, pixel_coords, odet, thickness, attenuation_length},
        {thicksteps, oversample_thick, per_layer}, output_mask));
    node->set_next_edges(torch::autograd::collect_next_edges(
        grad_output, intensity, pixel_coords, odet, thickness, attenuation_length));
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = dispatch::detector_absorption_backward().redispatch(
        ks & c10::after_autograd_keyset, grad_output, intensity, pixel_coords, odet, thickness,
        attenuation_length, thicksteps, oversample_thick, per_layer, output_mask);
  }
  if (node) {
    torch::autograd::set_history(as_list(out), node);
  }
  if (any_forward_grad(grad_output, intensity, pixel_coords, odet, thickness,
                       attenuation_length)) {
    // Forward-over-reverse, as for tricubic_interp_backward.
    const auto tangent = absorption_backward_along(
        grad_output._fw_grad(0),
        {maybe(intensity._fw_grad(0)), maybe(pixel_coords._fw_grad(0)), maybe(odet._fw_grad(0)),
         maybe(thickness._fw_grad(0)), maybe(attenuation_length._fw_grad(0))},
        {grad_output._fw_primal(0), intensity._fw_primal(0), pixel_coords._fw_primal(0),
         odet._fw_primal(0), thickness._fw_primal(0), attenuation_length._fw_primal(0)},
        {thicksteps, oversample_thick, per_layer}, output_mask);
    const auto outs = as_list(out);
    for (size_t i = 0; i < 5; ++i) {
      if (output_mask[i]) outs[i]._set_fw_grad(tangent[i], 0, false);
    }
  }
  return out;
}

// Of detector_absorption_double_backward: d/d(its five cotangent inputs),
// backward(w_g) + double_backward(w_intensity, ..., w_attenuation_length).
class DetectorAbsorptionTripleBackwardNode : public SavingNode {
 public:
  DetectorAbsorptionTripleBackwardNode(std::initializer_list<at::Tensor> inputs,
                                       AbsorptionArgs args, std::array<bool, 6> computed)
      : args_(args), computed_(computed) {
    save(inputs);
  }
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = 5; i < 11; ++i) {
      if (task_should_compute_output(i)) {
        third_derivative_not_implemented("nanobragg::detector_absorption_double_backward");
      }
    }
    const auto in = unpack();
    variable_list out(11);
    const auto want = needed<5>();
    if (!any_of(want)) {
      return out;
    }
    std::array<std::optional<at::Tensor>, 5> w;
    for (size_t i = 0; i < 5; ++i) {
      w[i] = computed_[i + 1] ? maybe(grads[i + 1]) : std::nullopt;
    }
    const auto d = absorption_backward_along(computed_[0] ? grads[0] : at::Tensor(), w,
                                             {in[0], in[1], in[2], in[3], in[4], in[5]}, args_,
                                             want);
    std::copy(d.begin(), d.end(), out.begin());
    return out;
  }
  std::string name() const override { return "DetectorAbsorptionBackwardBackwardBackward"; }

 protected:
  void collect_arguments(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    collect(args, args_);
    collect(args, computed_);
  }

 private:
  AbsorptionArgs args_;
  std::array<bool, 6> computed_;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
detector_absorption_double_backward_autograd(
    c10::DispatchKeySet ks, const std::optional<at::Tensor>& gg_intensity,
    const std::optional<at::Tensor>& gg_coords, const std::optional<at::Tensor>& gg_odet,
    const std::optional<at::Tensor>& gg_thickness, const std::optional<at::Tensor>& gg_att,
    const at::Tensor& grad_output, const at::Tensor& intensity, const at::Tensor& pixel_coords,
    const at::Tensor& odet, const at::Tensor& thickness, const at::Tensor& attenuation_length,
    int64_t thicksteps, bool oversample_thick, bool per_layer,
    std::array<bool, 6> output_mask) {
  constexpr const char* op = "nanobragg::detector_absorption_double_backward";
  TORCH_CHECK_NOT_IMPLEMENTED(
      !any_forward_grad(gg_intensity, gg_coords, gg_odet, gg_thickness, gg_att, grad_output,
                        intensity, pixel_coords, odet, thickness, attenuation_length),
      op, ": forward-mode AD of the double backward (a third derivative) is not implemented");
  std::shared_ptr<DetectorAbsorptionTripleBackwardNode> node;
  if (torch::autograd::compute_requires_grad(gg_intensity, gg_coords, gg_odet, gg_thickness,
                                             gg_att, grad_output, intensity, pixel_coords, odet,
                                             thickness, attenuation_length)) {
    node = adopt(new DetectorAbsorptionTripleBackwardNode(
        {grad_output, intensity, pixel_coords, odet, thickness, attenuation_length},
        {thicksteps, oversample_thick, per_layer}, output_mask));
    node->set_next_edges(torch::autograd::collect_next_edges(
        gg_intensity, gg_coords, gg_odet, gg_thickness, gg_att, grad_output, intensity,
        pixel_coords, odet, thickness, attenuation_length));
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = dispatch::detector_absorption_double_backward().redispatch(
        ks & c10::after_autograd_keyset, gg_intensity, gg_coords, gg_odet, gg_thickness, gg_att,
        grad_output, intensity, pixel_coords, odet, thickness, attenuation_length, thicksteps,
        oversample_thick, per_layer, output_mask);
  }
  if (node) {
    torch::autograd::set_history(as_list(out), node);
  }
  return out;
}

}  // namespace
}  // namespace nanobragg

TORCH_LIBRARY_IMPL(nanobragg, Autograd, m) {
  m.impl("tricubic_interp", TORCH_FN(nanobragg::tricubic_interp_autograd));
  m.impl("tricubic_interp_backward", TORCH_FN(nanobragg::tricubic_interp_backward_autograd));
  m.impl("tricubic_interp_double_backward",
         TORCH_FN(nanobragg::tricubic_interp_double_backward_autograd));
  m.impl("detector_absorption", TORCH_FN(nanobragg::detector_absorption_autograd));
  m.impl("detector_absorption_backward",
         TORCH_FN(nanobragg::detector_absorption_backward_autograd));
  m.impl("detector_absorption_double_backward",
         TORCH_FN(nanobragg::detector_absorption_double_backward_autograd));
}
