// Helpers shared by the GoogleTest files: device parametrisation with clean
// skips, error metrics, and reading tensors back as double.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace nanobragg_test {

// Every device-dependent test is instantiated for these; the CUDA instances
// skip, saying why, where CUDA cannot run.
inline std::vector<std::string> test_devices() {
  return {"cpu", "cuda"};
}

inline std::string device_test_name(const ::testing::TestParamInfo<std::string>& param_info) {
  return param_info.param;
}

inline bool op_has_kernel(const char* op, c10::DispatchKey key) {
  auto handle = c10::Dispatcher::singleton().findOp({op, ""});
  return handle.has_value() && handle->hasKernelForDispatchKey(key);
}

// Empty when the device can run the op, else the reason to skip.
inline std::string device_unavailable(const std::string& device, const char* op) {
  if (device == "cpu") {
    return "";
  }
  if (!op_has_kernel(op, c10::DispatchKey::CUDA)) {
    return std::string("CUDA kernels of ") + op + " are not built";
  }
  if (!at::hasCUDA()) {
    return "no CUDA GPU on this machine";
  }
  return "";
}

#define NANOBRAGG_SKIP_UNLESS_DEVICE(device, op)                             \
  do {                                                                       \
    const std::string why_ = nanobragg_test::device_unavailable(device, op); \
    if (!why_.empty()) {                                                     \
      GTEST_SKIP() << why_;                                                  \
    }                                                                        \
  } while (0)

inline std::vector<double> to_vector(const at::Tensor& t) {
  at::Tensor c = t.detach().to(at::kCPU, at::kDouble).contiguous();
  const double* p = c.const_data_ptr<double>();
  return std::vector<double>(p, p + c.numel());
}

// max_i |a_i - b_i| / max(|b_i|, floor): a relative error that does not blow
// up where the reference crosses zero.
inline double max_rel_error(const std::vector<double>& a, const std::vector<double>& b,
                            double floor = 1.0) {
  EXPECT_EQ(a.size(), b.size());
  double worst = 0.0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) {
      if (std::isnan(a[i]) != std::isnan(b[i])) {
        return INFINITY;
      }
      continue;
    }
    worst = std::max(worst, std::abs(a[i] - b[i]) / std::max(std::abs(b[i]), floor));
  }
  return worst;
}

// Same shape, dtype and bytes. Both are copied to the CPU first: memcmp
// reads host memory, and a CUDA tensor's data pointer is a device address.
inline bool bitwise_equal(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) {
    return false;
  }
  const at::Tensor ca = a.detach().to(at::kCPU).contiguous();
  const at::Tensor cb = b.detach().to(at::kCPU).contiguous();
  if (ca.numel() == 0) {
    return true;
  }
  return std::memcmp(ca.const_data_ptr(), cb.const_data_ptr(),
                     static_cast<size_t>(ca.numel()) * ca.element_size()) == 0;
}

// Sets at::globalContext()'s deterministic-algorithms flag (which selects
// the CUDA grid gradient's sorted gather instead of its atomicAdd scatter)
// for a scope, and restores it even when the scope throws.
class DeterministicScope {
 public:
  explicit DeterministicScope(bool on)
      : saved_(at::globalContext().deterministicAlgorithms()),
        saved_warn_only_(at::globalContext().deterministicAlgorithmsWarnOnly()) {
    at::globalContext().setDeterministicAlgorithms(on, false);
  }
  ~DeterministicScope() {
    at::globalContext().setDeterministicAlgorithms(saved_, saved_warn_only_);
  }
  DeterministicScope(const DeterministicScope&) = delete;
  DeterministicScope& operator=(const DeterministicScope&) = delete;

 private:
  bool saved_, saved_warn_only_;
};

// Two runs' grid gradients of tricubic_interp: bitwise equal on the CPU and on
// CUDA's deterministic path. CUDA's default path scatters with atomicAdd,
// whose order of addition varies from run to run: there, within `rtol`
// (max_rel_error with floor 1).
inline void expect_same_grid_gradient(const at::Tensor& a, const at::Tensor& b, double rtol,
                                      const std::string& what = "") {
  if (a.is_cuda() && !at::globalContext().deterministicAlgorithms()) {
    EXPECT_EQ(a.sizes(), b.sizes()) << what;
    EXPECT_LE(max_rel_error(to_vector(a), to_vector(b), 1.0), rtol)
        << what << " (CUDA atomic path)";
  } else {
    EXPECT_TRUE(bitwise_equal(a, b)) << what << " (expected bitwise equal)";
  }
}

// Typed dispatcher handles of the backward and double-backward ops, for the
// tests that call them directly (the forward ops are the public API's).
using OptTensor = std::optional<at::Tensor>;
using TricubicBackwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                               const at::Tensor&, c10::IntArrayRef,
                                                               c10::string_view,
                                                               std::array<bool, 2>);
using TricubicDoubleBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const OptTensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    c10::IntArrayRef, c10::string_view, std::array<bool, 3>);
using AbsorptionBackwardSig =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, const at::Tensor&, int64_t, bool, bool, std::array<bool, 5>);
using AbsorptionDoubleBackwardSig =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, const at::Tensor&, int64_t, bool, bool, std::array<bool, 6>);

template <typename Sig>
const c10::TypedOperatorHandle<Sig>& typed_op(const char* name) {
  // One handle per signature type: each signature belongs to one op here.
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
  return op;
}
inline const auto& tricubic_backward_op() {
  return typed_op<TricubicBackwardSig>("nanobragg::tricubic_interp_backward");
}
inline const auto& tricubic_double_backward_op() {
  return typed_op<TricubicDoubleBackwardSig>("nanobragg::tricubic_interp_double_backward");
}
inline const auto& absorption_backward_op() {
  return typed_op<AbsorptionBackwardSig>("nanobragg::detector_absorption_backward");
}
inline const auto& absorption_double_backward_op() {
  return typed_op<AbsorptionDoubleBackwardSig>("nanobragg::detector_absorption_double_backward");
}

// Runs `call`, expects a c10::Error whose message contains every `part`.
inline void expect_error(const std::function<void()>& call, const std::vector<std::string>& parts) {
  try {
    call();
    ADD_FAILURE() << "no error was raised";
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    for (const std::string& part : parts) {
      EXPECT_NE(msg.find(part), std::string::npos) << "message lacks '" << part << "': " << msg;
    }
  }
}

}  // namespace nanobragg_test
