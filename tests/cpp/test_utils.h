// Helpers shared by the GoogleTest files: device parametrisation with clean
// skips, error metrics, and reading tensors back as double.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace nanobragg_test {

// Every device-dependent test is instantiated for these; the CUDA instances
// skip, saying why, where CUDA cannot run.
inline std::vector<std::string> test_devices() { return {"cpu", "cuda"}; }

inline std::string device_test_name(
    const ::testing::TestParamInfo<std::string>& param_info) {
  return param_info.param;
}

inline bool op_has_kernel(const char* op, c10::DispatchKey key) {
  auto handle = c10::Dispatcher::singleton().findOp({op, ""});
  return handle.has_value() && handle->hasKernelForDispatchKey(key);
}

// Empty when the device can run the op, else the reason to skip.
inline std::string device_unavailable(const std::string& device,
                                      const char* op) {
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

#define NANOBRAGG_SKIP_UNLESS_DEVICE(device, op)                     \
  do {                                                              \
    const std::string why_ = nanobragg_test::device_unavailable(device, op); \
    if (!why_.empty()) {                                            \
      GTEST_SKIP() << why_;                                         \
    }                                                               \
  } while (0)

inline std::vector<double> to_vector(const at::Tensor& t) {
  at::Tensor c = t.detach().to(at::kCPU, at::kDouble).contiguous();
  const double* p = c.const_data_ptr<double>();
  return std::vector<double>(p, p + c.numel());
}

// max_i |a_i - b_i| / max(|b_i|, floor): a relative error that does not blow
// up where the reference crosses zero.
inline double max_rel_error(const std::vector<double>& a,
                            const std::vector<double>& b, double floor = 1.0) {
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

inline bool bitwise_equal(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) {
    return false;
  }
  at::Tensor ca = a.contiguous(), cb = b.contiguous();
  return std::memcmp(ca.const_data_ptr(), cb.const_data_ptr(),
                     ca.numel() * ca.element_size()) == 0;
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
