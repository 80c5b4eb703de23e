#include "common/checks.h"

#include "absorption/absorption_scalars.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <sstream>
#include <string>

namespace nanobragg {
namespace checks {

std::string shape_string(c10::SymIntArrayRef shape) {
  std::ostringstream s;
  s << shape;
  return s.str();
}

void check_floating(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": argument '", arg, "' must be a defined tensor");
  const auto dtype = t.scalar_type();
  if (dtype == at::kFloat || dtype == at::kDouble) {
    return;
  }
  // The hint only where it helps: autocast has kernels for the forward ops,
  // not for the backward ones (which autograd calls in the forward's dtype).
  const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
  const bool backward_op = std::string(op).find("_backward") != std::string::npos;
  TORCH_CHECK(false, op, ": argument '", arg, "' must be a float32 or float64 tensor, got ", dtype,
              half && !backward_op ? " (for half precision, call it under torch.autocast, which "
                                     "runs it in float32)"
                                   : "");
}

// The geometry scalars of detector_absorption (odet, thickness,
// attenuation_length) follow PyTorch's scalar rules: any floating dtype;
// their values are read and combined as doubles, the per-pixel math runs in
// intensity's dtype.
void check_floating_scalar(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": argument '", arg, "' must be a defined tensor");
  const auto dtype = t.scalar_type();
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      op, ": argument '", arg,
      "' must be a floating-point tensor (float16, bfloat16, float32 or float64), got ", dtype);
}

void check_same_dtype(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                      const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": argument '", arg,
              "' must have the dtype of '", ref_arg, "' (", ref.scalar_type(), "), got ",
              t.scalar_type());
}

void check_same_device(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": argument '", arg, "' must be on the device of '",
              ref_arg, "' (", ref.device(), "), got ", t.device());
}

tricubic::OutOfRange parse_out_of_range(const char* op, c10::string_view out_of_range) {
  if (out_of_range == "default") {
    return tricubic::OutOfRange::Default;
  }
  if (out_of_range == "nearest") {
    return tricubic::OutOfRange::Nearest;
  }
  TORCH_CHECK(false, op,
              ": argument 'out_of_range' must be \"default\" or \"nearest\", "
              "got \"",
              std::string(out_of_range.data(), out_of_range.size()), "\"");
}

tricubic::OutOfRange check_tricubic_args(const char* op, const at::Tensor& grid,
                                         const at::Tensor& hkl, c10::IntArrayRef index_min,
                                         c10::string_view out_of_range) {
  check_floating(op, "grid", grid);
  check_floating(op, "hkl", hkl);
  TORCH_CHECK(grid.dim() == 3, op, ": argument 'grid' must be 3-D [Nh, Nk, Nl], got shape ",
              shape_string(grid.sym_sizes()));
  TORCH_CHECK(hkl.dim() >= 1 && hkl.sym_size(-1) == 3, op,
              ": argument 'hkl' must have shape [..., 3] (h, k, l last), got "
              "shape ",
              shape_string(hkl.sym_sizes()));
  check_same_dtype(op, "hkl", hkl, "grid", grid);
  check_same_device(op, "hkl", hkl, "grid", grid);
  TORCH_CHECK(index_min.size() == 3, op,
              ": argument 'index_min' must have 3 entries (h_min, k_min, "
              "l_min), got ",
              index_min.size());
  return parse_out_of_range(op, out_of_range);
}

void check_tricubic_grad_output(const char* op, const at::Tensor& grad_output,
                                const at::Tensor& grid, const at::Tensor& hkl) {
  check_floating(op, "grad_output", grad_output);
  check_same_dtype(op, "grad_output", grad_output, "grid", grid);
  check_same_device(op, "grad_output", grad_output, "grid", grid);
  const auto points = hkl.sym_sizes().slice(0, hkl.dim() - 1);
  TORCH_CHECK(grad_output.sym_sizes() == points, op,
              ": argument 'grad_output' must have shape hkl.shape[:-1] = ", shape_string(points),
              ", got ", shape_string(grad_output.sym_sizes()));
}

void check_cotangent(const char* op, const char* arg, const std::optional<at::Tensor>& t,
                     const char* like_arg, const at::Tensor& like) {
  if (!t.has_value() || !t->defined()) {
    return;
  }
  // `like` was checked already (odet, thickness and attenuation_length may
  // be half precision), and the cotangent must have its dtype: that one
  // check says what is accepted, for an integer cotangent too.
  check_same_dtype(op, arg, *t, like_arg, like);
  check_same_device(op, arg, *t, like_arg, like);
  TORCH_CHECK(t->sym_sizes() == like.sym_sizes(), op, ": argument '", arg,
              "' must have the shape of '", like_arg, "' ", shape_string(like.sym_sizes()),
              ", got ", shape_string(t->sym_sizes()));
}

namespace {

// A scalar argument is on intensity's device, or (as PyTorch's own ops allow)
// a 0-dim CPU tensor with data on a GPU, which the host then reads without
// waiting for the GPU.
void check_scalar_device(const char* op, const char* arg, const at::Tensor& t,
                         const at::Tensor& intensity) {
  if (t.device() == intensity.device() || (t.is_cpu() && t.dim() == 0)) {
    return;
  }
  TORCH_CHECK(false, op, ": argument '", arg, "' must be on the device of 'intensity' (",
              intensity.device(), ") or a 0-dim CPU tensor, got ", t.device(), " tensor of shape ",
              shape_string(t.sym_sizes()));
}

// Broadcasts two shapes the way torch does, with a message naming the op.
c10::SymDimVector broadcast_shapes(const char* op, c10::SymIntArrayRef a, const char* a_name,
                                   c10::SymIntArrayRef b, const char* b_name) {
  const size_t n = std::max(a.size(), b.size());
  c10::SymDimVector out(n);
  for (size_t i = 0; i < n; ++i) {
    const bool has_a = i + a.size() >= n, has_b = i + b.size() >= n;
    const c10::SymInt sa = has_a ? a[i + a.size() - n] : c10::SymInt(1);
    const c10::SymInt sb = has_b ? b[i + b.size() - n] : c10::SymInt(1);
    TORCH_CHECK(sa == sb || sa == 1 || sb == 1, op, ": the pixel shapes of ", a_name, " ",
                shape_string(a), " and ", b_name, " ", shape_string(b), " do not broadcast");
    out[i] = sa == 1 ? sb : sa;
  }
  return out;
}

}  // namespace

void check_absorption_lengths(const char* op, double thickness, double attenuation_length) {
  TORCH_CHECK(absorption::thickness_valid(thickness), op,
              ": argument 'thickness' must be finite and >= 0, got ", thickness);
  TORCH_CHECK(absorption::attenuation_length_valid(attenuation_length), op,
              ": argument 'attenuation_length' must be > 0 (inf allowed: no "
              "absorption), got ",
              attenuation_length);
}

namespace {
// A tensor whose one value the host can read: CPU memory, not a meta
// tensor or a FakeTensor standing for a CPU one (its storage is meta).
bool host_readable(const at::Tensor& t) {
  return t.is_cpu() && t.has_storage() && t.storage().device().is_cpu() && t.numel() == 1;
}
}  // namespace

void check_host_absorption_lengths(const char* op, const at::Tensor& thickness,
                                   const at::Tensor& attenuation_length) {
  const double ok_thickness = 0.0, ok_attenuation_length = 1.0;  // (not held on the host)
  check_absorption_lengths(op, host_readable(thickness) ? thickness.item<double>() : ok_thickness,
                           host_readable(attenuation_length) ? attenuation_length.item<double>()
                                                             : ok_attenuation_length);
}

AbsorptionLayout check_absorption_args(const char* op, const at::Tensor& intensity,
                                       const at::Tensor& pixel_coords, const at::Tensor& odet,
                                       const at::Tensor& thickness,
                                       const at::Tensor& attenuation_length, int64_t thicksteps,
                                       bool per_layer) {
  check_floating(op, "intensity", intensity);
  check_floating(op, "pixel_coords", pixel_coords);
  // odet, thickness and attenuation_length: any floating dtype (PyTorch's
  // scalar rules; read as doubles, each gradient in its own dtype).
  check_floating_scalar(op, "odet", odet);
  check_floating_scalar(op, "thickness", thickness);
  check_floating_scalar(op, "attenuation_length", attenuation_length);
  check_same_dtype(op, "pixel_coords", pixel_coords, "intensity", intensity);
  check_same_device(op, "pixel_coords", pixel_coords, "intensity", intensity);
  check_same_device(op, "odet", odet, "intensity", intensity);
  check_scalar_device(op, "thickness", thickness, intensity);
  check_scalar_device(op, "attenuation_length", attenuation_length, intensity);
  TORCH_CHECK(thicksteps >= 1, op, ": argument 'thicksteps' must be at least 1, got ", thicksteps);
  TORCH_CHECK(odet.dim() == 1 && odet.sym_size(0) == 3, op,
              ": argument 'odet' must have shape [3], got ", shape_string(odet.sym_sizes()));
  TORCH_CHECK(thickness.dim() == 0, op, ": argument 'thickness' must be a 0-dim tensor, got shape ",
              shape_string(thickness.sym_sizes()));
  TORCH_CHECK(attenuation_length.dim() == 0, op,
              ": argument 'attenuation_length' must be a 0-dim tensor, got "
              "shape ",
              shape_string(attenuation_length.sym_sizes()));
  const int64_t min_coords_dim = per_layer ? 2 : 1;
  TORCH_CHECK(pixel_coords.dim() >= min_coords_dim && pixel_coords.sym_size(-1) == 3, op,
              ": argument 'pixel_coords' must have shape ",
              per_layer ? "[L or 1, ..., 3]" : "[..., 3]", " (x, y, z last), got ",
              shape_string(pixel_coords.sym_sizes()));
  AbsorptionLayout layout;
  layout.layers = thicksteps;
  c10::SymIntArrayRef intensity_pixels = intensity.sym_sizes();
  c10::SymIntArrayRef coords_pixels = pixel_coords.sym_sizes().slice(0, pixel_coords.dim() - 1);
  if (per_layer) {
    TORCH_CHECK(intensity.dim() >= 1, op,
                ": argument 'intensity' must have a leading layer dimension "
                "(of size L or 1) when per_layer=True, got a 0-dim tensor");
    const c10::SymInt li = intensity.sym_size(0), lp = pixel_coords.sym_size(0);
    TORCH_CHECK(li == thicksteps || li == 1, op,
                ": argument 'intensity' has a layer dimension (dim 0) of size ", li,
                "; with per_layer=True it must be thicksteps = ", thicksteps, " or 1");
    TORCH_CHECK(lp == thicksteps || lp == 1, op,
                ": argument 'pixel_coords' has a layer dimension (dim 0) of "
                "size ",
                lp, "; with per_layer=True it must be thicksteps = ", thicksteps, " or 1");
    layout.intensity_per_layer = li != 1;
    layout.coords_per_layer = lp != 1;
    intensity_pixels = intensity_pixels.slice(1);
    coords_pixels = coords_pixels.slice(1);
  }
  layout.pixel_shape =
      broadcast_shapes(op, intensity_pixels, "'intensity'", coords_pixels, "'pixel_coords'");
  return layout;
}

void check_absorption_grad_output(const char* op, const at::Tensor& grad_output,
                                  const at::Tensor& intensity, const AbsorptionLayout& layout) {
  check_floating(op, "grad_output", grad_output);
  check_same_dtype(op, "grad_output", grad_output, "intensity", intensity);
  check_same_device(op, "grad_output", grad_output, "intensity", intensity);
  TORCH_CHECK(grad_output.sym_sizes() == c10::SymIntArrayRef(layout.pixel_shape), op,
              ": argument 'grad_output' must have the output's shape ",
              shape_string(layout.pixel_shape), ", got ", shape_string(grad_output.sym_sizes()));
}

void check_absorption_cotangents(const char* op,
                                 const std::array<std::optional<at::Tensor>, 5>& cotangents,
                                 const std::array<at::Tensor, 5>& inputs) {
  static const char* const names[5] = {"grad_grad_intensity", "grad_grad_pixel_coords",
                                       "grad_grad_odet", "grad_grad_thickness",
                                       "grad_grad_attenuation_length"};
  static const char* const input_names[5] = {"intensity", "pixel_coords", "odet", "thickness",
                                             "attenuation_length"};
  for (int i = 0; i < 5; ++i) {
    check_cotangent(op, names[i], cotangents[i], input_names[i], inputs[i]);
  }
}

}  // namespace checks
}  // namespace nanobragg
