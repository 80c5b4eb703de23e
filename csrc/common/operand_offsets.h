// The host side of point_offsets.h: the PointOffsets of an op's per-point
// operands, or of contiguous copies of them where their strides leave more
// dims than PointOffsets holds. Defined in operand_offsets.cpp, compiled once
// with the baseline flags (not into each CPU-capability build of the kernels,
// where an inline copy compiled for AVX-512 could end up shared with the
// others).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <array>
#include <cstdint>

#include "common/point_offsets.h"

namespace nanobragg {

// PointOffsets of `operands` over `point_shape`, operand i's point dims being
// its dims first_point_dim[i] .. first_point_dim[i] + point_shape.size() - 1;
// or, where more than kMaxPointDims dims remain after merging, of contiguous
// copies, which then replace the operands (their point dims merge into one).
// Broadcast operands of that many dims are copied out in full, a cost only
// such rare layouts pay. For N = 1, 2, 3 and 5.
template <int N>
PointOffsets<N> offsets_or_contiguous(c10::IntArrayRef point_shape,
                                      const std::array<at::Tensor*, N>& operands,
                                      const std::array<int64_t, N>& first_point_dim);

}  // namespace nanobragg
