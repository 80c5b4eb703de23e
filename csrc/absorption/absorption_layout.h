// Host-side tensor plumbing of detector_absorption shared by the CPU and CUDA
// kernels: broadcast inputs become stride-0 views of the full
// [layers, *P(, 3)] shapes (no copies), and gradients of those views are
// summed back to each input's own shape.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <vector>

#include "checks.h"
#include "common/point_offsets.h"

namespace nanobragg {
namespace absorption {

struct ExpandedInputs {
  at::Tensor intensity;        // [intensity_layers, *P]
  at::Tensor coords;           // [coords_layers, *P, 3]
  int64_t intensity_layers = 1;
  int64_t coords_layers = 1;
  std::vector<int64_t> pixel_shape;  // P
  int64_t num_pixels = 0;
  // The original inputs with size-1 pixel dims inserted after the layer dim,
  // the shapes their gradients are summed to.
  std::vector<int64_t> intensity_target, coords_target;
  std::vector<int64_t> intensity_shape, coords_shape;  // as given

  // Offsets of each pixel in intensity, coords and a third tensor of shape P
  // (the incoming gradient); intensity and coords offsets are at layer 0.
  PointOffsets<3> pixel_offsets(const at::Tensor& third) const {
    const size_t np = pixel_shape.size();
    PointOffsets<3> offsets;
    const bool ok = make_point_offsets<3>(
        pixel_shape,
        {intensity.strides().slice(1, np), coords.strides().slice(1, np),
         third.strides()},
        offsets);
    // Pixel shapes beyond kMaxPointDims non-mergeable dims are not worth a
    // second code path: the inputs' pixel dims come from torch tensors.
    TORCH_CHECK(ok, "nanobragg::detector_absorption: pixel shape of ", np,
                " dimensions with incompatible strides is not supported; "
                "make the inputs contiguous");
    return offsets;
  }

  at::Tensor reduce_to_intensity(const at::Tensor& grad_full) const {
    return grad_full.sum_to_size(intensity_target).reshape(intensity_shape);
  }
  at::Tensor reduce_to_coords(const at::Tensor& grad_full) const {
    return grad_full.sum_to_size(coords_target).reshape(coords_shape);
  }
};

// `t` with size-1 dims inserted after dim `after` until it has `dims` dims.
inline at::Tensor pad_dims_after(const at::Tensor& t, int64_t after, int64_t dims) {
  at::Tensor out = t;
  while (out.dim() < dims) {
    out = out.unsqueeze(after);
  }
  return out;
}

inline ExpandedInputs expand_inputs(const at::Tensor& intensity,
                                    const at::Tensor& pixel_coords,
                                    const checks::AbsorptionLayout& layout,
                                    bool per_layer) {
  ExpandedInputs in;
  for (const auto& s : layout.pixel_shape) {
    in.pixel_shape.push_back(s.expect_int());
  }
  const int64_t np = static_cast<int64_t>(in.pixel_shape.size());
  in.num_pixels = c10::multiply_integers(in.pixel_shape);
  in.intensity_shape = intensity.sizes().vec();
  in.coords_shape = pixel_coords.sizes().vec();
  // Layer dimension first: given (per_layer) or a size-1 one added.
  at::Tensor I = per_layer ? intensity : intensity.unsqueeze(0);
  at::Tensor C = per_layer ? pixel_coords : pixel_coords.unsqueeze(0);
  I = pad_dims_after(I, 1, 1 + np);
  C = pad_dims_after(C, 1, 2 + np);
  in.intensity_target = I.sizes().vec();
  in.coords_target = C.sizes().vec();
  in.intensity_layers = layout.intensity_per_layer ? layout.layers : 1;
  in.coords_layers = layout.coords_per_layer ? layout.layers : 1;
  std::vector<int64_t> i_shape = {in.intensity_layers};
  i_shape.insert(i_shape.end(), in.pixel_shape.begin(), in.pixel_shape.end());
  std::vector<int64_t> c_shape = {in.coords_layers};
  c_shape.insert(c_shape.end(), in.pixel_shape.begin(), in.pixel_shape.end());
  c_shape.push_back(3);
  in.intensity = I.expand(i_shape);
  in.coords = C.expand(c_shape);
  return in;
}

}  // namespace absorption
}  // namespace nanobragg
