// Typed dispatcher handles of the library's operators, for code inside the
// library that calls one op from another (the Autograd kernels, the public
// C++ API). Calling through the dispatcher, never a backend function
// directly, keeps autograd, device dispatch and tracing in the loop.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <tuple>

namespace nanobragg {
namespace dispatch {

using TricubicInterpSig = at::Tensor(const at::Tensor&, const at::Tensor&,
                                     c10::IntArrayRef, double,
                                     c10::string_view);
using TricubicInterpBackwardSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
    c10::string_view, std::array<bool, 2>);

inline const c10::TypedOperatorHandle<TricubicInterpSig>& tricubic_interp() {
  static const auto handle =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("nanobragg::tricubic_interp", "")
          .typed<TricubicInterpSig>();
  return handle;
}

inline const c10::TypedOperatorHandle<TricubicInterpBackwardSig>&
tricubic_interp_backward() {
  static const auto handle =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("nanobragg::tricubic_interp_backward", "")
          .typed<TricubicInterpBackwardSig>();
  return handle;
}

using TricubicInterpDoubleBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, c10::IntArrayRef, c10::string_view,
    std::array<bool, 3>);

inline const c10::TypedOperatorHandle<TricubicInterpDoubleBackwardSig>&
tricubic_interp_double_backward() {
  static const auto handle =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("nanobragg::tricubic_interp_double_backward", "")
          .typed<TricubicInterpDoubleBackwardSig>();
  return handle;
}

using DetectorAbsorptionSig = at::Tensor(const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, int64_t, bool, bool);
using DetectorAbsorptionBackwardSig =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool,
        bool, std::array<bool, 5>);

inline const c10::TypedOperatorHandle<DetectorAbsorptionSig>&
detector_absorption() {
  static const auto handle =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("nanobragg::detector_absorption", "")
          .typed<DetectorAbsorptionSig>();
  return handle;
}

inline const c10::TypedOperatorHandle<DetectorAbsorptionBackwardSig>&
detector_absorption_backward() {
  static const auto handle =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("nanobragg::detector_absorption_backward", "")
          .typed<DetectorAbsorptionBackwardSig>();
  return handle;
}

using DetectorAbsorptionDoubleBackwardSig =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
        const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
        const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
        bool, bool, std::array<bool, 6>);

inline const c10::TypedOperatorHandle<DetectorAbsorptionDoubleBackwardSig>&
detector_absorption_double_backward() {
  static const auto handle =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("nanobragg::detector_absorption_double_backward", "")
          .typed<DetectorAbsorptionDoubleBackwardSig>();
  return handle;
}

}  // namespace dispatch
}  // namespace nanobragg
