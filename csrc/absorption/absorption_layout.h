// Host-side tensor plumbing of detector_absorption shared by the CPU and CUDA
// kernels: broadcast inputs become stride-0 views of the full
// [layers, *P(, 3)] shapes (no copies), and gradients of those views are
// summed back to each input's own shape. Defined in absorption_layout.cpp,
// compiled once.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "absorption/absorption_math.h"
#include "absorption/absorption_scalars.h"
#include "common/point_offsets.h"

namespace nanobragg {
namespace absorption {

struct ExpandedInputs {
  at::Tensor intensity;  // [intensity_layers, *P]
  at::Tensor coords;     // [coords_layers, *P, 3]
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
  // Where the three layouts leave more dims than PointOffsets holds, all
  // three are first replaced by contiguous copies (any strides work).
  PointOffsets<3> pixel_offsets(at::Tensor& third);

  template <typename T>
  PixelSource<T> source() const {
    return PixelSource<T>{intensity.const_data_ptr<T>(),
                          intensity.stride(0),
                          intensity_layers,
                          coords.const_data_ptr<T>(),
                          coords.stride(0),
                          coords_layers,
                          coords.stride(-1)};
  }

  // A gradient of the expanded view summed back to the input's own shape.
  at::Tensor reduce_to_intensity(const at::Tensor& grad_full) const;
  at::Tensor reduce_to_coords(const at::Tensor& grad_full) const;
};

// `t` with size-1 dims inserted after dim `after` until it has `dims` dims.
at::Tensor pad_dims_after(const at::Tensor& t, int64_t after, int64_t dims);

ExpandedInputs expand_inputs(const at::Tensor& intensity, const at::Tensor& pixel_coords,
                             const checks::AbsorptionLayout& layout, bool per_layer);

// ---------------------------------------------------------------------------
// The scalar inputs (absorption_scalars.h for the math).

// odet, thickness and attenuation_length as host doubles, with the value
// checks of the contract. The CPU kernels' way: their scalars are CPU
// tensors, so this reads host memory and never waits for a device.
ScalarValues read_host_scalars(const char* op, const at::Tensor& odet, const at::Tensor& thickness,
                               const at::Tensor& attenuation_length);

// The dtype tag of a scalar argument read on the device.
ScalarDtype scalar_dtype(at::ScalarType t);

// The CUDA kernels' way: a scalar on the GPU is passed by address and read
// by the kernel (no copy to the host, no wait; CUDA graphs replay whatever
// it holds then); a 0-dim CPU tensor is read here and checked here. `t`
// holds `count` elements (odet: 3), each becoming one ScalarArg.
void device_scalar_args(const at::Tensor& t, int count, ScalarArg* out);

ScalarArgs device_scalars(const char* op, const at::Tensor& odet, const at::Tensor& thickness,
                          const at::Tensor& attenuation_length);

// What every backend kernel starts from: the call checked (with its incoming
// gradient, when grad_output is given) and the expanded views built. The
// scalars are read by each backend its own way (above).
struct PreparedCall {
  ExpandedInputs in;
  checks::AbsorptionLayout layout;
};

PreparedCall prepare_call(const char* op, const at::Tensor* grad_output,
                          const at::Tensor& intensity, const at::Tensor& pixel_coords,
                          const at::Tensor& odet, const at::Tensor& thickness,
                          const at::Tensor& attenuation_length, int64_t thicksteps, bool per_layer);

// The gradients of odet, thickness and attenuation_length from `values`
// (float64 [5]: odet x, y, z, thickness, att, on the device that computed
// them), each in its argument's dtype, shape and device (a CPU scalar of a
// CUDA call gets its gradient copied back: the one host wait the contract
// allows); shape-[0] tensors where mask is false.
std::array<at::Tensor, 3> scalar_grad_tensors(const at::Tensor& values,
                                              const std::array<bool, 3>& mask,
                                              const at::Tensor& odet, const at::Tensor& thickness,
                                              const at::Tensor& attenuation_length);

// The same from host values (CPU kernels).
std::array<at::Tensor, 3> scalar_grad_tensors(const double (&values)[5],
                                              const std::array<bool, 3>& mask,
                                              const at::Tensor& odet, const at::Tensor& thickness,
                                              const at::Tensor& attenuation_length);

// The backward's gradient buffers for the expanded inputs, one slot per pixel
// (and layer, when the input has a layer dimension) so that no two pixels
// write the same slot; undefined when not asked for.
struct FullGrads {
  at::Tensor intensity;  // [intensity_layers, *P]
  at::Tensor coords;     // [coords_layers, *P, 3]

  template <typename T>
  T* intensity_ptr() {
    return intensity.defined() ? intensity.mutable_data_ptr<T>() : nullptr;
  }
  template <typename T>
  T* coords_ptr() {
    return coords.defined() ? coords.mutable_data_ptr<T>() : nullptr;
  }
};

// zeroed=false when the kernel writes every slot (rather than adding to it).
FullGrads allocate_full_grads(const ExpandedInputs& in, const std::array<bool, 5>& mask,
                              const at::TensorOptions& opts, bool zeroed = true);

// The five gradients of the backward op, in schema order, from the filled
// buffers and the scalar gradients.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_backward(
    const ExpandedInputs& in, const FullGrads& full, std::array<at::Tensor, 3> scalar_grads,
    const std::array<bool, 5>& mask, const at::TensorOptions& opts);

// ---------------------------------------------------------------------------
// Double backward: the backward run on dual numbers whose direction is the
// cotangents of its five outputs (absorption_math.h,
// absorbed_pixel_double_backward).

// The direction: cotangents of grad_intensity / grad_pixel_coords expanded
// like the inputs (zero-stride zeros when absent), and the scalar ones
// (undefined when absent: a zero direction).
struct DualDirection {
  ExpandedInputs tangent;
  at::Tensor odet, thickness, attenuation_length;
};

// `layout` is the inputs' (prepare_call's): the cotangents have their shapes.
DualDirection make_direction(const char* op,
                             const std::array<std::optional<at::Tensor>, 5>& cotangents,
                             const at::Tensor& intensity, const at::Tensor& pixel_coords,
                             const at::Tensor& odet, const at::Tensor& thickness,
                             const at::Tensor& attenuation_length,
                             const checks::AbsorptionLayout& layout, bool per_layer);

// The scalar direction as host doubles (CPU kernels); absent ones are 0.
ScalarValues read_host_direction(const DualDirection& dir);

// ... and as kernel arguments (CUDA kernels); absent ones are host zeros.
ScalarArgs device_direction(const DualDirection& dir);

// What the CPU and CUDA double-backward kernels start from: the checked
// call, the direction, and the output buffers (grad_grad_output undefined
// when not asked for; the input-gradient slots zeroed).
struct DoubleBackwardCall {
  PreparedCall call;
  DualDirection dir;
  at::Tensor grad_grad_output;
  FullGrads full;
  bool input_grads;  // any of the five input gradients asked for
};

DoubleBackwardCall prepare_double_backward(
    const char* op, const std::array<std::optional<at::Tensor>, 5>& cotangents,
    const at::Tensor& grad_output, const at::Tensor& intensity, const at::Tensor& pixel_coords,
    const at::Tensor& odet, const at::Tensor& thickness, const at::Tensor& attenuation_length,
    int64_t thicksteps, bool per_layer, const std::array<bool, 6>& output_mask);

// Offsets of each pixel in (intensity, coords, grad_output, tangent
// intensity, tangent coords); contiguous copies replace all five where their
// layouts leave more dims than PointOffsets holds, as pixel_offsets does.
PointOffsets<5> dual_pixel_offsets(ExpandedInputs& in, ExpandedInputs& tangent,
                                   at::Tensor& grad_output);

// The six outputs of the double backward, in schema order.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
finish_double_backward(const ExpandedInputs& in, at::Tensor grad_grad_output, const FullGrads& full,
                       std::array<at::Tensor, 3> scalar_grads, const std::array<bool, 6>& mask,
                       const at::TensorOptions& opts);

}  // namespace absorption
}  // namespace nanobragg
