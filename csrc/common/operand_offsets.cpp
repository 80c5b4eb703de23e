#include "common/operand_offsets.h"

#include <c10/util/Exception.h>

namespace nanobragg {

template <int N>
PointOffsets<N> offsets_or_contiguous(c10::IntArrayRef point_shape,
                                      const std::array<at::Tensor*, N>& operands,
                                      const std::array<int64_t, N>& first_point_dim) {
  const auto np = point_shape.size();
  std::array<c10::IntArrayRef, N> strides;
  const auto gather = [&] {
    for (int i = 0; i < N; ++i) {
      strides[i] = operands[i]->strides().slice(first_point_dim[i], np);
    }
  };
  gather();
  PointOffsets<N> offsets;
  if (!make_point_offsets<N>(point_shape, strides, offsets)) {
    for (at::Tensor* t : operands) *t = t->contiguous();
    gather();
    TORCH_INTERNAL_ASSERT(make_point_offsets<N>(point_shape, strides, offsets),
                          "contiguous operands have point offsets");
  }
  return offsets;
}

#define NANOBRAGG_OFFSETS_OR_CONTIGUOUS(N)           \
  template PointOffsets<N> offsets_or_contiguous<N>( \
      c10::IntArrayRef, const std::array<at::Tensor*, N>&, const std::array<int64_t, N>&);
NANOBRAGG_OFFSETS_OR_CONTIGUOUS(1)
NANOBRAGG_OFFSETS_OR_CONTIGUOUS(2)
NANOBRAGG_OFFSETS_OR_CONTIGUOUS(3)
NANOBRAGG_OFFSETS_OR_CONTIGUOUS(5)
#undef NANOBRAGG_OFFSETS_OR_CONTIGUOUS

}  // namespace nanobragg
