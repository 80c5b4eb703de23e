// The host plumbing of absorption_layout.h, compiled once with the
// baseline flags (not into each CPU-capability build of the kernels, where
// an inline copy compiled for AVX-512 could end up shared with the others).
#include "absorption/absorption_layout.h"

#include "common/operand_offsets.h"

#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <array>

namespace nanobragg {
namespace absorption {

PointOffsets<3> ExpandedInputs::pixel_offsets(at::Tensor& third) {
  return offsets_or_contiguous<3>(pixel_shape, {&intensity, &coords, &third}, {1, 1, 0});
}

at::Tensor ExpandedInputs::reduce_to_intensity(const at::Tensor& grad_full) const {
  return grad_full.sum_to_size(intensity_target).reshape(intensity_shape);
}

at::Tensor ExpandedInputs::reduce_to_coords(const at::Tensor& grad_full) const {
  return grad_full.sum_to_size(coords_target).reshape(coords_shape);
}

at::Tensor pad_dims_after(const at::Tensor& t, int64_t after, int64_t dims) {
  at::Tensor out = t;
  while (out.dim() < dims) {
    out = out.unsqueeze(after);
  }
  return out;
}

ExpandedInputs expand_inputs(const at::Tensor& intensity, const at::Tensor& pixel_coords,
                             const checks::AbsorptionLayout& layout, bool per_layer) {
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

ScalarValues read_host_scalars(const char* op, const at::Tensor& odet, const at::Tensor& thickness,
                               const at::Tensor& attenuation_length) {
  const at::Tensor all =
      at::cat({odet.reshape({3}).to(at::kDouble), thickness.reshape({1}).to(at::kDouble),
               attenuation_length.reshape({1}).to(at::kDouble)})
          .contiguous();
  const double* v = all.const_data_ptr<double>();
  ScalarValues s{{v[0], v[1], v[2]}, v[3], v[4]};
  checks::check_absorption_lengths(op, s.thickness, s.attenuation_length);
  return s;
}

ScalarDtype scalar_dtype(at::ScalarType t) {
  switch (t) {
    case at::kDouble:
      return ScalarDtype::Float64;
    case at::kFloat:
      return ScalarDtype::Float32;
    case at::kHalf:
      return ScalarDtype::Float16;
    case at::kBFloat16:
      return ScalarDtype::BFloat16;
    default:
      TORCH_INTERNAL_ASSERT(false, "nanobragg: scalar argument of dtype ", t, " passed the checks");
  }
  return ScalarDtype::Float32;  // not reached
}

void device_scalar_args(const at::Tensor& t, int count, ScalarArg* out) {
  if (t.is_cpu()) {
    const at::Tensor v = t.reshape({count}).to(at::kDouble).contiguous();
    for (int i = 0; i < count; ++i) {
      out[i].host = v.const_data_ptr<double>()[i];
    }
    return;
  }
  const auto* base = static_cast<const char*>(t.const_data_ptr());
  const int64_t stride = count == 1 ? 0 : t.stride(0);
  for (int i = 0; i < count; ++i) {
    out[i].device = base + i * stride * static_cast<int64_t>(t.element_size());
    out[i].dtype = scalar_dtype(t.scalar_type());
  }
}

ScalarArgs device_scalars(const char* op, const at::Tensor& odet, const at::Tensor& thickness,
                          const at::Tensor& attenuation_length) {
  ScalarArgs a;
  device_scalar_args(odet, 3, a.arg);
  device_scalar_args(thickness, 1, a.arg + 3);
  device_scalar_args(attenuation_length, 1, a.arg + 4);
  // What was read on the host is checked now; what stays on the GPU is
  // checked there (params_from: NaN results).
  checks::check_absorption_lengths(op, thickness.is_cpu() ? a.arg[3].host : 0.0,
                                   attenuation_length.is_cpu() ? a.arg[4].host : 1.0);
  return a;
}

PreparedCall prepare_call(const char* op, const at::Tensor* grad_output,
                          const at::Tensor& intensity, const at::Tensor& pixel_coords,
                          const at::Tensor& odet, const at::Tensor& thickness,
                          const at::Tensor& attenuation_length, int64_t thicksteps,
                          bool per_layer) {
  const auto layout = checks::check_absorption_args(op, intensity, pixel_coords, odet, thickness,
                                                    attenuation_length, thicksteps, per_layer);
  if (grad_output != nullptr) {
    checks::check_absorption_grad_output(op, *grad_output, intensity, layout);
  }
  return {expand_inputs(intensity, pixel_coords, layout, per_layer), layout};
}

std::array<at::Tensor, 3> scalar_grad_tensors(const at::Tensor& values,
                                              const std::array<bool, 3>& mask,
                                              const at::Tensor& odet, const at::Tensor& thickness,
                                              const at::Tensor& attenuation_length) {
  auto grad = [&](bool wanted, int64_t begin, int64_t end, const at::Tensor& like) {
    if (!wanted) {
      return at::empty({0}, like.options());
    }
    return values.slice(0, begin, end)
        .reshape(like.sizes())
        .to(like.options(), /*non_blocking=*/false, /*copy=*/true);
  };
  return {grad(mask[0], 0, 3, odet), grad(mask[1], 3, 4, thickness),
          grad(mask[2], 4, 5, attenuation_length)};
}

std::array<at::Tensor, 3> scalar_grad_tensors(const double (&values)[5],
                                              const std::array<bool, 3>& mask,
                                              const at::Tensor& odet, const at::Tensor& thickness,
                                              const at::Tensor& attenuation_length) {
  at::Tensor host = at::empty({5}, at::TensorOptions().dtype(at::kDouble));
  std::copy(values, values + 5, host.mutable_data_ptr<double>());
  return scalar_grad_tensors(host, mask, odet, thickness, attenuation_length);
}

FullGrads allocate_full_grads(const ExpandedInputs& in, const std::array<bool, 5>& mask,
                              const at::TensorOptions& opts, bool zeroed) {
  auto make = [&](at::IntArrayRef shape) {
    return zeroed ? at::zeros(shape, opts) : at::empty(shape, opts);
  };
  FullGrads g;
  if (mask[0]) g.intensity = make(in.intensity.sizes());
  if (mask[1]) g.coords = make(in.coords.sizes());
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_backward(
    const ExpandedInputs& in, const FullGrads& full, std::array<at::Tensor, 3> scalar_grads,
    const std::array<bool, 5>& mask, const at::TensorOptions& opts) {
  at::Tensor grad_intensity =
      mask[0] ? in.reduce_to_intensity(full.intensity) : at::empty({0}, opts);
  at::Tensor grad_coords = mask[1] ? in.reduce_to_coords(full.coords) : at::empty({0}, opts);
  return {grad_intensity, grad_coords, scalar_grads[0], scalar_grads[1], scalar_grads[2]};
}

DualDirection make_direction(const char* op,
                             const std::array<std::optional<at::Tensor>, 5>& cotangents,
                             const at::Tensor& intensity, const at::Tensor& pixel_coords,
                             const at::Tensor& odet, const at::Tensor& thickness,
                             const at::Tensor& attenuation_length,
                             const checks::AbsorptionLayout& layout, bool per_layer) {
  const std::array<at::Tensor, 5> inputs = {intensity, pixel_coords, odet, thickness,
                                            attenuation_length};
  checks::check_absorption_cotangents(op, cotangents, inputs);
  std::array<at::Tensor, 5> v;
  for (size_t i = 0; i < 5; ++i) {
    if (cotangents[i].has_value() && cotangents[i]->defined()) {
      v[i] = *cotangents[i];
    }
  }
  auto zeros_like_expanded = [](const at::Tensor& t) {
    return at::zeros({}, t.options()).expand(t.sizes());
  };
  DualDirection dir;
  dir.tangent =
      expand_inputs(v[0].defined() ? v[0] : zeros_like_expanded(intensity),
                    v[1].defined() ? v[1] : zeros_like_expanded(pixel_coords), layout, per_layer);
  dir.odet = v[2];
  dir.thickness = v[3];
  dir.attenuation_length = v[4];
  return dir;
}

ScalarValues read_host_direction(const DualDirection& dir) {
  auto read = [](const at::Tensor& t, int count, double* out) {
    if (!t.defined()) {
      std::fill(out, out + count, 0.0);
      return;
    }
    const at::Tensor v = t.reshape({count}).to(at::kDouble).contiguous();
    std::copy(v.const_data_ptr<double>(), v.const_data_ptr<double>() + count, out);
  };
  ScalarValues s;
  read(dir.odet, 3, s.odet);
  read(dir.thickness, 1, &s.thickness);
  read(dir.attenuation_length, 1, &s.attenuation_length);
  return s;
}

ScalarArgs device_direction(const DualDirection& dir) {
  ScalarArgs a;
  if (dir.odet.defined()) device_scalar_args(dir.odet, 3, a.arg);
  if (dir.thickness.defined()) device_scalar_args(dir.thickness, 1, a.arg + 3);
  if (dir.attenuation_length.defined()) device_scalar_args(dir.attenuation_length, 1, a.arg + 4);
  return a;
}

DoubleBackwardCall prepare_double_backward(
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

PointOffsets<5> dual_pixel_offsets(ExpandedInputs& in, ExpandedInputs& tangent,
                                   at::Tensor& grad_output) {
  return offsets_or_contiguous<5>(
      in.pixel_shape,
      {&in.intensity, &in.coords, &grad_output, &tangent.intensity, &tangent.coords},
      {1, 1, 0, 1, 1});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
finish_double_backward(const ExpandedInputs& in, at::Tensor grad_grad_output, const FullGrads& full,
                       std::array<at::Tensor, 3> scalar_grads, const std::array<bool, 6>& mask,
                       const at::TensorOptions& opts) {
  return {mask[0] ? grad_grad_output : at::empty({0}, opts),
          mask[1] ? in.reduce_to_intensity(full.intensity) : at::empty({0}, opts),
          mask[2] ? in.reduce_to_coords(full.coords) : at::empty({0}, opts),
          scalar_grads[0],
          scalar_grads[1],
          scalar_grads[2]};
}

}  // namespace absorption
}  // namespace nanobragg
