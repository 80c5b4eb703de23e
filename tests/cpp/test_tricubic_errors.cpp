// Bad arguments: each a c10::Error naming the operator and the argument.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <functional>

#include "nanobragg_ops/ops.h"
#include "test_utils.h"

namespace nanobragg_test {
namespace {

const std::array<int64_t, 3> kIndexMin = {0, 0, 0};

// Every case runs on each device: the CUDA kernels validate through the same
// checks as the CPU ones.
class TricubicErrors : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override { NANOBRAGG_SKIP_UNLESS_DEVICE(GetParam(), "nanobragg::tricubic_interp"); }
  at::Tensor grid() const { return at::rand({6, 6, 6}, at::kDouble).to(GetParam()); }
  at::Tensor points() const { return (at::rand({4, 3}, at::kDouble) + 2).to(GetParam()); }
  at::Tensor on_device(const at::Tensor& t) const { return t.to(GetParam()); }
};

TEST_P(TricubicErrors, GridMustBe3D) {
  for (auto shape :
       {std::vector<int64_t>{6, 6}, std::vector<int64_t>{2, 6, 6, 6}, std::vector<int64_t>{}}) {
    expect_error(
        [&] {
          nanobragg_ops::tricubic_interp(on_device(at::rand(shape, at::kDouble)), points(),
                                         kIndexMin);
        },
        {"nanobragg::tricubic_interp", "'grid'", "3-D"});
  }
}

TEST_P(TricubicErrors, HklLastDimensionMustBe3) {
  expect_error(
      [&] {
        nanobragg_ops::tricubic_interp(grid(), on_device(at::rand({4, 2}, at::kDouble)), kIndexMin);
      },
      {"nanobragg::tricubic_interp", "'hkl'", "[4, 2]"});
  expect_error(
      [&] {
        nanobragg_ops::tricubic_interp(grid(), on_device(at::rand({3, 4}, at::kDouble)), kIndexMin);
      },
      {"'hkl'", "[..., 3]"});
  expect_error(
      [&] {
        nanobragg_ops::tricubic_interp(grid(), on_device(at::scalar_tensor(1.0, at::kDouble)),
                                       kIndexMin);
      },
      {"'hkl'", "[..., 3]"});
}

TEST_P(TricubicErrors, IntegerAndComplexDtypes) {
  expect_error([&] { nanobragg_ops::tricubic_interp(grid().to(at::kInt), points(), kIndexMin); },
               {"nanobragg::tricubic_interp", "'grid'", "float32 or float64", "Int"});
  expect_error([&] { nanobragg_ops::tricubic_interp(grid(), points().to(at::kLong), kIndexMin); },
               {"'hkl'", "float32 or float64", "Long"});
  expect_error(
      [&] { nanobragg_ops::tricubic_interp(grid().to(at::kComplexDouble), points(), kIndexMin); },
      {"'grid'", "float32 or float64"});
}

// From C++ an argument can be an undefined tensor.
TEST_P(TricubicErrors, UndefinedTensors) {
  expect_error([&] { nanobragg_ops::tricubic_interp(at::Tensor(), points(), kIndexMin); },
               {"nanobragg::tricubic_interp", "'grid'", "defined tensor"});
  expect_error([&] { nanobragg_ops::tricubic_interp(grid(), at::Tensor(), kIndexMin); },
               {"nanobragg::tricubic_interp", "'hkl'", "defined tensor"});
}

TEST_P(TricubicErrors, MismatchedDtypes) {
  expect_error([&] { nanobragg_ops::tricubic_interp(grid(), points().to(at::kFloat), kIndexMin); },
               {"nanobragg::tricubic_interp", "'hkl'", "dtype of 'grid'", "Double", "Float"});
}

TEST_P(TricubicErrors, MismatchedDevices) {
  // A meta tensor stands in for a second device on a machine without a GPU.
  expect_error([&] { nanobragg_ops::tricubic_interp(grid(), points().to(at::kMeta), kIndexMin); },
               {"nanobragg::tricubic_interp", "'hkl'", "device of 'grid'"});
  expect_error([&] { nanobragg_ops::tricubic_interp(grid().to(at::kMeta), points(), kIndexMin); },
               {"nanobragg::tricubic_interp", "'hkl'", "device of 'grid'"});
}

TEST_P(TricubicErrors, UnknownOutOfRangeMode) {
  expect_error(
      [&] { nanobragg_ops::tricubic_interp(grid(), points(), kIndexMin, 0.0, "clamp"); },
      {"nanobragg::tricubic_interp", "'out_of_range'", "\"default\" or \"nearest\"", "clamp"});
}

TEST_P(TricubicErrors, IndexMinNeedsThreeEntries) {
  expect_error(
      [&] {
        nanobragg_ops::tricubic_interp(grid(), points(), std::vector<int64_t>{0, 0});
      },
      {"nanobragg::tricubic_interp", "'index_min'", "3 entries"});
}

TEST_P(TricubicErrors, BackwardChecksItsGradient) {
  using Sig =
      std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         c10::IntArrayRef, c10::string_view, std::array<bool, 2>);
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("nanobragg::tricubic_interp_backward", "")
                      .typed<Sig>();
  expect_error(
      [&] {
        op.call(on_device(at::rand({5}, at::kDouble)), grid(), points(), kIndexMin, "default",
                {true, true});
      },
      {"nanobragg::tricubic_interp_backward", "'grad_output'", "[4]", "[5]"});
  expect_error(
      [&] {
        op.call(on_device(at::rand({4}, at::kFloat)), grid(), points(), kIndexMin, "default",
                {true, true});
      },
      {"nanobragg::tricubic_interp_backward", "'grad_output'", "dtype"});
  expect_error(
      [&] {
        op.call(on_device(at::rand({4}, at::kDouble)), grid(), points(), kIndexMin, "nope",
                {true, true});
      },
      {"nanobragg::tricubic_interp_backward", "'out_of_range'"});
}

TEST_P(TricubicErrors, MetaKernelChecksLikeTheCpuKernel) {
  expect_error(
      [&] {
        nanobragg_ops::tricubic_interp(grid().to(at::kMeta),
                                       on_device(at::rand({4, 2}, at::kDouble)).to(at::kMeta),
                                       kIndexMin);
      },
      {"nanobragg::tricubic_interp", "'hkl'", "[4, 2]"});
  at::Tensor out = nanobragg_ops::tricubic_interp(
      grid().to(at::kMeta), at::rand({2, 5, 3}, at::kFloat).to(at::kMeta).to(at::kDouble),
      kIndexMin);
  EXPECT_EQ(out.sizes(), at::IntArrayRef({2, 5}));
  EXPECT_TRUE(out.is_meta());
}

INSTANTIATE_TEST_SUITE_P(Devices, TricubicErrors, ::testing::ValuesIn(test_devices()),
                         device_test_name);

}  // namespace
}  // namespace nanobragg_test

namespace nanobragg_test {
namespace {

// Every op of the library: each operator, its backward, its double backward.
constexpr const char* kAllOps[] = {"nanobragg::tricubic_interp",
                                   "nanobragg::tricubic_interp_backward",
                                   "nanobragg::tricubic_interp_double_backward",
                                   "nanobragg::detector_absorption",
                                   "nanobragg::detector_absorption_backward",
                                   "nanobragg::detector_absorption_double_backward"};

// The CUDA kernels are compiled whenever the build has nvcc and a CUDA torch
// (as CI does), even where no GPU can run them; they must reach the
// dispatcher then.
TEST(Registration, CudaKernelsAreRegisteredWhenBuilt) {
#ifdef NANOBRAGG_WITH_CUDA
  for (const char* op : kAllOps) {
    EXPECT_TRUE(op_has_kernel(op, c10::DispatchKey::CUDA)) << op;
  }
#else
  GTEST_SKIP() << "a CPU-only build: no CUDA kernels to register";
#endif
}

TEST(Registration, EveryOpHasCpuMetaAndAutogradKernels) {
  for (const char* op : kAllOps) {
    for (auto key : {c10::DispatchKey::CPU, c10::DispatchKey::Meta, c10::DispatchKey::Autograd}) {
      EXPECT_TRUE(op_has_kernel(op, key)) << op << " " << key;
    }
  }
}

}  // namespace
}  // namespace nanobragg_test
