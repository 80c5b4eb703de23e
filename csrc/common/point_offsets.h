// Element offsets of several tensors that share one "point" shape but have
// their own strides (a [..., 3] coordinate tensor viewed without its last
// dimension, an incoming gradient that may be expanded with stride 0, ...).
// Dimensions that are contiguous with respect to each other in every operand
// are merged first, so the usual case is one dimension and no division.
// Usable from host and device code.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/ArrayRef.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>

namespace nanobragg {

constexpr int kMaxPointDims = 10;

template <int NumOperands>
struct PointOffsets {
  int ndim = 0;                       // after merging
  int64_t sizes[kMaxPointDims] = {};  // innermost first
  int64_t strides[NumOperands][kMaxPointDims] = {};

  // The offset of operand `op` alone.
  C10_HOST_DEVICE C10_ALWAYS_INLINE int64_t get_one(int64_t index, int op) const {
    if (ndim == 1) {
      return index * strides[op][0];
    }
    int64_t offset = 0;
    for (int d = 0; d < ndim; ++d) {
      const int64_t i = (d + 1 == ndim) ? index : index % sizes[d];
      index /= sizes[d];
      offset += i * strides[op][d];
    }
    return offset;
  }

  // Offsets (in elements) of point `index` (row-major over the point shape).
  C10_HOST_DEVICE C10_ALWAYS_INLINE void get(int64_t index, int64_t (&offsets)[NumOperands]) const {
    for (int op = 0; op < NumOperands; ++op) {
      offsets[op] = 0;
    }
    if (ndim == 1) {
      for (int op = 0; op < NumOperands; ++op) {
        offsets[op] = index * strides[op][0];
      }
      return;
    }
    for (int d = 0; d < ndim; ++d) {
      const int64_t i = (d + 1 == ndim) ? index : index % sizes[d];
      index /= sizes[d];
      for (int op = 0; op < NumOperands; ++op) {
        offsets[op] += i * strides[op][d];
      }
    }
  }
};

// Builds the offsets for `shape` and one stride list per operand (each as long
// as `shape`). Returns false when more than kMaxPointDims dimensions remain
// after merging; the caller then makes its operands contiguous.
template <int NumOperands>
inline bool make_point_offsets(c10::IntArrayRef shape,
                               const std::array<c10::IntArrayRef, NumOperands>& operand_strides,
                               PointOffsets<NumOperands>& out) {
  out = PointOffsets<NumOperands>();
  // No points: one empty dimension, whatever the strides (a copy would not
  // change them: an empty tensor counts as contiguous).
  if (std::find(shape.begin(), shape.end(), int64_t(0)) != shape.end()) {
    out.ndim = 1;
    return true;
  }
  for (int64_t d = static_cast<int64_t>(shape.size()) - 1; d >= 0; --d) {
    const int64_t size = shape[d];
    if (size == 1) {
      continue;  // contributes nothing to any offset
    }
    if (out.ndim > 0) {
      const int inner = out.ndim - 1;
      bool mergeable = true;
      for (int op = 0; op < NumOperands; ++op) {
        mergeable =
            mergeable && operand_strides[op][d] == out.strides[op][inner] * out.sizes[inner];
      }
      if (mergeable) {
        out.sizes[inner] *= size;
        continue;
      }
    }
    if (out.ndim == kMaxPointDims) {
      return false;
    }
    out.sizes[out.ndim] = size;
    for (int op = 0; op < NumOperands; ++op) {
      out.strides[op][out.ndim] = operand_strides[op][d];
    }
    ++out.ndim;
  }
  if (out.ndim == 0) {  // zero or one point: a single unit dimension
    out.ndim = 1;
    out.sizes[0] = 1;
  }
  return true;
}

}  // namespace nanobragg
