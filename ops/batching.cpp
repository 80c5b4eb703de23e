// vmap (torch.func.vmap, and so torch.func.jacrev / hessian) rules for every
// operator of the library, at functorch's FuncTorchBatched key. Without them
// functorch falls back to a loop of its own that warns on every call.
//
// Where a batch dimension is just more points, it is folded into the point
// dimensions and the operator runs once:
//   * tricubic_interp with only hkl batched;
//   * tricubic_interp_backward with grid unbatched and only grad_hkl asked
//     for (jacrev with respect to hkl);
//   * detector_absorption with only intensity / pixel_coords batched.
// Anything else (a batched grid, odet, thickness, ...) runs the operator once
// per batch entry and stacks the results: correct, and as fast as B calls.
// An empty batch (size 0) runs no backend kernel: its results' shapes come
// from the Meta kernels.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/functorch/DynamicLayer.h>
#include <ATen/functorch/PlumbingHelper.h>
#include <torch/library.h>

#include "common/library_init.h"

#include <optional>
#include <string>
#include <vector>

#include "op_traits.h"

namespace nanobragg {
namespace {

namespace ft = at::functorch;
using Stack = torch::jit::Stack;

int64_t current_level(const c10::OperatorHandle& op) {
  const auto layer = ft::maybeCurrentDynamicLayer();
  TORCH_INTERNAL_ASSERT(layer.has_value(), op.schema().name(), ": vmap rule called outside vmap");
  return layer->layerId();
}

// The op's arguments with every tensor batched at `level` unwrapped and its
// batch dimension moved to the front. The fold rules below find arguments
// and returns by their schema names, not by position.
struct Unwrapped {
  const c10::FunctionSchema* schema = nullptr;
  std::vector<c10::IValue> args;
  std::vector<bool> batched;
  int64_t batch_size = -1;

  size_t index(const char* name) const {
    const auto i = schema->argumentIndexWithName(name);
    TORCH_INTERNAL_ASSERT(i.has_value(), schema->name(), " has no argument ", name);
    return static_cast<size_t>(*i);
  }
  size_t output_index(const char* name) const {
    const auto& returns = schema->returns();
    for (size_t i = 0; i < returns.size(); ++i) {
      if (returns[i].name() == name) return i;
    }
    TORCH_INTERNAL_ASSERT(false, schema->name(), " has no return ", name);
  }
  const c10::IValue& arg(const char* name) const { return args[index(name)]; }
  bool is_batched(const char* name) const { return batched[index(name)]; }
};

Unwrapped unwrap_arguments(const c10::OperatorHandle& op, const std::vector<c10::IValue>& args,
                           int64_t level) {
  Unwrapped u;
  u.schema = &op.schema();
  u.args = args;
  u.batched.assign(args.size(), false);
  for (size_t i = 0; i < args.size(); ++i) {
    if (!args[i].isTensor()) {
      continue;
    }
    const at::Tensor& t = args[i].toTensor();
    if (!ft::isBatchedAtLevel(t, level)) {
      continue;
    }
    auto [value, bdim] = ft::unwrapTensorAtLevel(t, level);
    at::Tensor front = value.movedim(*bdim, 0);
    u.batch_size = front.size(0);
    u.args[i] = front;
    u.batched[i] = true;
  }
  return u;
}

// Pushes op's returns (each [B, ...]) as tensors batched at dim 0.
void push_batched(Stack* stack, std::vector<at::Tensor> outs, int64_t level) {
  for (auto& t : outs) {
    stack->emplace_back(ft::makeBatched(std::move(t), 0, level));
  }
}

std::vector<at::Tensor> call_returning_tensors(const c10::OperatorHandle& op,
                                               std::vector<c10::IValue> args) {
  Stack s(std::make_move_iterator(args.begin()), std::make_move_iterator(args.end()));
  op.callBoxed(&s);
  std::vector<at::Tensor> outs;
  outs.reserve(s.size());
  for (auto& v : s) {
    outs.push_back(v.toTensor());
  }
  return outs;
}

// The device of return k: a gradient ("grad_<argument>") is on its
// argument's device, as the backends put it (a 0-dim CPU scalar's gradient
// stays on the CPU with CUDA data); anything else on the first tensor's.
at::Device device_of_return(const Unwrapped& u, size_t k, at::Device first) {
  const std::string& name = u.schema->returns()[k].name();
  const std::string prefix = "grad_";
  if (name.compare(0, prefix.size(), prefix) != 0) return first;
  const auto i = u.schema->argumentIndexWithName(name.substr(prefix.size()));
  if (!i.has_value() || !u.args[static_cast<size_t>(*i)].isTensor()) return first;
  return u.args[static_cast<size_t>(*i)].toTensor().device();
}

// A host scalar of either operator (op_traits kHostScalars), or the
// double backward's cotangent of one ("grad_grad_<name>").
bool is_host_scalar(const std::string& name) {
  const std::string prefix = "grad_grad_";
  const std::string input =
      name.compare(0, prefix.size(), prefix) == 0 ? name.substr(prefix.size()) : name;
  for (const char* s : op_traits::TricubicInterp::kHostScalars) {
    if (input == s) return true;
  }
  for (const char* s : op_traits::DetectorAbsorption::kHostScalars) {
    if (input == s) return true;
  }
  return false;
}

// An empty batch: the shapes and dtypes of one entry's results come from
// the Meta kernels (which check the arguments as the backends do, reading
// no value but a host scalar's), and each result is [0, ...] of them. A
// host scalar held on the CPU (and its cotangent) stays a CPU tensor, so
// that its device is checked as in any call: unbatched, as it is, so that
// an invalid value is rejected here too; batched (no entry, no value to
// check), as a stand-in 1, which is valid for every host scalar.
std::vector<at::Tensor> empty_batch(const c10::OperatorHandle& op, const Unwrapped& u) {
  std::optional<at::Device> device;
  std::vector<c10::IValue> args = u.args;
  for (size_t i = 0; i < args.size(); ++i) {
    if (!args[i].isTensor()) continue;
    const at::Tensor& t = u.args[i].toTensor();
    if (!device) device = t.device();
    const int64_t entry_dim = t.dim() - (u.batched[i] ? 1 : 0);
    if (t.is_cpu() && entry_dim == 0 && is_host_scalar(u.schema->arguments()[i].name())) {
      if (u.batched[i]) args[i] = at::ones({}, t.options());
      continue;
    }
    args[i] = u.batched[i]
                  ? at::empty(t.sizes().slice(1), t.options().device(at::kMeta))
                  : at::empty_strided(t.sizes(), t.strides(), t.options().device(at::kMeta));
  }
  auto outs = call_returning_tensors(op, std::move(args));
  const at::Device first = device.value_or(at::Device(at::kCPU));
  for (size_t k = 0; k < outs.size(); ++k) {
    std::vector<int64_t> shape{0};
    shape.insert(shape.end(), outs[k].sizes().begin(), outs[k].sizes().end());
    outs[k] = at::empty(shape, outs[k].options().device(device_of_return(u, k, first)));
  }
  return outs;
}

// The general rule: one call per batch entry, results stacked.
std::vector<at::Tensor> loop_over_batch(const c10::OperatorHandle& op, const Unwrapped& u) {
  if (u.batch_size == 0) {
    return empty_batch(op, u);
  }
  std::vector<std::vector<at::Tensor>> per_output(op.schema().returns().size());
  for (int64_t b = 0; b < u.batch_size; ++b) {
    std::vector<c10::IValue> args = u.args;
    for (size_t i = 0; i < args.size(); ++i) {
      if (u.batched[i]) {
        args[i] = u.args[i].toTensor().select(0, b);
      }
    }
    auto outs = call_returning_tensors(op, std::move(args));
    for (size_t k = 0; k < outs.size(); ++k) {
      per_output[k].push_back(std::move(outs[k]));
    }
  }
  std::vector<at::Tensor> stacked;
  for (auto& list : per_output) {
    stacked.push_back(at::stack(list));
  }
  return stacked;
}

using MaybeOuts = std::optional<std::vector<at::Tensor>>;
using FoldFn = MaybeOuts (*)(const c10::OperatorHandle&, const Unwrapped&);

// Boxed entry point: `Fold(op, u)` returns the folded results, or nullopt
// when the batch cannot be folded for these arguments.
template <FoldFn Fold>
void rule(const c10::OperatorHandle& op, Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_level(op);
  const size_t n = op.schema().arguments().size();
  std::vector<c10::IValue> args(stack->end() - n, stack->end());
  torch::jit::drop(*stack, n);
  const Unwrapped u = unwrap_arguments(op, args, level);
  if (u.batch_size < 0) {  // nothing batched at this level
    for (auto& t : call_returning_tensors(op, args)) stack->emplace_back(std::move(t));
    return;
  }
  MaybeOuts outs = u.batch_size > 0 ? Fold(op, u) : std::nullopt;
  push_batched(stack, outs ? std::move(*outs) : loop_over_batch(op, u), level);
}

MaybeOuts no_fold(const c10::OperatorHandle&, const Unwrapped&) {
  return std::nullopt;
}

// tricubic_interp(grid, hkl, ...): a batched hkl is [B, ..., 3], more points.
MaybeOuts fold_tricubic(const c10::OperatorHandle& op, const Unwrapped& u) {
  if (u.is_batched("grid")) return std::nullopt;
  return call_returning_tensors(op, u.args);
}

// tricubic_interp_backward(grad_output, grid, hkl, ..., output_mask):
// grad_hkl alone is per point, so grad_output and hkl (either batched, the
// other expanded to B without copying) fold.
MaybeOuts fold_tricubic_backward(const c10::OperatorHandle& op, const Unwrapped& u) {
  const size_t grad_grid = u.output_index("grad_grid");
  if (u.is_batched("grid") || u.arg("output_mask").toBoolList().get(grad_grid)) {
    return std::nullopt;
  }
  std::vector<c10::IValue> args = u.args;
  for (const char* name : {"grad_output", "hkl"}) {
    const size_t i = u.index(name);
    if (!u.batched[i]) {
      const at::Tensor t = args[i].toTensor();
      std::vector<int64_t> shape{u.batch_size};
      shape.insert(shape.end(), t.sizes().begin(), t.sizes().end());
      args[i] = t.unsqueeze(0).expand(shape);
    }
  }
  auto outs = call_returning_tensors(op, std::move(args));
  // grad_grid was not asked for: its placeholder is [0] per batch entry.
  outs[grad_grid] = at::empty({u.batch_size, 0}, outs[grad_grid].options());
  return outs;
}

// detector_absorption(intensity, pixel_coords, odet, thickness,
// attenuation_length, thicksteps, oversample_thick, per_layer): with only
// intensity / pixel_coords batched the batch becomes the leading pixel
// dimension. Each batched input gets size-1 dims so that its pixel dims line
// up with the other input's under broadcasting; per_layer keeps the layer
// dim first.
MaybeOuts fold_absorption(const c10::OperatorHandle& op, const Unwrapped& u) {
  if (u.is_batched("odet") || u.is_batched("thickness") || u.is_batched("attenuation_length")) {
    return std::nullopt;
  }
  const bool per_layer = u.arg("per_layer").toBool();
  const int64_t lead = per_layer ? 1 : 0;  // layer dim
  const size_t i_intensity = u.index("intensity"), i_coords = u.index("pixel_coords");
  const at::Tensor intensity = u.args[i_intensity].toTensor();
  const at::Tensor coords = u.args[i_coords].toTensor();
  const bool b_intensity = u.batched[i_intensity], b_coords = u.batched[i_coords];
  auto pixel_rank = [&](const at::Tensor& t, bool batched, int64_t trailing) {
    return t.dim() - (batched ? 1 : 0) - lead - trailing;
  };
  const int64_t rank =
      std::max(pixel_rank(intensity, b_intensity, 0), pixel_rank(coords, b_coords, 1));
  auto place = [&](at::Tensor t, bool batched, int64_t trailing) {
    if (!batched) return t;
    if (per_layer) t = t.movedim(0, 1);  // [L, B, ...]
    for (int64_t r = pixel_rank(t, true, trailing); r < rank; ++r) {
      t = t.unsqueeze(lead + 1);
    }
    return t;
  };
  std::vector<c10::IValue> args = u.args;
  args[i_intensity] = place(intensity, b_intensity, 0);
  args[i_coords] = place(coords, b_coords, 1);
  return call_returning_tensors(op, std::move(args));  // [B, *P]
}

// The vmap rules of one operator's three levels (op_traits.h).
template <typename Op, FoldFn Forward, FoldFn Backward, FoldFn DoubleBackward>
void register_rules(torch::Library& m) {
  const std::string name = Op::kName;
  const std::string backward = name + "_backward";
  const std::string double_backward = name + "_double_backward";
  m.impl(name.c_str(), torch::CppFunction::makeFromBoxedFunction<&rule<Forward>>());
  m.impl(backward.c_str(), torch::CppFunction::makeFromBoxedFunction<&rule<Backward>>());
  m.impl(double_backward.c_str(),
         torch::CppFunction::makeFromBoxedFunction<&rule<DoubleBackward>>());
}

}  // namespace
}  // namespace nanobragg

NANOBRAGG_LIBRARY_IMPL(FuncTorchBatched, m) {
  using namespace nanobragg;
  register_rules<op_traits::TricubicInterp, &fold_tricubic, &fold_tricubic_backward, &no_fold>(m);
  register_rules<op_traits::DetectorAbsorption, &fold_absorption, &no_fold, &no_fold>(m);
}
