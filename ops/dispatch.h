// Typed dispatcher handles of the library's operators, for code inside the
// library that calls one op from another (the Autograd kernels, autocast,
// the public C++ API). Calling through the dispatcher, never a backend
// function directly, keeps autograd, device dispatch and tracing in the loop.
//
// The C++ signatures of each operator's three levels are derived from its
// description (op_traits.h); the first lookup of a handle checks the
// schema's argument and return names against that description, so that a
// schema and its description cannot drift apart silently (the dispatcher
// itself checks the types).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "op_traits.h"

namespace nanobragg {
namespace dispatch {

template <size_t, typename T>
using Repeat = T;

// The C++ signatures of an operator's three levels.
template <typename Op, typename Seq = std::make_index_sequence<op_traits::kNumInputs<Op>>,
          typename F = typename Op::ForwardParams, typename B = typename Op::BackwardParams>
struct Signatures;

template <typename Op, size_t... I, typename... F, typename... B>
struct Signatures<Op, std::index_sequence<I...>, op_traits::Params<F...>, op_traits::Params<B...>> {
  static constexpr size_t N = sizeof...(I);
  using Forward = at::Tensor(Repeat<I, const at::Tensor&>..., F...);
  using BackwardResult = std::tuple<Repeat<I, at::Tensor>...>;
  using Backward = BackwardResult(const at::Tensor&, Repeat<I, const at::Tensor&>..., B...,
                                  std::array<bool, N>);
  using DoubleBackwardResult = std::tuple<at::Tensor, Repeat<I, at::Tensor>...>;
  using DoubleBackward = DoubleBackwardResult(Repeat<I, const std::optional<at::Tensor>&>...,
                                              const at::Tensor&, Repeat<I, const at::Tensor&>...,
                                              B..., std::array<bool, N + 1>);
};

enum class Level { kForward, kBackward, kDoubleBackward };

// "nanobragg::<op>", "nanobragg::<op>_backward", ...
template <typename Op>
std::string qualified_name(Level level) {
  std::string name = std::string("nanobragg::") + Op::kName;
  if (level == Level::kBackward) name += "_backward";
  if (level == Level::kDoubleBackward) name += "_double_backward";
  return name;
}

namespace detail {

template <typename Op>
std::pair<std::vector<std::string>, std::vector<std::string>> expected_names(Level level) {
  std::vector<std::string> args, returns;
  if (level == Level::kDoubleBackward) {
    for (const char* in : Op::kInputs) args.push_back(std::string("grad_grad_") + in);
  }
  if (level != Level::kForward) args.push_back("grad_output");
  for (const char* in : Op::kInputs) args.push_back(in);
  if (level == Level::kForward) {
    for (const char* p : Op::kForwardParams) args.push_back(p);
    return {args, returns};
  }
  for (const char* p : Op::kBackwardParams) args.push_back(p);
  args.push_back("output_mask");
  if (level == Level::kDoubleBackward) returns.push_back("grad_grad_output");
  for (const char* in : Op::kInputs) returns.push_back(std::string("grad_") + in);
  return {args, returns};
}

template <typename Sig, typename Op>
c10::TypedOperatorHandle<Sig> find(Level level) {
  const std::string name = qualified_name<Op>(level);
  const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "");
  const auto& schema = op.schema();
  const auto [args, returns] = expected_names<Op>(level);
  bool same = schema.arguments().size() == args.size();
  for (size_t i = 0; same && i < args.size(); ++i) same = schema.arguments()[i].name() == args[i];
  // (The forward's single return is unnamed.)
  if (level != Level::kForward) {
    same = same && schema.returns().size() == returns.size();
    for (size_t i = 0; same && i < returns.size(); ++i) {
      same = schema.returns()[i].name() == returns[i];
    }
  }
  TORCH_INTERNAL_ASSERT(same, name, ": the schema ", schema,
                        " does not follow the op's description in ops/op_traits.h");
  return op.typed<Sig>();
}

}  // namespace detail

template <typename Op>
const c10::TypedOperatorHandle<typename Signatures<Op>::Forward>& forward() {
  static const auto handle = detail::find<typename Signatures<Op>::Forward, Op>(Level::kForward);
  return handle;
}

template <typename Op>
const c10::TypedOperatorHandle<typename Signatures<Op>::Backward>& backward() {
  static const auto handle = detail::find<typename Signatures<Op>::Backward, Op>(Level::kBackward);
  return handle;
}

template <typename Op>
const c10::TypedOperatorHandle<typename Signatures<Op>::DoubleBackward>& double_backward() {
  static const auto handle =
      detail::find<typename Signatures<Op>::DoubleBackward, Op>(Level::kDoubleBackward);
  return handle;
}

// By name, for the public API and autocast.
inline const auto& tricubic_interp() {
  return forward<op_traits::TricubicInterp>();
}
inline const auto& tricubic_interp_backward() {
  return backward<op_traits::TricubicInterp>();
}
inline const auto& tricubic_interp_double_backward() {
  return double_backward<op_traits::TricubicInterp>();
}
inline const auto& detector_absorption() {
  return forward<op_traits::DetectorAbsorption>();
}
inline const auto& detector_absorption_backward() {
  return backward<op_traits::DetectorAbsorption>();
}
inline const auto& detector_absorption_double_backward() {
  return double_backward<op_traits::DetectorAbsorption>();
}

}  // namespace dispatch
}  // namespace nanobragg
