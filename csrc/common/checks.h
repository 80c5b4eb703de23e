// Argument validation shared by every backend (CPU, CUDA, Meta), so that a bad
// call fails the same way, with one message style, wherever it is dispatched:
//   "nanobragg::<op>: argument '<name>' <what was expected>, got <what came>".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/core/SymIntArrayRef.h>
#include <c10/util/string_view.h>
#include <ATen/core/DimVector.h>

#include <array>
#include <optional>
#include <string>

#include "tricubic/tricubic_math.h"

namespace nanobragg {
namespace checks {

// "[2, 3]" style, for messages. Symbolic so that the Meta kernels can check
// shapes under torch.compile's dynamic shapes too.
std::string shape_string(c10::SymIntArrayRef shape);

// float32 or float64 (the dtypes with kernels).
void check_floating(const char* op, const char* arg, const at::Tensor& t);
// float16, bfloat16, float32 or float64: the geometry scalars of
// detector_absorption, read as doubles whatever their dtype.
void check_floating_scalar(const char* op, const char* arg, const at::Tensor& t);
void check_same_dtype(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                      const at::Tensor& ref);
void check_same_device(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                       const at::Tensor& ref);

tricubic::OutOfRange parse_out_of_range(const char* op, c10::string_view out_of_range);

// Everything docs/CONTRACT.md §1 asks of the forward's arguments.
tricubic::OutOfRange check_tricubic_args(const char* op, const at::Tensor& grid,
                                         const at::Tensor& hkl, c10::IntArrayRef index_min,
                                         c10::string_view out_of_range);

// The incoming gradient of the backward: shape hkl.shape[:-1], grid's dtype
// and device.
void check_tricubic_grad_output(const char* op, const at::Tensor& grad_output,
                                const at::Tensor& grid, const at::Tensor& hkl);

// A cotangent given to a double backward (the incoming gradient of one of the
// backward's outputs): when present, the shape, dtype and device of `like`.
void check_cotangent(const char* op, const char* arg, const std::optional<at::Tensor>& t,
                     const char* like_arg, const at::Tensor& like);

// How detector_absorption's inputs line up (docs/CONTRACT.md §2).
struct AbsorptionLayout {
  int64_t layers = 1;             // L = thicksteps
  c10::SymDimVector pixel_shape;  // P, the output shape
  // A leading layer dimension of size L (per layer) rather than 1 (shared);
  // always false when per_layer=false.
  bool intensity_per_layer = false;
  bool coords_per_layer = false;
};

// Every check of docs/CONTRACT.md §2 that needs no tensor data (dtypes, devices,
// shapes, broadcasting, thicksteps); the values of thickness and
// attenuation_length are checked where they are read
// (absorption/absorption_layout.cpp, check_absorption_lengths below).
AbsorptionLayout check_absorption_args(const char* op, const at::Tensor& intensity,
                                       const at::Tensor& pixel_coords, const at::Tensor& odet,
                                       const at::Tensor& thickness,
                                       const at::Tensor& attenuation_length, int64_t thicksteps,
                                       bool per_layer);

// The values of thickness and attenuation_length against the predicates the
// kernels apply on the device (absorption_scalars.h), so that both sides
// accept the same lengths.
void check_absorption_lengths(const char* op, double thickness, double attenuation_length);

// The same for the lengths held in host memory (CPU tensors with data; not
// meta or fake ones), read without touching any device: the Meta kernels
// use it, so that a shape-only call (an empty vmap batch, meta data) rejects
// what the backends would.
void check_host_absorption_lengths(const char* op, const at::Tensor& thickness,
                                   const at::Tensor& attenuation_length);

void check_absorption_grad_output(const char* op, const at::Tensor& grad_output,
                                  const at::Tensor& intensity, const AbsorptionLayout& layout);

// The five cotangents of detector_absorption_double_backward against the
// inputs whose gradients they belong to (intensity, pixel_coords, odet,
// thickness, attenuation_length).
void check_absorption_cotangents(const char* op,
                                 const std::array<std::optional<at::Tensor>, 5>& cotangents,
                                 const std::array<at::Tensor, 5>& inputs);

}  // namespace checks
}  // namespace nanobragg
