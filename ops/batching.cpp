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
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/functorch/DynamicLayer.h>
#include <ATen/functorch/PlumbingHelper.h>
#include <torch/library.h>

#include <optional>
#include <vector>

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
// batch dimension moved to the front.
struct Unwrapped {
  std::vector<c10::IValue> args;
  std::vector<bool> batched;
  int64_t batch_size = -1;
};

Unwrapped unwrap_arguments(const std::vector<c10::IValue>& args, int64_t level) {
  Unwrapped u;
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

// The general rule: one call per batch entry, results stacked.
void loop_over_batch(const c10::OperatorHandle& op, const Unwrapped& u, Stack* stack,
                     int64_t level) {
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
  push_batched(stack, std::move(stacked), level);
}

// Boxed entry point: `fold(u)` returns the folded results, or nullopt when
// the batch cannot be folded for these arguments.
template <typename FoldFn>
void batched_kernel(const c10::OperatorHandle& op, Stack* stack, const FoldFn& fold) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_level(op);
  const size_t n = op.schema().arguments().size();
  std::vector<c10::IValue> args(stack->end() - n, stack->end());
  torch::jit::drop(*stack, n);
  const Unwrapped u = unwrap_arguments(args, level);
  if (u.batch_size < 0) {  // nothing batched at this level
    for (auto& t : call_returning_tensors(op, args)) stack->emplace_back(std::move(t));
    return;
  }
  if (auto outs = fold(op, u)) {
    push_batched(stack, std::move(*outs), level);
    return;
  }
  loop_over_batch(op, u, stack, level);
}

using MaybeOuts = std::optional<std::vector<at::Tensor>>;

MaybeOuts no_fold(const c10::OperatorHandle&, const Unwrapped&) { return std::nullopt; }

// tricubic_interp(grid, hkl, ...): a batched hkl is [B, ..., 3], more points.
MaybeOuts fold_tricubic(const c10::OperatorHandle& op, const Unwrapped& u) {
  if (u.batched[0]) return std::nullopt;
  return call_returning_tensors(op, u.args);
}

// tricubic_interp_backward(grad_output, grid, hkl, index_min, out_of_range,
// output_mask): grad_hkl alone is per point, so grad_output and hkl (either
// batched, the other expanded to B without copying) fold.
MaybeOuts fold_tricubic_backward(const c10::OperatorHandle& op, const Unwrapped& u) {
  const auto mask = u.args[5].toBoolList();
  if (u.batched[1] || mask.get(0)) return std::nullopt;
  std::vector<c10::IValue> args = u.args;
  for (int i : {0, 2}) {
    if (!u.batched[i]) {
      const at::Tensor t = args[i].toTensor();
      std::vector<int64_t> shape{u.batch_size};
      shape.insert(shape.end(), t.sizes().begin(), t.sizes().end());
      args[i] = t.unsqueeze(0).expand(shape);
    }
  }
  auto outs = call_returning_tensors(op, std::move(args));
  // grad_grid was not asked for: its placeholder is [0] per batch entry.
  outs[0] = at::empty({u.batch_size, 0}, outs[0].options());
  return outs;
}

// detector_absorption(intensity, pixel_coords, odet, thickness,
// attenuation_length, thicksteps, oversample_thick, per_layer): with only
// intensity / pixel_coords batched the batch becomes the leading pixel
// dimension. Each batched input gets size-1 dims so that its pixel dims line
// up with the other input's under broadcasting; per_layer keeps the layer
// dim first.
MaybeOuts fold_absorption(const c10::OperatorHandle& op, const Unwrapped& u) {
  if (u.batched[2] || u.batched[3] || u.batched[4]) return std::nullopt;
  const bool per_layer = u.args[7].toBool();
  const int64_t lead = per_layer ? 1 : 0;  // layer dim
  at::Tensor intensity = u.args[0].toTensor(), coords = u.args[1].toTensor();
  auto pixel_rank = [&](const at::Tensor& t, bool batched, int64_t trailing) {
    return t.dim() - (batched ? 1 : 0) - lead - trailing;
  };
  const int64_t rank = std::max(pixel_rank(intensity, u.batched[0], 0),
                                pixel_rank(coords, u.batched[1], 1));
  auto place = [&](at::Tensor t, bool batched, int64_t trailing) {
    if (!batched) return t;
    if (per_layer) t = t.movedim(0, 1);  // [L, B, ...]
    for (int64_t r = pixel_rank(t, true, trailing); r < rank; ++r) {
      t = t.unsqueeze(lead + 1);
    }
    return t;
  };
  std::vector<c10::IValue> args = u.args;
  args[0] = place(intensity, u.batched[0], 0);
  args[1] = place(coords, u.batched[1], 1);
  return call_returning_tensors(op, std::move(args));  // [B, *P]
}

template <MaybeOuts (*Fold)(const c10::OperatorHandle&, const Unwrapped&)>
void rule(const c10::OperatorHandle& op, Stack* stack) {
  batched_kernel(op, stack, Fold);
}

}  // namespace
}  // namespace nanobragg

TORCH_LIBRARY_IMPL(nanobragg, FuncTorchBatched, m) {
  using namespace nanobragg;
  m.impl("tricubic_interp", torch::CppFunction::makeFromBoxedFunction<&rule<&fold_tricubic>>());
  m.impl("tricubic_interp_backward",
         torch::CppFunction::makeFromBoxedFunction<&rule<&fold_tricubic_backward>>());
  m.impl("tricubic_interp_double_backward",
         torch::CppFunction::makeFromBoxedFunction<&rule<&no_fold>>());
  m.impl("detector_absorption",
         torch::CppFunction::makeFromBoxedFunction<&rule<&fold_absorption>>());
  m.impl("detector_absorption_backward",
         torch::CppFunction::makeFromBoxedFunction<&rule<&no_fold>>());
  m.impl("detector_absorption_double_backward",
         torch::CppFunction::makeFromBoxedFunction<&rule<&no_fold>>());
}
