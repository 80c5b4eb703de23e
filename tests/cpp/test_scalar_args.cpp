// How the absorption kernels read a scalar argument held in device memory
// (absorption_scalars.h, ScalarArg): one branch per floating dtype, run on
// the host here through host memory, so that a dtype read as another shows
// on any machine, not only on a GPU (tests/python/test_cuda.py compares
// GPU-held scalars of every dtype with the CPU's).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <gtest/gtest.h>

#include "absorption/absorption_scalars.h"

namespace nanobragg_test {
namespace {

using nanobragg::absorption::ScalarArg;
using nanobragg::absorption::ScalarArgs;
using nanobragg::absorption::ScalarDtype;

TEST(AbsorptionScalarMath, ScalarArgReadsEachDtypeItPointsAt) {
  // 450e-6 rounds differently in each dtype, so reading one as another is
  // seen; the expected values are the C++ conversions of each type.
  const double value = 450e-6;
  const double as_double = value;
  const float as_float = static_cast<float>(value);
  const c10::Half as_half(static_cast<float>(value));
  const c10::BFloat16 as_bfloat16(static_cast<float>(value));
  const double want_half = static_cast<double>(static_cast<float>(as_half));
  const double want_bfloat16 = static_cast<double>(static_cast<float>(as_bfloat16));
  ASSERT_NE(want_half, want_bfloat16);
  ASSERT_NE(want_half, static_cast<double>(as_float));
  ASSERT_NE(static_cast<double>(as_float), as_double);

  EXPECT_EQ((ScalarArg{&as_double, ScalarDtype::Float64, 0.0}.get()), as_double);
  EXPECT_EQ((ScalarArg{&as_float, ScalarDtype::Float32, 0.0}.get()), static_cast<double>(as_float));
  EXPECT_EQ((ScalarArg{&as_half, ScalarDtype::Float16, 0.0}.get()), want_half);
  EXPECT_EQ((ScalarArg{&as_bfloat16, ScalarDtype::BFloat16, 0.0}.get()), want_bfloat16);
  // No address: the value read on the host.
  EXPECT_EQ((ScalarArg{nullptr, ScalarDtype::Float16, 0.25}.get()), 0.25);
}

TEST(AbsorptionScalarMath, ScalarArgsGiveOdetThicknessAndAttenuationInOrder) {
  const float odet[3] = {0.5f, -0.25f, 1.0f};
  const double thickness = 450e-6;
  ScalarArgs args;
  for (int i = 0; i < 3; ++i) args.arg[i] = ScalarArg{&odet[i], ScalarDtype::Float32, 0.0};
  args.arg[3] = ScalarArg{&thickness, ScalarDtype::Float64, 0.0};
  args.arg[4] = ScalarArg{nullptr, ScalarDtype::Float32, 234e-6};
  const auto s = args.get();
  EXPECT_EQ(s.odet[0], 0.5);
  EXPECT_EQ(s.odet[1], -0.25);
  EXPECT_EQ(s.odet[2], 1.0);
  EXPECT_EQ(s.thickness, thickness);
  EXPECT_EQ(s.attenuation_length, 234e-6);
}

}  // namespace
}  // namespace nanobragg_test
