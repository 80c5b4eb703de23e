// Host-side tensor plumbing of detector_absorption shared by the CPU and CUDA
// kernels: broadcast inputs become stride-0 views of the full
// [layers, *P(, 3)] shapes (no copies), and gradients of those views are
// summed back to each input's own shape.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "absorption/absorption_math.h"
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

  template <typename T>
  PixelSource<T> source() const {
    return PixelSource<T>{intensity.const_data_ptr<T>(), intensity.stride(0), intensity_layers,
                          coords.const_data_ptr<T>(),    coords.stride(0),    coords_layers,
                          coords.stride(-1)};
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

// odet, thickness and attenuation_length as host doubles, in one transfer
// (one device synchronisation on CUDA), with the value checks of SPEC
// section 2 that need them.
struct HostScalars {
  double odet[3];
  double thickness;
  double attenuation_length;
};

inline HostScalars read_scalars(const char* op, const at::Tensor& odet,
                                const at::Tensor& thickness,
                                const at::Tensor& attenuation_length) {
  const at::Tensor all =
      at::cat({odet.reshape({3}), thickness.reshape({1}), attenuation_length.reshape({1})})
          .to(at::kCPU, at::kDouble)
          .contiguous();
  const double* v = all.const_data_ptr<double>();
  HostScalars s{{v[0], v[1], v[2]}, v[3], v[4]};
  checks::check_absorption_values(op, s.thickness, s.attenuation_length);
  return s;
}

// What every backend kernel starts from: the call checked (with its incoming
// gradient, when grad_output is given), the scalar inputs read, and the
// expanded views built.
struct PreparedCall {
  HostScalars scalars;
  ExpandedInputs in;
  checks::AbsorptionLayout layout;
};

inline PreparedCall prepare_call(const char* op, const at::Tensor* grad_output,
                                 const at::Tensor& intensity, const at::Tensor& pixel_coords,
                                 const at::Tensor& odet, const at::Tensor& thickness,
                                 const at::Tensor& attenuation_length, int64_t thicksteps,
                                 bool per_layer) {
  const auto layout = checks::check_absorption_args(op, intensity, pixel_coords, odet, thickness,
                                                    attenuation_length, thicksteps, per_layer);
  if (grad_output != nullptr) {
    checks::check_absorption_grad_output(op, *grad_output, intensity, layout);
  }
  return {read_scalars(op, odet, thickness, attenuation_length),
          expand_inputs(intensity, pixel_coords, layout, per_layer), layout};
}

template <typename T>
AbsorptionParams<T> make_params(const HostScalars& s, int64_t layers, bool oversample) {
  AbsorptionParams<T> prm;
  for (int d = 0; d < 3; ++d) {
    prm.odet[d] = static_cast<T>(s.odet[d]);
  }
  prm.step = static_cast<T>(s.thickness / (static_cast<double>(layers) * s.attenuation_length));
  prm.layers = layers;
  prm.thick = s.thickness > 0.0;
  prm.oversample = oversample;
  return prm;
}

// (odet, thickness, attenuation_length) gradients as tensors on `opts`' device
// from host values, in one transfer; shape-[0] tensors where mask (of those
// three) is false.
inline std::array<at::Tensor, 3> scalar_tensors(const std::array<double, 5>& values,
                                                const std::array<bool, 3>& mask,
                                                const at::TensorOptions& opts) {
  at::Tensor host = at::empty({5}, at::TensorOptions().dtype(at::kDouble));
  std::copy(values.begin(), values.end(), host.mutable_data_ptr<double>());
  host = host.to(opts);
  return {mask[0] ? host.slice(0, 0, 3).clone() : at::empty({0}, opts),
          mask[1] ? host[3].clone() : at::empty({0}, opts),
          mask[2] ? host[4].clone() : at::empty({0}, opts)};
}

// The gradients of odet, thickness and attenuation_length from the pixel
// sums (dL/ds, dL/dodet): s = thickness / (L * attenuation_length), so
// ds/dT = 1 / (L att) and ds/datt = -T / (L att^2), both 0 for att = inf.
// Gradients not asked for are shape-[0] tensors.
inline std::array<at::Tensor, 3> scalar_grads(const std::array<double, 4>& total,
                                              const HostScalars& s, int64_t layers,
                                              const std::array<bool, 5>& mask,
                                              const at::TensorOptions& opts) {
  const double L = static_cast<double>(layers);
  const double att = s.attenuation_length;
  return scalar_tensors({total[1], total[2], total[3], total[0] / (L * att),
                        -total[0] * s.thickness / (L * att * att)},
                       {mask[2], mask[3], mask[4]}, opts);
}

// The backward's gradient buffers for the expanded inputs, one slot per pixel
// (and layer, when the input has a layer dimension) so that no two pixels
// write the same slot; undefined when not asked for.
struct FullGrads {
  at::Tensor intensity;  // [intensity_layers, *P]
  at::Tensor coords;     // [coords_layers, *P, 3]

  template <typename T>
  T* intensity_ptr() { return intensity.defined() ? intensity.mutable_data_ptr<T>() : nullptr; }
  template <typename T>
  T* coords_ptr() { return coords.defined() ? coords.mutable_data_ptr<T>() : nullptr; }
};

// zeroed=false when the kernel writes every slot (rather than adding to it).
inline FullGrads allocate_full_grads(const ExpandedInputs& in, const std::array<bool, 5>& mask,
                                     const at::TensorOptions& opts, bool zeroed = true) {
  auto make = [&](at::IntArrayRef shape) {
    return zeroed ? at::zeros(shape, opts) : at::empty(shape, opts);
  };
  FullGrads g;
  if (mask[0]) g.intensity = make(in.intensity.sizes());
  if (mask[1]) g.coords = make(in.coords.sizes());
  return g;
}

// The five gradients of the backward op, in schema order, from the filled
// buffers and the pixel sums (dL/ds, dL/dodet).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_backward(
    const ExpandedInputs& in, const FullGrads& full, const std::array<double, 4>& total,
    const HostScalars& scalars, int64_t layers, const std::array<bool, 5>& mask,
    const at::TensorOptions& opts) {
  at::Tensor grad_intensity =
      mask[0] ? in.reduce_to_intensity(full.intensity) : at::empty({0}, opts);
  at::Tensor grad_coords = mask[1] ? in.reduce_to_coords(full.coords) : at::empty({0}, opts);
  auto [grad_odet, grad_thickness, grad_att] = scalar_grads(total, scalars, layers, mask, opts);
  return {grad_intensity, grad_coords, grad_odet, grad_thickness, grad_att};
}

// ---------------------------------------------------------------------------
// Double backward: the backward run on dual numbers whose direction is the
// cotangents of its five outputs (absorption_math.h,
// absorbed_pixel_double_backward).

// The direction: cotangents of grad_intensity / grad_pixel_coords expanded
// like the inputs (zero-stride zeros when absent), and the scalar ones.
struct DualDirection {
  ExpandedInputs tangent;
  double odet[3];
  double thickness;
  double attenuation_length;
};

// `layout` is the inputs' (prepare_call's): the cotangents have their shapes.
inline DualDirection make_direction(
    const char* op, const std::array<std::optional<at::Tensor>, 5>& cotangents,
    const at::Tensor& intensity, const at::Tensor& pixel_coords, const at::Tensor& odet,
    const at::Tensor& thickness, const at::Tensor& attenuation_length,
    const checks::AbsorptionLayout& layout, bool per_layer) {
  const std::array<at::Tensor, 5> inputs = {intensity, pixel_coords, odet, thickness,
                                            attenuation_length};
  checks::check_absorption_cotangents(op, cotangents, inputs);
  std::array<at::Tensor, 5> v;
  for (size_t i = 0; i < 5; ++i) {
    const bool given = cotangents[i].has_value() && cotangents[i]->defined();
    v[i] = given ? *cotangents[i]
                 : at::zeros({}, inputs[i].options()).expand(inputs[i].sizes());
  }
  DualDirection dir;
  dir.tangent = expand_inputs(v[0], v[1], layout, per_layer);
  const at::Tensor host =
      at::cat({v[2].reshape({3}), v[3].reshape({1}), v[4].reshape({1})})
          .to(at::kCPU, at::kDouble)
          .contiguous();
  const double* h = host.const_data_ptr<double>();
  dir.odet[0] = h[0];
  dir.odet[1] = h[1];
  dir.odet[2] = h[2];
  dir.thickness = h[3];
  dir.attenuation_length = h[4];
  return dir;
}

// Parameters on duals. With mu = 1 / att, s = thickness mu / L and
// ds = (dthickness mu + thickness dmu) / L, dmu = -datt mu^2 (0 for att = inf).
template <typename T>
AbsorptionParams<Dual<T>> make_dual_params(const HostScalars& s, const DualDirection& dir,
                                           int64_t layers, bool oversample) {
  const double L = static_cast<double>(layers);
  const double mu = 1.0 / s.attenuation_length;
  const double dmu = -dir.attenuation_length * mu * mu;
  AbsorptionParams<Dual<T>> prm;
  for (int d = 0; d < 3; ++d) {
    prm.odet[d] = Dual<T>(static_cast<T>(s.odet[d]), static_cast<T>(dir.odet[d]));
  }
  prm.step = Dual<T>(static_cast<T>(s.thickness * mu / L),
                     static_cast<T>((dir.thickness * mu + s.thickness * dmu) / L));
  prm.layers = layers;
  prm.thick = s.thickness > 0.0;
  prm.oversample = oversample;
  return prm;
}

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

inline DoubleBackwardCall prepare_double_backward(
    const char* op, const std::array<std::optional<at::Tensor>, 5>& cotangents,
    const at::Tensor& grad_output, const at::Tensor& intensity, const at::Tensor& pixel_coords,
    const at::Tensor& odet, const at::Tensor& thickness, const at::Tensor& attenuation_length,
    int64_t thicksteps, bool per_layer, const std::array<bool, 6>& output_mask) {
  PreparedCall call = prepare_call(op, &grad_output, intensity, pixel_coords, odet, thickness,
                                   attenuation_length, thicksteps, per_layer);
  DualDirection dir = make_direction(op, cotangents, intensity, pixel_coords, odet, thickness,
                                     attenuation_length, call.layout, per_layer);
  const auto opts = intensity.options();
  at::Tensor ggo = output_mask[0] ? at::empty(call.in.pixel_shape, opts) : at::Tensor();
  const std::array<bool, 5> input_mask = {output_mask[1], output_mask[2], output_mask[3],
                                          output_mask[4], output_mask[5]};
  FullGrads full = allocate_full_grads(call.in, input_mask, opts);
  const bool input_grads =
      std::any_of(input_mask.begin(), input_mask.end(), [](bool b) { return b; });
  return {std::move(call), std::move(dir), ggo, full, input_grads};
}

// Pixel sums of the double backward: dL/ds (value, derivative) and the
// derivative of dL/dodet.
using DualTotals = std::array<double, 5>;

// Offsets of each pixel in (intensity, coords, grad_output, tangent
// intensity, tangent coords).
inline PointOffsets<5> dual_pixel_offsets(const ExpandedInputs& in, const ExpandedInputs& tangent,
                                          const at::Tensor& grad_output) {
  const size_t np = in.pixel_shape.size();
  PointOffsets<5> offsets;
  const bool ok = make_point_offsets<5>(
      in.pixel_shape,
      {in.intensity.strides().slice(1, np), in.coords.strides().slice(1, np),
       grad_output.strides(), tangent.intensity.strides().slice(1, np),
       tangent.coords.strides().slice(1, np)},
      offsets);
  TORCH_CHECK(ok, "nanobragg::detector_absorption_double_backward: pixel shape of ", np,
              " dimensions with incompatible strides is not supported; make the inputs "
              "contiguous");
  return offsets;
}

// The six outputs of the double backward, in schema order. The chain rule
// from s to (thickness, att) is differentiated too: with D = dL/ds,
// grad_thickness = D mu / L and grad_att = -D thickness mu^2 / L, so their
// derivatives are (dD mu + D dmu) / L and
// -(dD thickness mu^2 + D dthickness mu^2 + 2 D thickness mu dmu) / L.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
finish_double_backward(const ExpandedInputs& in, at::Tensor grad_grad_output,
                       const FullGrads& full, const DualTotals& total,
                       const HostScalars& s, const DualDirection& dir, int64_t layers,
                       const std::array<bool, 6>& mask, const at::TensorOptions& opts) {
  const double L = static_cast<double>(layers);
  const double mu = 1.0 / s.attenuation_length;
  const double dmu = -dir.attenuation_length * mu * mu;
  const double D = total[0], dD = total[1];
  const double T = s.thickness;
  const double grad_thickness = (dD * mu + D * dmu) / L;
  const double grad_att =
      -(dD * T * mu * mu + D * dir.thickness * mu * mu + 2.0 * D * T * mu * dmu) / L;
  auto [grad_odet, grad_t, grad_a] = scalar_tensors(
      {total[2], total[3], total[4], grad_thickness, grad_att}, {mask[3], mask[4], mask[5]}, opts);
  return {mask[0] ? grad_grad_output : at::empty({0}, opts),
          mask[1] ? in.reduce_to_intensity(full.intensity) : at::empty({0}, opts),
          mask[2] ? in.reduce_to_coords(full.coords) : at::empty({0}, opts),
          grad_odet, grad_t, grad_a};
}

}  // namespace absorption
}  // namespace nanobragg
