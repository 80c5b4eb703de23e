// The host plumbing of tricubic_layout.h, compiled once with the baseline
// flags.
#include "tricubic/tricubic_layout.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

namespace nanobragg {
namespace tricubic {

template <typename T>
GridView<T> make_grid_view(const at::Tensor& grid, c10::IntArrayRef index_min) {
  GridView<T> view;
  view.data = grid.const_data_ptr<T>();
  for (int d = 0; d < 3; ++d) {
    view.size[d] = grid.size(d);
    view.stride[d] = grid.stride(d);
    view.lo[d] = index_min[d];
  }
  return view;
}

template <typename T>
GridView<T> make_cotangent_view(const at::Tensor& gg_grid, c10::IntArrayRef index_min) {
  if (gg_grid.defined()) {
    return make_grid_view<T>(gg_grid, index_min);
  }
  GridView<T> view{};
  view.data = nullptr;
  return view;
}

template GridView<float> make_grid_view<float>(const at::Tensor&, c10::IntArrayRef);
template GridView<double> make_grid_view<double>(const at::Tensor&, c10::IntArrayRef);
template GridView<float> make_cotangent_view<float>(const at::Tensor&, c10::IntArrayRef);
template GridView<double> make_cotangent_view<double>(const at::Tensor&, c10::IntArrayRef);

GridShape make_grid_shape(c10::IntArrayRef grid_sizes, c10::IntArrayRef index_min) {
  GridShape shape;
  for (int d = 0; d < 3; ++d) {
    shape.size[d] = grid_sizes[d];
    shape.lo[d] = index_min[d];
  }
  return shape;
}

c10::IntArrayRef point_shape_of(const at::Tensor& hkl) {
  return hkl.sizes().slice(0, hkl.dim() - 1);
}

std::tuple<at::Tensor, at::Tensor> allocate_backward_outputs(
    const at::Tensor& grid, const at::Tensor& hkl, const std::array<bool, 2>& output_mask) {
  return {output_mask[0] ? at::zeros(grid.sizes(), grid.options()) : at::empty({0}, grid.options()),
          output_mask[1] ? at::empty(hkl.sizes(), hkl.options()) : at::empty({0}, hkl.options())};
}

DoubleBackwardCall prepare_double_backward(const char* op,
                                           const std::optional<at::Tensor>& grad_grad_grid,
                                           const std::optional<at::Tensor>& grad_grad_hkl,
                                           const at::Tensor& grad_output, const at::Tensor& grid,
                                           const at::Tensor& hkl, c10::IntArrayRef index_min,
                                           c10::string_view out_of_range,
                                           const std::array<bool, 3>& output_mask) {
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
    c.offsets = offsets_or_contiguous<3>(point_shape, {&c.hkl, &c.grad, &c.gg_hkl}, {0, 0, 0});
  }
  return c;
}

}  // namespace tricubic
}  // namespace nanobragg
