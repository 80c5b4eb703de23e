// detector_absorption's bad arguments (docs/CONTRACT.md §2): each a c10::Error
// naming the operator and the argument.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/autograd.h>

#include <array>
#include <functional>
#include <tuple>
#include <limits>

#include "nanobragg_ops/ops.h"
#include "test_utils.h"

namespace nanobragg_test {
namespace {

// Every message names the operator, and then the parts each case lists.
void expect_error(const std::function<void()>& call, std::initializer_list<const char*> parts) {
  std::vector<std::string> all = {"nanobragg::detector_absorption"};
  all.insert(all.end(), parts.begin(), parts.end());
  nanobragg_test::expect_error(call, all);
}

struct Args {
  // Built on the CPU, moved to the device under test by call().
  at::Tensor I = at::rand({3, 4}, at::kDouble);
  at::Tensor P = at::rand({3, 4, 3}, at::kDouble) + at::tensor({0.0, 0.0, 1.0}, at::kDouble);
  at::Tensor o = at::tensor({0.0, 0.0, 1.0}, at::kDouble);
  at::Tensor T = at::scalar_tensor(3e-4, at::kDouble);
  at::Tensor A = at::scalar_tensor(2e-4, at::kDouble);
  int64_t L = 3;
  bool oversample = true;
  bool per_layer = false;
  std::string device = "cpu";
  // false: T and A stay 0-dim CPU tensors (allowed with data on any device).
  bool scalars_on_device = true;
  at::Tensor call() const {
    auto on = [&](const at::Tensor& t) { return t.is_meta() ? t : t.to(device); };
    const at::Tensor T_ = scalars_on_device ? on(T) : T;
    const at::Tensor A_ = scalars_on_device ? on(A) : A;
    return nanobragg_ops::detector_absorption(on(I), on(P), on(o), T_, A_, L, oversample,
                                              per_layer);
  }
};

// Every case runs on each device, through the same host-side checks of
// shapes, dtypes and devices. The values of thickness and attenuation_length
// are checked on the host only when they are there: held on a GPU they give
// an all-NaN result instead (CONTRACT §3; tests/python/test_cuda.py).
class AbsorptionErrors : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    NANOBRAGG_SKIP_UNLESS_DEVICE(GetParam(), "nanobragg::detector_absorption");
  }
  Args args() const {
    Args a;
    a.device = GetParam();
    return a;
  }
};

TEST_P(AbsorptionErrors, Thicksteps) {
  for (int64_t L : {0, -2}) {
    Args a = args();
    a.L = L;
    expect_error([&] { a.call(); }, {"'thicksteps'", "at least 1"});
  }
}

// Values outside the contract's ranges (thickness finite and >= 0,
// attenuation length > 0), for every form the lengths can take.
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr std::array<double, 3> kBadThicknesses = {-1e-4, kNaN, kInf};
constexpr std::array<double, 3> kBadAttenuationLengths = {0.0, -2.0, kNaN};

// The scalars as 0-dim CPU tensors, the form whose value is checked with
// data on either device (so the CUDA kernels' host side raises too).
TEST_P(AbsorptionErrors, ThicknessAndAttenuationValues) {
  Args a = args();
  a.scalars_on_device = false;
  for (double thickness : kBadThicknesses) {
    a.T = at::scalar_tensor(thickness, at::kDouble);
    expect_error([&] { a.call(); }, {"'thickness'", "must be finite and >= 0"});
  }
  Args b = args();
  b.scalars_on_device = false;
  for (double att : kBadAttenuationLengths) {
    b.A = at::scalar_tensor(att, at::kDouble);
    expect_error([&] { b.call(); }, {"'attenuation_length'", "> 0"});
  }
}

TEST_P(AbsorptionErrors, LayerDimension) {
  Args a = args();
  a.per_layer = true;
  a.I = at::rand({2, 3, 4}, at::kDouble);  // neither L = 3 nor 1
  a.P = a.P.unsqueeze(0);
  expect_error([&] { a.call(); }, {"'intensity'", "layer dimension", "thicksteps = 3"});
  Args b = args();
  b.per_layer = true;
  b.I = b.I.unsqueeze(0);
  b.P = at::rand({5, 3, 4, 3}, at::kDouble);
  expect_error([&] { b.call(); }, {"'pixel_coords'", "layer dimension"});
  Args c = args();
  c.per_layer = true;
  c.I = at::scalar_tensor(1.0, at::kDouble);
  c.P = c.P.unsqueeze(0);
  expect_error([&] { c.call(); }, {"'intensity'", "leading layer dimension"});
}

TEST_P(AbsorptionErrors, ShapesThatDoNotBroadcast) {
  Args a = args();
  a.I = at::rand({3, 5}, at::kDouble);
  expect_error([&] { a.call(); }, {"do not broadcast", "[3, 5]", "[3, 4]"});
}

TEST_P(AbsorptionErrors, ShapesOfOdetThicknessAttenuationAndCoords) {
  Args a = args();
  a.o = at::tensor({0.0, 1.0}, at::kDouble);
  expect_error([&] { a.call(); }, {"'odet'", "[3]"});
  Args b = args();
  b.T = at::full({1}, 3e-4, at::kDouble);
  expect_error([&] { b.call(); }, {"'thickness'", "0-dim"});
  Args c = args();
  c.A = at::full({1}, 2e-4, at::kDouble);
  expect_error([&] { c.call(); }, {"'attenuation_length'", "0-dim"});
  Args d = args();
  d.P = at::rand({3, 4, 2}, at::kDouble);
  expect_error([&] { d.call(); }, {"'pixel_coords'", "[..., 3]"});
}

TEST_P(AbsorptionErrors, DtypesAndDevices) {
  Args a = args();
  a.I = a.I.to(at::kInt);
  expect_error([&] { a.call(); }, {"'intensity'", "float32 or float64"});
  Args b = args();
  b.P = b.P.to(at::kFloat);
  expect_error([&] { b.call(); }, {"'pixel_coords'", "dtype of 'intensity'"});
  Args c = args();
  c.T = c.T.to(at::kLong);  // any floating dtype is fine (PyTorch's scalar rules), not an integer
  expect_error([&] { c.call(); }, {"'thickness'", "floating-point tensor", "Long"});
  Args d = args();
  d.o = d.o.to(at::kMeta);
  expect_error([&] { d.call(); }, {"'odet'", "device of 'intensity'"});
}

// Not errors (PyTorch's scalar rules): odet, thickness and attenuation_length
// of any floating dtype, read as doubles; a 0-dim CPU thickness
// with data on another device.
TEST_P(AbsorptionErrors, ScalarsOfAnyFloatingDtypeAreAccepted) {
  const Args base = args();  // copies share its random intensity and pixels
  const at::Tensor want = base.call();
  for (const auto dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    Args a = base;
    a.o = a.o.to(dtype);
    a.T = a.T.to(dtype);
    a.A = a.A.to(dtype);
    const at::Tensor got = a.call();
    EXPECT_EQ(got.scalar_type(), at::kDouble);
    // The scalars' values rounded to `dtype`, then computed in float64.
    Args b = base;
    b.o = a.o.to(at::kDouble);
    b.T = a.T.to(at::kDouble);
    b.A = a.A.to(at::kDouble);
    EXPECT_TRUE(at::allclose(got.cpu(), b.call().cpu(), 1e-14, 0.0)) << dtype;
    EXPECT_TRUE(at::allclose(got.cpu(), want.cpu(), 1e-2, 0.0)) << dtype;
  }
  Args c = base;
  c.T = c.T.to(at::kFloat);
  const at::Tensor thickness_on_cpu =
      nanobragg_ops::detector_absorption(c.I.to(c.device), c.P.to(c.device), c.o.to(c.device), c.T,
                                         c.A.to(c.device), c.L, c.oversample, c.per_layer);
  EXPECT_EQ(thickness_on_cpu.device(), c.I.to(c.device).device());
  EXPECT_TRUE(at::allclose(thickness_on_cpu.cpu(), want.cpu(), 1e-6, 0.0));
}

// Another device than intensity's, for pixel_coords and the scalars: a meta
// tensor stands for one on a machine with a single device (a 0-dim CPU
// scalar with data on CUDA is allowed, so it is no error case). With a meta
// argument the dispatcher picks the Meta kernel, which runs the same
// argument checks (common/checks.cpp) as the CPU and CUDA kernels.
TEST_P(AbsorptionErrors, OtherDevices) {
  Args a = args();
  a.P = a.P.to(at::kMeta);
  expect_error([&] { a.call(); }, {"'pixel_coords'", "device of 'intensity'", "meta"});
  Args b = args();
  b.T = b.T.to(at::kMeta);
  expect_error([&] { b.call(); },
               {"'thickness'", "device of 'intensity'", "or a 0-dim CPU tensor", "meta"});
  Args c = args();
  c.A = c.A.to(at::kMeta);
  expect_error([&] { c.call(); }, {"'attenuation_length'", "or a 0-dim CPU tensor", "meta"});
}

// From C++ an argument can be an undefined tensor.
TEST_P(AbsorptionErrors, UndefinedTensors) {
  const Args a = args();
  auto on = [&](const at::Tensor& t) { return t.to(a.device); };
  expect_error(
      [&] {
        nanobragg_ops::detector_absorption(at::Tensor(), on(a.P), on(a.o), on(a.T), on(a.A), a.L,
                                           a.oversample, a.per_layer);
      },
      {"nanobragg::detector_absorption", "'intensity'", "defined tensor"});
  expect_error(
      [&] {
        nanobragg_ops::detector_absorption(on(a.I), on(a.P), on(a.o), at::Tensor(), on(a.A), a.L,
                                           a.oversample, a.per_layer);
      },
      {"nanobragg::detector_absorption", "'thickness'", "defined tensor"});
}

TEST_P(AbsorptionErrors, PerLayerPixelCoordsNeedALayerDimension) {
  Args a = args();
  a.per_layer = true;
  a.I = a.I.unsqueeze(0);
  a.P = at::tensor({0.0, 0.0, 1.0}, at::kDouble);  // one pixel, no layer dimension
  expect_error([&] { a.call(); }, {"'pixel_coords'", "[L or 1, ..., 3]", "[3]"});
}

TEST_P(AbsorptionErrors, BackwardChecksItsGradient) {
  using Sig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, int64_t, bool, bool, std::array<bool, 5>);
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("nanobragg::detector_absorption_backward", "")
                      .typed<Sig>();
  const Args a = args();
  auto on = [&](const at::Tensor& t) { return t.to(a.device); };
  auto backward = [&](const at::Tensor& grad) {
    op.call(on(grad), on(a.I), on(a.P), on(a.o), on(a.T), on(a.A), a.L, a.oversample, a.per_layer,
            {true, true, true, true, true});
  };
  expect_error(
      [&] {
        backward(at::rand({3, 5}, at::kDouble));
      },
      {"nanobragg::detector_absorption_backward", "'grad_output'", "[3, 4]", "[3, 5]"});
  expect_error(
      [&] {
        backward(at::rand({3, 4}, at::kFloat));
      },
      {"nanobragg::detector_absorption_backward", "'grad_output'", "dtype of 'intensity'"});
  expect_error(
      [&] {
        backward(at::ones({3, 4}, at::kInt));
      },
      {"nanobragg::detector_absorption_backward", "'grad_output'", "float32 or float64"});
}

// The overload that takes thickness and attenuation_length as numbers: the
// result of 0-dim float64 tensors with those values, bitwise (on the data's
// device, and as CPU tensors), gradients included; the numbers are not
// rounded to intensity's dtype (with float32 data, 1e-50 is no float32).
TEST_P(AbsorptionErrors, NumbersAreTakenAsFloat64Values) {
  const Args base = args();
  auto on = [&](const at::Tensor& t) { return t.to(base.device); };
  struct Lengths {
    double thickness, attenuation;
  };
  for (const auto dtype : {at::kDouble, at::kFloat}) {
    for (const Lengths lengths : {Lengths{3e-4, 2e-4}, Lengths{3e-51, 1e-50}}) {
      SCOPED_TRACE(::testing::Message() << dtype << " thickness " << lengths.thickness);
      // (copies: base's tensors stay leaves without gradients)
      const at::Tensor I = on(base.I.to(dtype)).clone().requires_grad_(true);
      const at::Tensor P = on(base.P.to(dtype)).clone().requires_grad_(true);
      const at::Tensor o = on(base.o);
      const at::Tensor from_numbers = nanobragg_ops::detector_absorption(
          I, P, o, lengths.thickness, lengths.attenuation, base.L, base.oversample, base.per_layer);
      const auto grads_of_numbers = torch::autograd::grad({from_numbers.sum()}, {I, P});
      ASSERT_EQ(from_numbers.device(), I.device());
      for (bool scalars_on_device : {true, false}) {
        at::Tensor T = at::scalar_tensor(lengths.thickness, at::kDouble);
        at::Tensor A = at::scalar_tensor(lengths.attenuation, at::kDouble);
        if (scalars_on_device) {
          T = on(T);
          A = on(A);
        }
        const at::Tensor from_tensors = nanobragg_ops::detector_absorption(
            I, P, o, T, A, base.L, base.oversample, base.per_layer);
        const auto grads_of_tensors = torch::autograd::grad({from_tensors.sum()}, {I, P});
        EXPECT_TRUE(bitwise_equal(from_numbers, from_tensors))
            << "scalars on device " << scalars_on_device;
        EXPECT_TRUE(bitwise_equal(grads_of_numbers[0], grads_of_tensors[0]));
        EXPECT_TRUE(bitwise_equal(grads_of_numbers[1], grads_of_tensors[1]));
      }
      // Finite, and not the intensity itself (what a thickness lost to 0
      // gives): lengths rounded to float32 (0 and 0) raise on the CPU and give
      // NaN on a GPU.
      EXPECT_TRUE(at::isfinite(from_numbers.detach()).all().item<bool>());
      EXPECT_FALSE(at::allclose(from_numbers.detach(), I.detach(), 0.01, 0.0));
    }
  }
}

// Which types the number overload takes (checked when this file compiles).
static_assert(nanobragg_ops::detail::is_length_number_v<double> &&
              nanobragg_ops::detail::is_length_number_v<float> &&
              nanobragg_ops::detail::is_length_number_v<const int64_t> &&
              nanobragg_ops::detail::is_length_number_v<long double>);
static_assert(!nanobragg_ops::detail::is_length_number_v<bool> &&
              !nanobragg_ops::detail::is_length_number_v<const volatile bool> &&
              !nanobragg_ops::detail::is_length_number_v<char> &&
              !nanobragg_ops::detail::is_length_number_v<at::Tensor>);
static_assert(nanobragg_ops::detail::is_length_v<at::Tensor> &&
              nanobragg_ops::detail::is_length_v<const at::Tensor> &&
              !nanobragg_ops::detail::is_length_v<c10::Scalar>);

// One length a number, the other a tensor (what a refinement of the thickness
// at a known attenuation length passes): the all-tensor result and the
// tensor's gradient, bitwise.
TEST_P(AbsorptionErrors, OneNumberAndOneTensor) {
  const Args base = args();
  auto on = [&](const at::Tensor& t) { return t.to(base.device); };
  const at::Tensor I = on(base.I), P = on(base.P), o = on(base.o);
  const double thickness = 3e-4, attenuation = 2e-4;
  auto tensor_of = [&](double v) { return on(at::scalar_tensor(v, at::kDouble)).requires_grad_(); };
  const at::Tensor T = tensor_of(thickness), A = tensor_of(attenuation);
  const at::Tensor want =
      nanobragg_ops::detector_absorption(I, P, o, T, A, base.L, base.oversample, base.per_layer);
  const auto want_grads = torch::autograd::grad({want.sum()}, {T, A});

  const at::Tensor T1 = tensor_of(thickness);
  const at::Tensor got_t = nanobragg_ops::detector_absorption(I, P, o, T1, attenuation, base.L,
                                                              base.oversample, base.per_layer);
  EXPECT_TRUE(bitwise_equal(got_t, want));
  EXPECT_TRUE(bitwise_equal(torch::autograd::grad({got_t.sum()}, {T1})[0], want_grads[0]));

  const at::Tensor A1 = tensor_of(attenuation);
  const at::Tensor got_a = nanobragg_ops::detector_absorption(I, P, o, thickness, A1, base.L,
                                                              base.oversample, base.per_layer);
  EXPECT_TRUE(bitwise_equal(got_a, want));
  EXPECT_TRUE(bitwise_equal(torch::autograd::grad({got_a.sum()}, {A1})[0], want_grads[1]));
  EXPECT_NE(want_grads[0].item<double>(), 0.0);
  EXPECT_NE(want_grads[1].item<double>(), 0.0);

  // An invalid number beside a tensor is still the number's error (on a GPU
  // only if the number stays on the host to be checked); an undefined tensor
  // beside a number is the tensor's.
  expect_error(
      [&] {
        nanobragg_ops::detector_absorption(I, P, o, T1, -1.0, base.L, base.oversample,
                                           base.per_layer);
      },
      {"'attenuation_length'", "> 0"});
  for (double bad_thickness : kBadThicknesses) {
    expect_error(
        [&] {
          nanobragg_ops::detector_absorption(I, P, o, bad_thickness, A1, base.L, base.oversample,
                                             base.per_layer);
        },
        {"'thickness'", "must be finite and >= 0"});
  }
  expect_error(
      [&] {
        nanobragg_ops::detector_absorption(I, P, o, at::Tensor(), attenuation, base.L,
                                           base.oversample, base.per_layer);
      },
      {"'thickness'", "defined tensor"});
}

// Numbers outside the contract's ranges are the tensors' errors, on either
// device (read on the host); an infinite attenuation length is valid.
TEST_P(AbsorptionErrors, NumbersOutOfRangeAreTheTensorsErrors) {
  const Args a = args();
  auto on = [&](const at::Tensor& t) { return t.to(a.device); };
  auto call = [&](double thickness, double attenuation) {
    return nanobragg_ops::detector_absorption(on(a.I), on(a.P), on(a.o), thickness, attenuation,
                                              a.L, a.oversample, a.per_layer);
  };
  for (double thickness : kBadThicknesses) {
    expect_error([&] { call(thickness, 2e-4); }, {"'thickness'", "must be finite and >= 0"});
  }
  for (double att : kBadAttenuationLengths) {
    expect_error([&] { call(3e-4, att); }, {"'attenuation_length'", "> 0"});
  }
  const at::Tensor nothing_absorbed = call(3e-4, kInf);
  EXPECT_TRUE(bitwise_equal(nothing_absorbed, at::zeros_like(nothing_absorbed)));
  // Integers are numbers too (thickness 0: the layers' mean intensity, here
  // the intensity); `{}` is still an undefined tensor, not the number 0.
  const at::Tensor no_thickness = nanobragg_ops::detector_absorption(
      on(a.I), on(a.P), on(a.o), 0, 1, a.L, a.oversample, a.per_layer);
  EXPECT_TRUE(at::allclose(no_thickness.cpu(), a.I, 1e-15, 0.0));
  expect_error(
      [&] {
        nanobragg_ops::detector_absorption(on(a.I), on(a.P), on(a.o), {}, {}, a.L, a.oversample,
                                           a.per_layer);
      },
      {"'thickness'", "defined tensor"});
  expect_error(
      [&] {
        nanobragg_ops::detector_absorption(at::Tensor(), on(a.P), on(a.o), 3e-4, 2e-4, a.L,
                                           a.oversample, a.per_layer);
      },
      {"'intensity'", "defined tensor"});
}

// With meta data (shapes only), numbers become meta scalars: a meta result
// of the pixels' shape, as for 0-dim meta tensors.
TEST(AbsorptionNumbers, MetaDataGivesAMetaResult) {
  const Args a;
  auto meta = [](const at::Tensor& t) { return t.to(at::kMeta); };
  const at::Tensor out = nanobragg_ops::detector_absorption(meta(a.I), meta(a.P), meta(a.o), 3e-4,
                                                            2e-4, a.L, a.oversample, a.per_layer);
  EXPECT_TRUE(out.is_meta());
  EXPECT_EQ(out.sizes(), a.I.sizes());
  EXPECT_EQ(out.scalar_type(), at::kDouble);
}

INSTANTIATE_TEST_SUITE_P(Devices, AbsorptionErrors, ::testing::ValuesIn(test_devices()),
                         device_test_name);

}  // namespace
}  // namespace nanobragg_test
