// nanobragg_ops: the public C++ API. Plain functions that call the operators
// through the PyTorch dispatcher, so autograd, device dispatch (CPU, CUDA)
// and tracing all apply, exactly as for torch.ops.nanobragg.* in Python.
// The contract of each operator is shared/SPEC.md.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

namespace nanobragg_ops {

// Tricubic (4-point Lagrange) interpolation of a structure-factor grid, as
// nanoBragg's polin3.
//   grid:      [Nh, Nk, Nl] float32/float64; grid[i, j, k] is the value at the
//              Miller index (h_min + i, k_min + j, l_min + k).
//   hkl:       [..., 3] fractional Miller indices, grid's dtype and device.
//   index_min: (h_min, k_min, l_min).
//   default_value: returned where the 4x4x4 stencil leaves the grid.
//   out_of_range: "default" (default_value) or "nearest" (the grid value at
//              the nearest node, ceil(x - 0.5) per axis, or default_value if
//              that node is outside the grid too). Decided per point.
// Returns hkl.shape[:-1], grid's dtype. Differentiable in grid and hkl.
at::Tensor tricubic_interp(const at::Tensor& grid, const at::Tensor& hkl,
                           at::IntArrayRef index_min,
                           double default_value = 0.0,
                           c10::string_view out_of_range = "default");

}  // namespace nanobragg_ops
