// Autograd kernels, in C++ so that gradients work the same from Python,
// TorchScript and C++. Each operator has three levels, each an op with its
// own backend kernels:
//   op  --backward-->  op_backward  --backward-->  op_double_backward
// so create_graph=True gives exact second derivatives (docs/CONTRACT.md §4).
// The double backward is linear in the cotangents it is given, and its
// derivative with respect to them is again made of the backward and the
// double backward (the Hessian is symmetric), so that part is exact too;
// this is what torch.autograd.functional.hvp's double-backward trick needs.
// Its derivatives with respect to grad_output and the operator's inputs are
// second derivatives for its first output (the forward's tangent, so reverse
// mode over forward mode works) and third derivatives for the others, which
// raise NotImplementedError, as does forward mode over forward mode.
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
//
// Everything here is generic over an operator's description (op_traits.h:
// its N differentiable inputs and its other parameters); the argument lists
// of the three levels follow the convention written there, so no index in
// this file depends on one operator's schema.
#include <ATen/ops/ones.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include "common/library_init.h"

#include <algorithm>
#include <array>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "dispatch.h"
#include "op_traits.h"

namespace nanobragg {
namespace {

using dispatch::Repeat;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// ---------------------------------------------------------------------------
// Helpers

// An optional tensor for an op argument: absent when undefined.
std::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

template <typename... Args>
bool any_forward_grad(const Args&... args) {
  return (torch::autograd::isFwGradDefined(args) || ...);
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

template <size_t N>
bool any_present(const std::array<std::optional<at::Tensor>, N>& ts) {
  return std::any_of(ts.begin(), ts.end(), [](const auto& t) { return t.has_value(); });
}

// The entries of `all` asked for by `mask` (undefined elsewhere).
template <size_t N>
variable_list masked(variable_list all, const std::array<bool, N>& mask) {
  for (size_t i = 0; i < N; ++i) {
    if (!mask[i]) all[i] = at::Tensor();
  }
  return all;
}

// {first, rest...} as one mask.
template <size_t N>
std::array<bool, N + 1> prepend(bool first, const std::array<bool, N>& rest) {
  std::array<bool, N + 1> out{};
  out[0] = first;
  std::copy(rest.begin(), rest.end(), out.begin() + 1);
  return out;
}

template <typename NodeT>
std::shared_ptr<NodeT> adopt(NodeT* node) {
  return std::shared_ptr<NodeT>(node, torch::autograd::deleteNode);
}

// A parameter as a Node keeps it: by value.
inline std::vector<int64_t> own(c10::IntArrayRef v) {
  return v.vec();
}
inline std::string own(c10::string_view s) {
  return std::string(s);
}
template <typename T>
T own(T v) {
  return v;
}
template <typename T>
using Owned = decltype(own(std::declval<T>()));

// ---------------------------------------------------------------------------
// A Node that keeps the op's non-tensor parameters by value and its tensor
// inputs as SavedVariables (which check, on unpacking, that none was
// modified in place since), and which outputs of the differentiated op were
// computed (the rest are shape-[0] placeholders whose cotangents are
// ignored).
template <typename Params, size_t kComputed>
class SavingNode : public torch::autograd::TraceableFunction {
 public:
  SavingNode(std::vector<at::Tensor> saved, Params params, std::array<bool, kComputed> computed)
      : params_(std::move(params)), computed_(computed) {
    for (const auto& t : saved) saved_.emplace_back(t, /*is_output=*/false);
  }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& s : saved_) s.reset_data();
  }
  // Compiled autograd (torch._dynamo.config.compiled_autograd): what makes
  // two nodes the same graph, and running apply on its proxies.
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(saved_, /*is_output=*/false);
    std::apply([&](const auto&... p) { (args.collect(p), ...); }, params_);
    for (bool c : computed_) args.collect(c);
  }
  variable_list apply_with_saved(const variable_list& inputs,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    saved.before(saved_);
    variable_list out = apply(variable_list(inputs));
    saved.after(saved_);
    return out;
  }

 protected:
  // task_should_compute_output of next edges first .. first + N - 1.
  template <size_t N>
  std::array<bool, N> needed(size_t first = 0) const {
    std::array<bool, N> mask;
    for (size_t i = 0; i < N; ++i) mask[i] = task_should_compute_output(first + i);
    return mask;
  }
  // The first `count` saved tensors (all by default). Call under mutex_.
  std::vector<at::Tensor> unpack(size_t count = static_cast<size_t>(-1)) {
    count = std::min(count, saved_.size());
    std::vector<at::Tensor> out;
    out.reserve(count);
    for (size_t i = 0; i < count; ++i) out.push_back(saved_[i].unpack(shared_from_this()));
    return out;
  }
  // The cotangent of computed output i, if given.
  std::optional<at::Tensor> cotangent(const variable_list& grads, size_t i) const {
    return computed_[i] ? maybe(grads[i]) : std::nullopt;
  }

  std::vector<SavedVariable> saved_;
  Params params_;
  std::array<bool, kComputed> computed_;
};

// ---------------------------------------------------------------------------
// The autograd kernels of one operator's three levels, and the Nodes they
// record.

template <typename Op, typename Seq = std::make_index_sequence<op_traits::kNumInputs<Op>>,
          typename F = typename Op::ForwardParams, typename B = typename Op::BackwardParams>
struct Autograd;

template <typename Op, size_t... I, typename... F, typename... B>
struct Autograd<Op, std::index_sequence<I...>, op_traits::Params<F...>, op_traits::Params<B...>> {
  static constexpr size_t N = sizeof...(I);
  using Sigs = dispatch::Signatures<Op>;
  using Params = std::tuple<Owned<B>...>;  // the derivatives' parameters
  using Inputs = std::array<at::Tensor, N>;
  // (grad_output, inputs...): what the backward and double backward save.
  using Primals = std::array<at::Tensor, N + 1>;
  using Cotangents = std::array<std::optional<at::Tensor>, N>;

  static std::string node_name(const char* suffix) { return std::string(Op::kNodeName) + suffix; }

  // The backward of (g; inputs) at the saved parameters.
  static std::array<at::Tensor, N> call_backward(const at::Tensor& g, const Inputs& in,
                                                 const Params& p, std::array<bool, N> mask) {
    const auto out = std::apply(
        [&](const auto&... b) { return dispatch::backward<Op>().call(g, in[I]..., b..., mask); },
        p);
    return {std::get<I>(out)...};
  }
  static variable_list call_double_backward(const Cotangents& gg, const Primals& in,
                                            const Params& p, std::array<bool, N + 1> mask) {
    return as_list(std::apply(
        [&](const auto&... b) {
          return dispatch::double_backward<Op>().call(gg[I]..., in[0], in[I + 1]..., b..., mask);
        },
        p));
  }

  // The derivative of backward(g; inputs) = (grad_<input>...) along
  // (dg, d inputs): backward(dg) + g H d, the second term being the double
  // backward's input gradients for cotangents d. By the symmetry of the
  // Hessian it is also the double backward's derivative in its cotangents.
  // Entries not in `want` are undefined.
  static std::array<at::Tensor, N> backward_along(const at::Tensor& dg, const Cotangents& d,
                                                  const Primals& in, const Params& p,
                                                  std::array<bool, N> want) {
    std::array<at::Tensor, N> out;
    if (dg.defined()) {
      out = call_backward(dg, {in[I + 1]...}, p, want);
    }
    if (any_present(d)) {
      const auto dd = call_double_backward(d, in, p, prepend(false, want));
      for (size_t i = 0; i < N; ++i) {
        if (want[i]) out[i] = add_defined(out[i], dd[i + 1]);  // (others: placeholders)
      }
    }
    for (size_t i = 0; i < N; ++i) {
      if (!want[i]) out[i] = at::Tensor();
    }
    return out;
  }

  // d/d(inputs) of the op. Saves the inputs.
  class BackwardNode : public SavingNode<Params, 1> {
   public:
    using SavingNode<Params, 1>::SavingNode;
    variable_list apply(variable_list&& grads) override {
      std::lock_guard<std::mutex> lock(this->mutex_);
      const auto in = this->unpack();
      const auto mask = this->template needed<N>();
      if (!grads[0].defined() || !any_of(mask)) {
        return variable_list(N);
      }
      const auto out = call_backward(grads[0], {in[I]...}, this->params_, mask);
      return masked(variable_list(out.begin(), out.end()), mask);
    }
    std::string name() const override { return node_name("Backward"); }
  };

  // d/d(grad_output, inputs) of the backward. Saves (grad_output, inputs).
  class DoubleBackwardNode : public SavingNode<Params, N> {
   public:
    using SavingNode<Params, N>::SavingNode;
    variable_list apply(variable_list&& grads) override {
      std::lock_guard<std::mutex> lock(this->mutex_);
      const auto in = this->unpack();
      const Cotangents gg{this->cotangent(grads, I)...};
      const auto mask = this->template needed<N + 1>();
      if (!any_present(gg) || !any_of(mask)) {
        return variable_list(N + 1);
      }
      return masked(call_double_backward(gg, {in[0], in[I + 1]...}, this->params_, mask), mask);
    }
    std::string name() const override { return node_name("BackwardBackward"); }
  };

  // Of the double backward, whose outputs are (J d, g H d...) for
  // cotangents d: with cotangents (w_g, w_<input>...) of those outputs,
  //  * d/d(its N cotangent inputs d) is backward(w_g) + double_backward(w).g
  //    (edges 0 .. N-1);
  //  * d/d(grad_output) of J d is 0 (edge N), and d/d(inputs) of <w_g, J d>
  //    is the double backward's input gradients for cotangents d at
  //    grad_output w_g (edges N+1 .. 2N): second derivatives, which reverse
  //    mode over forward mode needs (the forward's tangent is J d);
  //  * the derivatives of g H d in grad_output and the inputs are third
  //    derivatives.
  // Saves (grad_output, inputs..., d...).
  class TripleBackwardNode : public SavingNode<Params, N + 1> {
   public:
    using SavingNode<Params, N + 1>::SavingNode;
    variable_list apply(variable_list&& grads) override {
      std::lock_guard<std::mutex> lock(this->mutex_);
      const at::Tensor w_g = this->computed_[0] ? grads[0] : at::Tensor();
      const Cotangents w{this->cotangent(grads, I + 1)...};
      for (size_t i = N; i < 2 * N + 1; ++i) {
        TORCH_CHECK_NOT_IMPLEMENTED(
            !any_present(w) || !this->task_should_compute_output(i),
            dispatch::qualified_name<Op>(dispatch::Level::kDoubleBackward),
            ": third derivatives are not implemented (first and second derivatives are exact)");
      }
      const auto want_inputs = this->template needed<N>(N + 1);
      const bool of_inputs = w_g.defined() && any_of(want_inputs);
      const auto saved = this->unpack(of_inputs ? 2 * N + 1 : N + 1);
      const Primals in{saved[0], saved[I + 1]...};
      variable_list out(2 * N + 1);
      const auto want = this->template needed<N>();
      if (any_of(want)) {
        const auto d = backward_along(w_g, w, in, this->params_, want);
        std::copy(d.begin(), d.end(), out.begin());
      }
      if (of_inputs) {
        // The backward's derivative along d at grad_output w_g (w_g H d).
        const auto dd = backward_along(at::Tensor(), {maybe(saved[N + 1 + I])...},
                                       {w_g, in[I + 1]...}, this->params_, want_inputs);
        std::copy(dd.begin(), dd.end(), out.begin() + N + 1);
      }
      return out;
    }
    std::string name() const override { return node_name("BackwardBackwardBackward"); }
  };

  static Params params_from_forward(F... f) {
    return std::apply([](const auto&... b) { return Params{own(b)...}; },
                      Op::backward_params(f...));
  }

  static at::Tensor forward(c10::DispatchKeySet ks, Repeat<I, const at::Tensor&>... in, F... f) {
    std::shared_ptr<BackwardNode> node;
    if (torch::autograd::compute_requires_grad(in...)) {
      node = adopt(new BackwardNode({in...}, params_from_forward(f...), {true}));
      node->set_next_edges(torch::autograd::collect_next_edges(in...));
    }
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = dispatch::forward<Op>().redispatch(ks & c10::after_autograd_keyset, in..., f...);
    }
    if (node) {
      torch::autograd::set_history(out, node);
    }
    if (any_forward_grad(in...)) {
      // d out along the input tangents: the double backward's d/dg at g = 1.
      const Params p = params_from_forward(f...);
      const auto jvp = call_double_backward(
          {maybe(in._fw_grad(0))...}, {at::ones(out.sizes(), out.options()), in._fw_primal(0)...},
          p, prepend(true, std::array<bool, N>{}));
      out._set_fw_grad(jvp[0], /*level=*/0, /*is_inplace_op=*/false);
    }
    return out;
  }

  static typename Sigs::BackwardResult backward(c10::DispatchKeySet ks,
                                                const at::Tensor& grad_output,
                                                Repeat<I, const at::Tensor&>... in, B... b,
                                                std::array<bool, N> output_mask) {
    std::shared_ptr<DoubleBackwardNode> node;
    if (torch::autograd::compute_requires_grad(grad_output, in...)) {
      node = adopt(new DoubleBackwardNode({grad_output, in...}, Params{own(b)...}, output_mask));
      node->set_next_edges(torch::autograd::collect_next_edges(grad_output, in...));
    }
    typename Sigs::BackwardResult out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = dispatch::backward<Op>().redispatch(ks & c10::after_autograd_keyset, grad_output, in...,
                                                b..., output_mask);
    }
    if (node) {
      torch::autograd::set_history(as_list(out), node);
    }
    if (any_forward_grad(grad_output, in...)) {
      // Forward-over-reverse (torch.func.hessian).
      const auto tangent = backward_along(grad_output._fw_grad(0), {maybe(in._fw_grad(0))...},
                                          {grad_output._fw_primal(0), in._fw_primal(0)...},
                                          Params{own(b)...}, output_mask);
      const auto outs = as_list(out);
      for (size_t i = 0; i < N; ++i) {
        if (output_mask[i]) outs[i]._set_fw_grad(tangent[i], /*level=*/0, /*is_inplace_op=*/false);
      }
    }
    return out;
  }

  static typename Sigs::DoubleBackwardResult double_backward(
      c10::DispatchKeySet ks, Repeat<I, const std::optional<at::Tensor>&>... gg,
      const at::Tensor& grad_output, Repeat<I, const at::Tensor&>... in, B... b,
      std::array<bool, N + 1> output_mask) {
    TORCH_CHECK_NOT_IMPLEMENTED(
        !any_forward_grad(gg..., grad_output, in...),
        dispatch::qualified_name<Op>(dispatch::Level::kDoubleBackward),
        ": forward-mode AD of the double backward is not implemented: forward mode over "
        "forward mode (jacfwd(jacfwd(f))) needs second directional derivatives of the output, "
        "and anything above is a third derivative; torch.func.hessian, jacfwd(jacrev(f)) and "
        "jacrev(jacfwd(f)) give exact second derivatives");
    std::shared_ptr<TripleBackwardNode> node;
    if (torch::autograd::compute_requires_grad(gg..., grad_output, in...)) {
      node = adopt(new TripleBackwardNode({grad_output, in..., gg.value_or(at::Tensor())...},
                                          Params{own(b)...}, output_mask));
      node->set_next_edges(torch::autograd::collect_next_edges(gg..., grad_output, in...));
    }
    typename Sigs::DoubleBackwardResult out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = dispatch::double_backward<Op>().redispatch(ks & c10::after_autograd_keyset, gg...,
                                                       grad_output, in..., b..., output_mask);
    }
    if (node) {
      torch::autograd::set_history(as_list(out), node);
    }
    return out;
  }

  static void register_kernels(torch::Library& m) {
    m.impl(Op::kName, TORCH_FN(forward));
    const std::string backward_name = std::string(Op::kName) + "_backward";
    const std::string double_backward_name = std::string(Op::kName) + "_double_backward";
    m.impl(backward_name.c_str(), TORCH_FN(backward));
    m.impl(double_backward_name.c_str(), TORCH_FN(double_backward));
  }
};

}  // namespace
}  // namespace nanobragg

NANOBRAGG_LIBRARY_IMPL(Autograd, m) {
  using namespace nanobragg;
  Autograd<op_traits::TricubicInterp>::register_kernels(m);
  Autograd<op_traits::DetectorAbsorption>::register_kernels(m);
}
