// Each operator of the library described once, for the registration code that
// is generic over operators (dispatch.h's handles, autograd.cpp's Nodes and
// forward-mode AD, batching.cpp's vmap rules).
//
// Every operator `op` comes with three dispatcher ops whose argument lists
// follow one convention (ops/schemas.cpp; checked against the schemas when
// a handle is first looked up, dispatch.h):
//
//   op(inputs..., forward_params...) -> Tensor
//   op_backward(grad_output, inputs..., backward_params...,
//               bool[N] output_mask) -> (grad_<input>...)
//   op_double_backward(Tensor? grad_grad_<input>..., grad_output, inputs...,
//                      backward_params..., bool[N+1] output_mask)
//       -> (grad_grad_output, grad_<input>...)
//
// where `inputs` are the op's N differentiable tensor arguments. A new
// operator adds a struct here (its inputs, its other parameters and which
// of them its derivatives take), its schemas, kernels and Meta kernels, and
// one line per concern in autograd.cpp and batching.cpp.
#pragma once

#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <tuple>

namespace nanobragg {
namespace op_traits {

// A list of C++ parameter types, as the dispatcher passes them.
template <typename... T>
struct Params {};

struct TricubicInterp {
  static constexpr const char* kName = "tricubic_interp";
  static constexpr const char* kNodeName = "TricubicInterp";
  static constexpr std::array<const char*, 2> kInputs{"grid", "hkl"};
  using ForwardParams = Params<c10::IntArrayRef, double, c10::string_view>;
  static constexpr std::array<const char*, 3> kForwardParams{"index_min", "default_value",
                                                             "out_of_range"};
  // 0-dim inputs that may be CPU tensors with data elsewhere, read on the host.
  static constexpr std::array<const char*, 0> kHostScalars{};
  // The default value does not change any derivative.
  using BackwardParams = Params<c10::IntArrayRef, c10::string_view>;
  static constexpr std::array<const char*, 2> kBackwardParams{"index_min", "out_of_range"};
  static std::tuple<c10::IntArrayRef, c10::string_view> backward_params(
      c10::IntArrayRef index_min, double /*default_value*/, c10::string_view out_of_range) {
    return {index_min, out_of_range};
  }
};

struct DetectorAbsorption {
  static constexpr const char* kName = "detector_absorption";
  static constexpr const char* kNodeName = "DetectorAbsorption";
  static constexpr std::array<const char*, 5> kInputs{"intensity", "pixel_coords", "odet",
                                                      "thickness", "attenuation_length"};
  using ForwardParams = Params<int64_t, bool, bool>;
  static constexpr std::array<const char*, 3> kForwardParams{"thicksteps", "oversample_thick",
                                                             "per_layer"};
  static constexpr std::array<const char*, 2> kHostScalars{"thickness", "attenuation_length"};
  using BackwardParams = ForwardParams;
  static constexpr std::array<const char*, 3> kBackwardParams = kForwardParams;
  static std::tuple<int64_t, bool, bool> backward_params(int64_t thicksteps, bool oversample_thick,
                                                         bool per_layer) {
    return {thicksteps, oversample_thick, per_layer};
  }
};

// The number of differentiable tensor inputs.
template <typename Op>
constexpr size_t kNumInputs = Op::kInputs.size();

}  // namespace op_traits
}  // namespace nanobragg
