// Second-derivative kernels (the *_double_backward ops) against central
// differences of the analytic first derivatives (the *_backward ops), in
// float64. With B(x) the backward's outputs and cotangents c of them, the
// double backward is d<c, B(x)>/dx for every input x of the backward,
// grad_output included.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "test_utils.h"

namespace nanobragg_test {
namespace {

constexpr const char* kTricubicDD = "nanobragg::tricubic_interp_double_backward";
constexpr const char* kAbsorptionDD = "nanobragg::detector_absorption_double_backward";
const std::array<int64_t, 3> kIndexMin = {-4, 2, -6};

using OptT = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> tricubic_backward(const at::Tensor& g, const at::Tensor& grid,
                                                     const at::Tensor& hkl,
                                                     const std::string& mode) {
  const auto& op = tricubic_backward_op();
  return op.call(g, grid, hkl, kIndexMin, mode, {true, true});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tricubic_double_backward(
    const OptT& gg_grid, const OptT& gg_hkl, const at::Tensor& g, const at::Tensor& grid,
    const at::Tensor& hkl, const std::string& mode, std::array<bool, 3> mask = {true, true, true}) {
  const auto& op = tricubic_double_backward_op();
  return op.call(gg_grid, gg_hkl, g, grid, hkl, kIndexMin, mode, mask);
}

struct AbsorptionArgs {
  at::Tensor g, intensity, coords, odet, thickness, att;
  int64_t layers;
  bool oversample, per_layer;
  std::vector<at::Tensor*> inputs() { return {&g, &intensity, &coords, &odet, &thickness, &att}; }
};

std::vector<at::Tensor> absorption_backward(const AbsorptionArgs& a) {
  const auto& op = absorption_backward_op();
  auto r = op.call(a.g, a.intensity, a.coords, a.odet, a.thickness, a.att, a.layers, a.oversample,
                   a.per_layer, {true, true, true, true, true});
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r)};
}

std::vector<at::Tensor> absorption_double_backward(const std::array<OptT, 5>& c,
                                                   const AbsorptionArgs& a) {
  const auto& op = absorption_double_backward_op();
  auto r =
      op.call(c[0], c[1], c[2], c[3], c[4], a.g, a.intensity, a.coords, a.odet, a.thickness, a.att,
              a.layers, a.oversample, a.per_layer, {true, true, true, true, true, true});
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r),
          std::get<3>(r), std::get<4>(r), std::get<5>(r)};
}

// d loss / d x by central differences, x changed in place one element at a
// time (and restored).
at::Tensor central_difference(const std::function<double()>& loss, at::Tensor& x, double eps) {
  at::Tensor flat = x.view({-1});
  at::Tensor out = at::zeros({flat.numel()}, at::kDouble);
  for (int64_t i = 0; i < flat.numel(); ++i) {
    const double v = flat[i].item<double>();
    flat[i] = v + eps;
    const double up = loss();
    flat[i] = v - eps;
    const double down = loss();
    flat[i] = v;
    out[i] = (up - down) / (2 * eps);
  }
  return out.view(x.sizes());
}

double weighted_sum(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) * b.to(at::kDouble)).sum().item<double>();
}

// <c, B(x)>: the backward's outputs weighted by the cotangents, whose
// derivatives the double backward returns.
double cotangent_loss(const AbsorptionArgs& a, const std::array<OptT, 5>& c) {
  const auto b = absorption_backward(a);
  double s = 0;
  for (size_t i = 0; i < 5; ++i) s += weighted_sum(b[i], *c[i]);
  return s;
}

class DoubleBackward : public ::testing::TestWithParam<std::string> {
 protected:
  at::TensorOptions opts() const {
    return at::TensorOptions().dtype(at::kDouble).device(GetParam());
  }
};

class TricubicSecondDerivatives : public DoubleBackward {
 protected:
  void SetUp() override {
    NANOBRAGG_SKIP_UNLESS_DEVICE(GetParam(), kTricubicDD);
    at::manual_seed(5);
  }
  // Grid 8 x 9 x 10; points at least 0.1 from integers (a step never moves
  // the stencil), the first `outside` beyond the grid on h, some of those
  // within the nearest-node range.
  void make(int64_t n, int64_t outside) {
    grid = (at::rand({8, 9, 10}, at::kDouble) * 4 - 2).to(opts());
    at::Tensor x = at::empty({n, 3}, at::kDouble);
    for (int d = 0; d < 3; ++d) {
      at::Tensor ints =
          at::randint(kIndexMin[d] + 1, kIndexMin[d] + grid.size(d) - 2, {n}, at::kDouble);
      x.select(1, d).copy_(ints + at::rand({n}, at::kDouble) * 0.8 + 0.1);
    }
    x.slice(0, 0, outside).select(1, 0).fill_(kIndexMin[0] + 7.3);  // last node is +7: nearest
    x.slice(0, 0, 2).select(1, 0).fill_(kIndexMin[0] + 9.2);        // beyond even that
    hkl = x.to(opts());
    g = at::randn({n}, opts());
    G = at::randn(grid.sizes(), opts());
    v = at::randn(hkl.sizes(), opts());
  }
  at::Tensor grid, hkl, g, G, v;
};

TEST_P(TricubicSecondDerivatives, MatchesCentralDifferencesOfBackward) {
  for (const std::string mode : {"default", "nearest"}) {
    make(40, 6);
    auto [d_g, d_grid, d_hkl] = tricubic_double_backward(G, v, g, grid, hkl, mode);
    auto loss = [&] {
      auto [bg, bh] = tricubic_backward(g, grid, hkl, mode);
      return weighted_sum(bg, G) + weighted_sum(bh, v);
    };
    const double eps = 1e-5;
    EXPECT_LT(max_rel_error(to_vector(d_g), to_vector(central_difference(loss, g, eps))), 1e-7)
        << mode;
    EXPECT_LT(max_rel_error(to_vector(d_grid), to_vector(central_difference(loss, grid, eps))),
              1e-7)
        << mode;
    EXPECT_LT(max_rel_error(to_vector(d_hkl), to_vector(central_difference(loss, hkl, eps))), 1e-7)
        << mode;
    // Not vacuous: every output has non-zero entries.
    EXPECT_GT(d_g.abs().max().item<double>(), 0.1);
    EXPECT_GT(d_grid.abs().max().item<double>(), 0.1);
    EXPECT_GT(d_hkl.abs().max().item<double>(), 0.1);
  }
}

TEST_P(TricubicSecondDerivatives, AbsentCotangentIsZero) {
  make(30, 4);
  for (const std::string mode : {"default", "nearest"}) {
    auto [a_g, a_grid, a_hkl] = tricubic_double_backward(std::nullopt, v, g, grid, hkl, mode);
    auto [b_g, b_grid, b_hkl] = tricubic_double_backward(at::zeros_like(G), v, g, grid, hkl, mode);
    EXPECT_TRUE(at::allclose(a_g, b_g) && at::allclose(a_grid, b_grid) &&
                at::allclose(a_hkl, b_hkl));
    auto [c_g, c_grid, c_hkl] = tricubic_double_backward(G, std::nullopt, g, grid, hkl, mode);
    auto [d_g, d_grid, d_hkl] = tricubic_double_backward(G, at::zeros_like(v), g, grid, hkl, mode);
    EXPECT_TRUE(at::allclose(c_g, d_g) && at::allclose(c_grid, d_grid) &&
                at::allclose(c_hkl, d_hkl));
    EXPECT_EQ(c_grid.abs().max().item<double>(), 0.0);  // d/dgrid comes from v only
  }
}

TEST_P(TricubicSecondDerivatives, OutputMaskAndStridedInputs) {
  make(24, 3);
  auto [r_g, r_grid, r_hkl] = tricubic_double_backward(G, v, g, grid, hkl, "nearest");
  // Transposed grid and cotangent, hkl and v as non-contiguous views.
  at::Tensor grid_t = grid.transpose(0, 2).contiguous().transpose(0, 2);
  at::Tensor G_t = G.transpose(1, 2).contiguous().transpose(1, 2);
  at::Tensor hkl_t = hkl.t().contiguous().t();
  at::Tensor v_t = at::cat({v, v}, 1).slice(1, 0, 6, 2);
  v_t.copy_(v);
  auto [s_g, s_grid, s_hkl] = tricubic_double_backward(G_t, v_t, g, grid_t, hkl_t, "nearest");
  EXPECT_LT(max_rel_error(to_vector(s_g), to_vector(r_g)), 1e-12);
  EXPECT_LT(max_rel_error(to_vector(s_grid), to_vector(r_grid)), 1e-12);
  EXPECT_LT(max_rel_error(to_vector(s_hkl), to_vector(r_hkl)), 1e-12);
  auto [m_g, m_grid, m_hkl] =
      tricubic_double_backward(G, v, g, grid, hkl, "nearest", {false, true, false});
  EXPECT_EQ(m_g.numel(), 0);
  EXPECT_EQ(m_hkl.numel(), 0);
  EXPECT_LT(max_rel_error(to_vector(m_grid), to_vector(r_grid)), 1e-12);
}

TEST_P(TricubicSecondDerivatives, BadCotangentIsAClearError) {
  make(10, 0);
  expect_error([&] { tricubic_double_backward(G.slice(0, 1), v, g, grid, hkl, "default"); },
               {kTricubicDD, "'grad_grad_grid'", "shape of 'grid'"});
  expect_error([&] { tricubic_double_backward(G, v.to(at::kFloat), g, grid, hkl, "default"); },
               {kTricubicDD, "'grad_grad_hkl'", "dtype"});
  // an integer cotangent: the message names the one dtype accepted
  expect_error(
      [&] { tricubic_double_backward(G.to(at::kLong), v, g, grid, hkl, "default"); },
      {kTricubicDD, "'grad_grad_grid'", "must have the dtype of 'grid' (Double), got Long"});
}

class AbsorptionSecondDerivatives : public DoubleBackward {
 protected:
  void SetUp() override {
    NANOBRAGG_SKIP_UNLESS_DEVICE(GetParam(), kAbsorptionDD);
    at::manual_seed(11);
  }
  // 4 layers on a 3 x 5 patch; per_layer: intensity per layer, positions
  // shared (size-1 layer dim) or per layer; else intensity broadcast along
  // one pixel dim.
  AbsorptionArgs make(bool oversample, bool per_layer, bool coords_per_layer) const {
    const int64_t L = 4;
    AbsorptionArgs a;
    a.layers = L;
    a.oversample = oversample;
    a.per_layer = per_layer;
    at::Tensor P =
        at::randn({per_layer ? (coords_per_layer ? L : 1) : 3, 3, 5, 3}, at::kDouble) * 0.3;
    P.select(-1, 2).add_(1.0);
    if (!per_layer) P = P[0];
    a.coords = P.to(opts());
    a.intensity = (at::rand(per_layer ? std::vector<int64_t>{L, 3, 1} : std::vector<int64_t>{3, 1},
                            at::kDouble) +
                   0.5)
                      .to(opts());
    a.odet = at::tensor({0.1, -0.2, 0.97}, at::kDouble).to(opts());
    a.thickness = at::scalar_tensor(0.4, opts());
    a.att = at::scalar_tensor(0.7, opts());
    a.g = at::randn({3, 5}, opts());
    return a;
  }
  std::array<OptT, 5> cotangents(const AbsorptionArgs& a) const {
    return {at::randn(a.intensity.sizes(), opts()), at::randn(a.coords.sizes(), opts()),
            at::randn({3}, opts()), at::randn({}, opts()), at::randn({}, opts())};
  }
};

TEST_P(AbsorptionSecondDerivatives, MatchesCentralDifferencesOfBackward) {
  for (bool oversample : {true, false}) {
    for (int layout = 0; layout < 3; ++layout) {
      AbsorptionArgs a = make(oversample, layout > 0, layout == 2);
      const auto c = cotangents(a);
      const auto dd = absorption_double_backward(c, a);
      auto loss = [&] { return cotangent_loss(a, c); };
      auto inputs = a.inputs();
      for (size_t i = 0; i < inputs.size(); ++i) {
        const at::Tensor fd = central_difference(loss, *inputs[i], 1e-6);
        EXPECT_LT(max_rel_error(to_vector(dd[i]), to_vector(fd), 1e-3), 1e-6)
            << "oversample " << oversample << " layout " << layout << " input " << i;
        EXPECT_GT(fd.abs().max().item<double>(), 1e-3) << "input " << i;  // not vacuous
      }
    }
  }
}

TEST_P(AbsorptionSecondDerivatives, ZeroThicknessAndNoAbsorption) {
  // thickness 0 (out = mean I: only d/dg and d/dI survive) and att = inf (mu = 0).
  for (double T : {0.0, 0.4}) {
    AbsorptionArgs a = make(true, true, false);
    a.thickness = at::scalar_tensor(T, opts());
    if (T > 0) a.att = at::scalar_tensor(std::numeric_limits<double>::infinity(), opts());
    const auto c = cotangents(a);
    const auto dd = absorption_double_backward(c, a);
    for (const auto& t : dd) {
      EXPECT_TRUE(at::isfinite(t).all().item<bool>());
    }
    auto loss = [&] { return cotangent_loss(a, c); };
    // The finite differences stay on one side of T = 0 and att = inf only
    // for g, intensity, pixel_coords and odet, and, at T = 0.4, thickness.
    auto inputs = a.inputs();
    for (size_t i = 0; i < (T > 0 ? 5u : 4u); ++i) {
      const at::Tensor fd = central_difference(loss, *inputs[i], 1e-6);
      EXPECT_LT(max_rel_error(to_vector(dd[i]), to_vector(fd), 1e-3), 1e-6) << T << " input " << i;
    }
    if (T > 0) {
      // att = inf: mu = 0, so every capture fraction, and each of its
      // derivatives (each carries a factor mu or mu^2), is 0 near it.
      EXPECT_EQ(dd[5].abs().max().item<double>(), 0.0);
    }
  }
}

TEST_P(AbsorptionSecondDerivatives, AbsentCotangentsAreZero) {
  AbsorptionArgs a = make(true, false, false);
  auto c = cotangents(a);
  std::array<OptT, 5> zeros;
  for (size_t i = 0; i < 5; ++i) zeros[i] = at::zeros_like(*c[i]);
  for (size_t skip = 0; skip < 5; ++skip) {
    auto with_none = c, with_zero = c;
    with_none[skip] = std::nullopt;
    with_zero[skip] = zeros[skip];
    const auto x = absorption_double_backward(with_none, a);
    const auto y = absorption_double_backward(with_zero, a);
    for (size_t i = 0; i < 6; ++i) {
      EXPECT_TRUE(at::allclose(x[i], y[i])) << "absent " << skip << " output " << i;
    }
  }
}

TEST_P(AbsorptionSecondDerivatives, BadCotangentIsAClearError) {
  AbsorptionArgs a = make(true, false, false);
  auto c = cotangents(a);
  c[2] = at::randn({4}, opts());
  expect_error([&] { absorption_double_backward(c, a); },
               {kAbsorptionDD, "'grad_grad_odet'", "shape of 'odet'"});
  c = cotangents(a);
  c[3] = at::ones({}, opts().dtype(at::kInt));
  expect_error(
      [&] { absorption_double_backward(c, a); },
      {kAbsorptionDD, "'grad_grad_thickness'", "must have the dtype of 'thickness'", "Int"});
}

INSTANTIATE_TEST_SUITE_P(Devices, TricubicSecondDerivatives, ::testing::ValuesIn(test_devices()),
                         device_test_name);
INSTANTIATE_TEST_SUITE_P(Devices, AbsorptionSecondDerivatives, ::testing::ValuesIn(test_devices()),
                         device_test_name);

}  // namespace
}  // namespace nanobragg_test
