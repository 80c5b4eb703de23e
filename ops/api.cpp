// The public C++ API (csrc/include/nanobragg_ops/ops.h): dispatcher calls.
#include "nanobragg_ops/ops.h"

#include "dispatch.h"

namespace nanobragg_ops {

at::Tensor tricubic_interp(const at::Tensor& grid, const at::Tensor& hkl,
                           at::IntArrayRef index_min, double default_value,
                           c10::string_view out_of_range) {
  return nanobragg::dispatch::tricubic_interp().call(
      grid, hkl, index_min, default_value, out_of_range);
}

}  // namespace nanobragg_ops
