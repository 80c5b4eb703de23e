// Host-side tensor plumbing of tricubic_interp shared by the CPU and CUDA
// kernels: the grid as a GridView, and per-point offsets of hkl and the
// incoming gradient for any strides. Defined in tricubic_layout.cpp,
// compiled once (not into each CPU-capability build of the kernels, where
// an inline copy compiled for AVX-512 could end up shared with the others).
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
#include "common/operand_offsets.h"
#include "tricubic/tricubic_math.h"

namespace nanobragg {
namespace tricubic {

// The grid (or a grid-shaped cotangent) as a GridView, for T = float, double.
template <typename T>
GridView<T> make_grid_view(const at::Tensor& grid, c10::IntArrayRef index_min);

// A grid-shaped cotangent as a GridView; data is null when it is absent.
template <typename T>
GridView<T> make_cotangent_view(const at::Tensor& gg_grid, c10::IntArrayRef index_min);

GridShape make_grid_shape(c10::IntArrayRef grid_sizes, c10::IntArrayRef index_min);

// hkl.shape[:-1].
c10::IntArrayRef point_shape_of(const at::Tensor& hkl);

// The backward's outputs: a zeroed grid gradient (the kernels add into it)
// and an hkl gradient (written whole), or shape-[0] tensors for gradients
// not asked for (see ops/schemas.cpp).
std::tuple<at::Tensor, at::Tensor> allocate_backward_outputs(
    const at::Tensor& grid, const at::Tensor& hkl, const std::array<bool, 2>& output_mask);

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

DoubleBackwardCall prepare_double_backward(const char* op,
                                           const std::optional<at::Tensor>& grad_grad_grid,
                                           const std::optional<at::Tensor>& grad_grad_hkl,
                                           const at::Tensor& grad_output, const at::Tensor& grid,
                                           const at::Tensor& hkl, c10::IntArrayRef index_min,
                                           c10::string_view out_of_range,
                                           const std::array<bool, 3>& output_mask);

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
