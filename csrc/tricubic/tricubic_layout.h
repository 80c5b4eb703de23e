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
#include <tuple>
#include <type_traits>

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
