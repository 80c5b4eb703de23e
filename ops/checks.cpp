#include "checks.h"

#include <c10/util/Exception.h>

#include <sstream>

namespace nanobragg {
namespace checks {

std::string shape_string(c10::SymIntArrayRef shape) {
  std::ostringstream s;
  s << shape;
  return s.str();
}

void check_floating(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": argument '", arg,
              "' must be a defined tensor");
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": argument '",
              arg, "' must be a float32 or float64 tensor, got ", dtype);
}

void check_same_dtype(const char* op, const char* arg, const at::Tensor& t,
                      const char* ref_arg, const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": argument '", arg,
              "' must have the dtype of '", ref_arg, "' (", ref.scalar_type(),
              "), got ", t.scalar_type());
}

void check_same_device(const char* op, const char* arg, const at::Tensor& t,
                       const char* ref_arg, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": argument '", arg,
              "' must be on the device of '", ref_arg, "' (", ref.device(),
              "), got ", t.device());
}

tricubic::OutOfRange parse_out_of_range(const char* op,
                                        c10::string_view out_of_range) {
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
                                         const at::Tensor& hkl,
                                         c10::IntArrayRef index_min,
                                         c10::string_view out_of_range) {
  check_floating(op, "grid", grid);
  check_floating(op, "hkl", hkl);
  TORCH_CHECK(grid.dim() == 3, op,
              ": argument 'grid' must be 3-D [Nh, Nk, Nl], got shape ",
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
              ": argument 'grad_output' must have shape hkl.shape[:-1] = ",
              shape_string(points), ", got ", shape_string(grad_output.sym_sizes()));
}

}  // namespace checks
}  // namespace nanobragg
