// Host-side tensor plumbing of tricubic_interp shared by the CPU and CUDA
// kernels: the grid as a GridView, and per-point offsets of hkl and the
// incoming gradient for any strides.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common/checks.h"
#include "common/point_offsets.h"
#include "tricubic/tricubic_math.h"

namespace nanobragg {
namespace tricubic {

template <typename T>
GridView<T> make_grid_view(const at::Tensor& grid, c10::IntArrayRef index_min) {
  GridView<T> view;
  view.data = grid.const_data_ptr<T>();
  for (int d = 0; d < 3; ++d) {
    view.size[d] = grid.size(d);
    view.stride[d] = grid.stride(d);
    view.lo[d] = static_cast<double>(index_min[d]);
  }
  return view;
}

inline GridShape make_grid_shape(c10::IntArrayRef grid_sizes, c10::IntArrayRef index_min) {
  GridShape shape;
  for (int d = 0; d < 3; ++d) {
    shape.size[d] = grid_sizes[d];
    shape.lo[d] = static_cast<double>(index_min[d]);
  }
  return shape;
}

// hkl.shape[:-1].
inline c10::IntArrayRef point_shape_of(const at::Tensor& hkl) {
  return hkl.sizes().slice(0, hkl.dim() - 1);
}

// Offsets of the per-point operands (hkl without its last dimension, the
// incoming gradient); falls back to contiguous copies only when the point
// shape has more non-mergeable dimensions than PointOffsets holds.
template <int N>
PointOffsets<N> point_offsets_or_contiguous(c10::IntArrayRef point_shape,
                                            std::array<at::Tensor*, N> operands) {
  std::array<c10::IntArrayRef, N> strides;
  for (int i = 0; i < N; ++i) {
    strides[i] = operands[i]->strides().slice(0, point_shape.size());
  }
  PointOffsets<N> offsets;
  if (!make_point_offsets<N>(point_shape, strides, offsets)) {
    for (int i = 0; i < N; ++i) {
      *operands[i] = operands[i]->contiguous();
      strides[i] = operands[i]->strides().slice(0, point_shape.size());
    }
    TORCH_INTERNAL_ASSERT(make_point_offsets<N>(point_shape, strides, offsets));
  }
  return offsets;
}

// The backward's outputs: a zeroed grid gradient (the kernels add into it)
// and an hkl gradient (written whole), or shape-[0] tensors for gradients
// not asked for (see ops/schemas.cpp).
inline std::tuple<at::Tensor, at::Tensor> allocate_backward_outputs(
    const at::Tensor& grid, const at::Tensor& hkl, const std::array<bool, 2>& output_mask) {
  return {output_mask[0] ? at::zeros(grid.sizes(), grid.options()) : at::empty({0}, grid.options()),
          output_mask[1] ? at::empty(hkl.sizes(), hkl.options()) : at::empty({0}, hkl.options())};
}

// A grid-shaped cotangent as a GridView; data is null when it is absent.
template <typename T>
GridView<T> make_cotangent_view(const at::Tensor& gg_grid, c10::IntArrayRef index_min) {
  if (gg_grid.defined()) {
    return make_grid_view<T>(gg_grid, index_min);
  }
  GridView<T> view{};
  view.data = nullptr;
  return view;
}

// The double backward's checked arguments and outputs. An absent grad_hkl
// cotangent becomes a zero-stride view of one zero (no memory); outputs not
// asked for are shape-[0] tensors.
struct DoubleBackwardCall {
  OutOfRange mode;
  at::Tensor gg_grid;  // undefined when absent
  at::Tensor gg_hkl;   // hkl-shaped, never undefined
  bool has_gg_hkl;
  at::Tensor grad_grad_output, grad_grid, grad_hkl;
  // The per-point operands (contiguous copies only where PointOffsets needs
  // them) and their offsets: hkl, grad_output, gg_hkl.
  at::Tensor hkl, grad;
  PointOffsets<3> offsets;
  int64_t num_points;
};

inline DoubleBackwardCall prepare_double_backward(
    const char* op, const std::optional<at::Tensor>& grad_grad_grid,
    const std::optional<at::Tensor>& grad_grad_hkl, const at::Tensor& grad_output,
    const at::Tensor& grid, const at::Tensor& hkl, c10::IntArrayRef index_min,
    c10::string_view out_of_range, const std::array<bool, 3>& output_mask) {
  DoubleBackwardCall c;
  c.mode = checks::check_tricubic_args(op, grid, hkl, index_min, out_of_range);
  checks::check_tricubic_grad_output(op, grad_output, grid, hkl);
  checks::check_cotangent(op, "grad_grad_grid", grad_grad_grid, "grid", grid);
  checks::check_cotangent(op, "grad_grad_hkl", grad_grad_hkl, "hkl", hkl);
  if (grad_grad_grid.has_value() && grad_grad_grid->defined()) {
    c.gg_grid = *grad_grad_grid;
  }
  c.has_gg_hkl = grad_grad_hkl.has_value() && grad_grad_hkl->defined();
  c.gg_hkl = c.has_gg_hkl ? *grad_grad_hkl : at::zeros({}, hkl.options()).expand(hkl.sizes());
  // (Each placeholder its own tensor: outputs must not alias.)
  auto empty = [&] { return at::empty({0}, grid.options()); };
  c.grad_grad_output = output_mask[0] ? at::empty(point_shape_of(hkl), grid.options()) : empty();
  c.grad_grid = output_mask[1] ? at::zeros(grid.sizes(), grid.options()) : empty();
  c.grad_hkl = output_mask[2] ? at::empty(hkl.sizes(), hkl.options()) : empty();
  c.hkl = hkl;
  c.grad = grad_output;
  const auto point_shape = point_shape_of(hkl);
  c.num_points = c10::multiply_integers(point_shape);
  if (c.num_points > 0) {
    c.offsets = point_offsets_or_contiguous<3>(point_shape, {&c.hkl, &c.grad, &c.gg_hkl});
  }
  return c;
}

// Calls fn(std::true_type) for grids whose l axis is contiguous (the
// contraction then uses a compile-time unit stride), else fn(std::false_type).
template <typename Fn>
void with_unit_l_stride(bool unit, const Fn& fn) {
  if (unit) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

}  // namespace tricubic
}  // namespace nanobragg
