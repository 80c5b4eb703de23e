// detector_absorption: parity with the PyTorch port's formulation and a layer
// loop (docs/CONTRACT.md §2), and gradients against central finite differences.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/autograd.h>

#include <functional>
#include <limits>

#include "absorption_reference.h"
#include "nanobragg_ops/ops.h"
#include "test_utils.h"

namespace nanobragg_test {
namespace {

constexpr const char* kOp = "nanobragg::detector_absorption";

at::Tensor run(const AbsorptionCase& c) {
  return nanobragg_ops::detector_absorption(c.intensity, c.coords, c.odet, c.thickness,
                                            c.attenuation_length, c.thicksteps, c.oversample,
                                            c.per_layer);
}

// Relative error, with a floor well below the image's scale so that deep
// underflow (grazing pixels, exp(-700)) does not count as a mismatch.
double image_rel_error(const std::vector<double>& got, const std::vector<double>& ref) {
  double scale = 0.0;
  for (double v : ref) scale = std::max(scale, std::abs(v));
  return max_rel_error(got, ref, std::max(scale * 1e-9, 1e-300));
}

class Absorption : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    NANOBRAGG_SKIP_UNLESS_DEVICE(GetParam(), kOp);
    at::manual_seed(2024);
  }
  at::TensorOptions opts(at::ScalarType dtype = at::kDouble) const {
    return at::TensorOptions().dtype(dtype).device(GetParam());
  }
  // A detector plane at distance 0.1 along z, pixels spread +-0.05 in x, y.
  at::Tensor plane(int64_t S, int64_t F, double dist = 0.1) const {
    at::Tensor s = at::linspace(-0.05, 0.05, S, at::kDouble).view({S, 1}).expand({S, F});
    at::Tensor f = at::linspace(-0.05, 0.05, F, at::kDouble).view({1, F}).expand({S, F});
    at::Tensor z = at::full({S, F}, dist, at::kDouble);
    return (at::stack({f, s, z}, -1) + 1e-3 * at::randn({S, F, 3}, at::kDouble));
  }
  at::Tensor unit(std::vector<double> v) const {
    at::Tensor t = at::tensor(v, at::kDouble);
    return t / t.norm();
  }
  AbsorptionCase make(at::Tensor I, at::Tensor P, at::Tensor o, int64_t L, bool oversample,
                      bool per_layer, double T = 3e-4, double att = 2e-4,
                      at::ScalarType dtype = at::kDouble) const {
    AbsorptionCase c;
    c.intensity = I.to(opts(dtype));
    c.coords = P.to(opts(dtype));
    c.odet = o.to(opts(dtype));
    c.thickness = at::scalar_tensor(T, opts(dtype));
    c.attenuation_length = at::scalar_tensor(att, opts(dtype));
    c.thicksteps = L;
    c.oversample = oversample;
    c.per_layer = per_layer;
    return c;
  }
  std::vector<at::Tensor> normals() const {
    return {unit({0, 0, 1}), unit({0.3, -0.2, 1.0}), unit({0, 0, -1}), unit({0.6, 0.1, -0.8})};
  }
};

TEST_P(Absorption, MatchesPortFormulation) {
  at::Tensor P = plane(6, 7);
  // Grazing pixels (parallax ~0.002), one exactly in the plane (rho = 0,
  // clamped) and one at the origin (|p| clamped).
  P[0][0] = at::tensor({50.0, 0.0, 0.1}, at::kDouble);
  P[0][1] = at::tensor({0.0, -30.0, 0.05}, at::kDouble);
  P[0][2] = at::tensor({1.0, 0.0, 0.0}, at::kDouble);
  P[0][3] = at::tensor({0.0, 0.0, 0.0}, at::kDouble);
  at::Tensor I = at::rand({6, 7}, at::kDouble) * 9 + 1;
  int checked = 0;
  for (const auto& o : normals()) {
    for (int64_t L : {1, 2, 5, 16}) {
      for (bool oversample : {true, false}) {
        for (auto dtype : {at::kDouble, at::kFloat}) {
          AbsorptionCase c = make(I, P, o, L, oversample, false, 3e-4, 2e-4, dtype);
          const auto got = to_vector(run(c));
          const auto ref = to_vector(port_reference(c));
          // A flipped sensor at grazing/clamped parallax overflows in both
          // (exp(+huge)): there the op must overflow too, to the reference's
          // infinity, or to any non-finite value where the reference's plain
          // difference of two overflows is inf - inf = NaN (the op's
          // cancellation-free product gives the overflow's -inf there). The
          // finite ones are compared.
          std::vector<double> g2, r2;
          for (size_t i = 0; i < ref.size(); ++i) {
            if (std::isfinite(ref[i])) {
              g2.push_back(got[i]);
              r2.push_back(ref[i]);
            } else {
              EXPECT_TRUE(std::isnan(ref[i]) ? !std::isfinite(got[i]) : got[i] == ref[i])
                  << "pixel " << i << ": reference " << ref[i] << ", op " << got[i];
            }
          }
          EXPECT_GE(r2.size(), ref.size() - 4);
          EXPECT_LE(image_rel_error(g2, r2), dtype == at::kDouble ? 1e-12 : 1e-5)
              << "L=" << L << " oversample=" << oversample << " odet=" << o;
          ++checked;
        }
      }
    }
  }
  EXPECT_EQ(checked, 64);
}

TEST_P(Absorption, ZeroThicknessAndInfiniteAttenuationLength) {
  at::Tensor P = plane(3, 4);
  at::Tensor I = at::rand({3, 4}, at::kDouble) + 1;
  for (bool oversample : {true, false}) {
    AbsorptionCase c0 = make(I, P, unit({0, 0, 1}), 4, oversample, false, 0.0);
    EXPECT_TRUE(at::allclose(run(c0).cpu(), I, 0, 0)) << "thickness 0: intensity unchanged";
    AbsorptionCase cinf = make(I, P, unit({0, 0, 1}), 4, oversample, false, 3e-4,
                               std::numeric_limits<double>::infinity());
    EXPECT_EQ(run(cinf).abs().max().item<double>(), 0.0) << "mu = 0: nothing captured";
    // per layer: thickness 0 gives the mean over layers.
    at::Tensor IL = at::rand({4, 3, 4}, at::kDouble);
    AbsorptionCase cl = make(IL, P.unsqueeze(0), unit({0, 0, 1}), 4, oversample, true, 0.0);
    EXPECT_LE(max_rel_error(to_vector(run(cl)), to_vector(IL.mean(0))), 1e-15);
  }
}

TEST_P(Absorption, PerLayerMatchesLayerLoop) {
  const int64_t L = 4, S = 3, F = 5;
  at::Tensor base = plane(S, F);
  // Each layer's pixel moved to that layer's depth, as nanoBragg C does.
  at::Tensor depth =
      at::arange(L, at::kDouble).view({L, 1, 1, 1}) * at::tensor({0.0, 0.0, 7.5e-5}, at::kDouble);
  at::Tensor PL = base.unsqueeze(0) + depth;
  at::Tensor IL = at::rand({L, S, F}, at::kDouble) + 0.5;
  struct Shapes {
    at::Tensor I, P;
    const char* what;
  };
  const std::vector<Shapes> shapes = {
      {IL, PL, "both per layer"},
      {IL.slice(0, 0, 1), PL, "intensity shared (size 1)"},
      {IL, base.unsqueeze(0), "position shared (size 1)"},
      {IL.select(1, 0), PL, "intensity [L, F] broadcast over S"},
      {IL.slice(0, 0, 1), base.unsqueeze(0), "both shared"},
  };
  for (const auto& o : normals()) {
    for (bool oversample : {true, false}) {
      for (const auto& sh : shapes) {
        for (auto dtype : {at::kDouble, at::kFloat}) {
          AbsorptionCase c = make(sh.I, sh.P, o, L, oversample, true, 3e-4, 2e-4, dtype);
          at::Tensor out = run(c);
          EXPECT_EQ(out.sizes(), at::IntArrayRef({S, F})) << sh.what;
          EXPECT_LE(image_rel_error(to_vector(out), layer_loop_reference(c)),
                    dtype == at::kDouble ? 1e-12 : 1e-5)
              << sh.what << " oversample=" << oversample << " odet=" << o;
        }
      }
    }
  }
}

TEST_P(Absorption, PerLayerWithSharedInputsEqualsNotPerLayer) {
  at::Tensor P = plane(4, 4);
  at::Tensor I = at::rand({4, 4}, at::kDouble) + 1;
  for (bool oversample : {true, false}) {
    at::Tensor a = run(make(I, P, unit({0.1, 0, 1}), 6, oversample, false));
    at::Tensor b =
        run(make(I.unsqueeze(0), P.unsqueeze(0), unit({0.1, 0, 1}), 6, oversample, true));
    EXPECT_LE(max_rel_error(to_vector(a), to_vector(b)), 1e-14);
  }
}

TEST_P(Absorption, BroadcastStridedAndEmpty) {
  at::Tensor P = plane(5, 6);
  // intensity [6] broadcast over the slow axis; coords as a strided view.
  at::Tensor I = at::rand({6}, at::kDouble) + 1;
  at::Tensor wide = at::zeros({5, 12, 5}, at::kDouble);
  wide.slice(1, 0, 12, 2).slice(2, 0, 5, 2).copy_(P);
  AbsorptionCase c = make(I, P, unit({0.2, 0.1, 1}), 3, true, false);
  c.coords = wide.to(opts()).slice(1, 0, 12, 2).slice(2, 0, 5, 2);
  ASSERT_FALSE(c.coords.is_contiguous());
  EXPECT_LE(image_rel_error(to_vector(run(c)), to_vector(port_reference(c))), 1e-12);
  // Empty pixel shape.
  AbsorptionCase e = make(at::empty({0, 6}), at::empty({0, 6, 3}), unit({0, 0, 1}), 3, true, false);
  EXPECT_EQ(run(e).sizes(), at::IntArrayRef({0, 6}));
  // A 0-dim intensity and a single pixel.
  AbsorptionCase one =
      make(at::scalar_tensor(2.0, at::kDouble), P[1][2], unit({0, 0, 1}), 2, false, false);
  EXPECT_EQ(run(one).dim(), 0);
  EXPECT_LE(image_rel_error(to_vector(run(one)), to_vector(port_reference(one))), 1e-12);
}

// On the CPU the thread count splits the pixels and the scalar gradients'
// sums; on CUDA it changes nothing, and the instance checks that two runs
// agree to the bit: the block partial sums are reduced in a fixed order, and
// 180 000 pixels make many blocks.
TEST_P(Absorption, BitwiseIdenticalWithOneAndTwoThreads) {
  AbsorptionCase c = make(at::rand({3, 300, 200}, at::kDouble), plane(300, 200).unsqueeze(0),
                          unit({0.2, 0.1, 1}), 3, true, true, 3e-4, 2e-4, at::kFloat);
  for (auto* t : {&c.intensity, &c.coords, &c.odet, &c.thickness, &c.attenuation_length}) {
    t->requires_grad_(true);
  }
  auto grads = [&] {
    at::Tensor out = run(c);
    return torch::autograd::grad({out},
                                 {c.intensity, c.coords, c.odet, c.thickness, c.attenuation_length},
                                 {at::ones_like(out)});
  };
  const int saved = at::get_num_threads();
  at::set_num_threads(1);
  at::Tensor out1 = run(c).detach();
  auto g1 = grads();
  at::set_num_threads(2);
  at::Tensor out2 = run(c).detach();
  auto g2 = grads();
  at::set_num_threads(saved);
  EXPECT_TRUE(bitwise_equal(out1, out2));
  for (size_t i = 0; i < g1.size(); ++i) {
    EXPECT_TRUE(bitwise_equal(g1[i], g2[i])) << "input " << i;
  }
}

// ---------------------------------------------------------------------------
// Gradients: d(sum_i w_i out_i)/d(input) against central differences of the
// forward, element by element, for every differentiable input.

std::vector<at::Tensor*> inputs_of(AbsorptionCase& c) {
  return {&c.intensity, &c.coords, &c.odet, &c.thickness, &c.attenuation_length};
}

void expect_gradients_match_fd(AbsorptionCase c, const std::string& what) {
  at::Tensor w = at::randn(run(c).sizes(), c.intensity.options());
  auto inputs = inputs_of(c);
  std::vector<at::Tensor> leaves;
  for (auto* t : inputs) {
    *t = t->detach().clone().requires_grad_(true);
    leaves.push_back(*t);
  }
  auto analytic = torch::autograd::grad({run(c)}, leaves, {w});
  const char* names[5] = {"intensity", "pixel_coords", "odet", "thickness", "attenuation_length"};
  for (size_t k = 0; k < inputs.size(); ++k) {
    ASSERT_EQ(analytic[k].sizes(), leaves[k].sizes()) << what << " " << names[k];
    at::Tensor x = leaves[k].detach().clone();
    at::Tensor flat = x.view({-1});
    const double scale = x.abs().mean().item<double>();
    std::vector<double> fd(static_cast<size_t>(flat.numel()));
    AbsorptionCase probe = c;
    for (auto* t : inputs_of(probe)) *t = t->detach();
    *inputs_of(probe)[k] = x;
    for (int64_t i = 0; i < flat.numel(); ++i) {
      const double v = flat[i].item<double>();
      const double eps = 1e-6 * (std::abs(v) + scale);
      flat[i] = v + eps;
      const double up = (run(probe) * w).sum().item<double>();
      flat[i] = v - eps;
      const double down = (run(probe) * w).sum().item<double>();
      flat[i] = v;
      fd[static_cast<size_t>(i)] = (up - down) / (2 * eps);
    }
    double fd_scale = 0.0;
    for (double v : fd) fd_scale = std::max(fd_scale, std::abs(v));
    EXPECT_GT(fd_scale, 0.0) << what << " " << names[k] << ": vacuous check";
    EXPECT_LE(max_rel_error(to_vector(analytic[k]), fd, fd_scale * 1e-4), 1e-5)
        << what << " " << names[k];
  }
}

TEST_P(Absorption, GradientsMatchFiniteDifferencesSharedLayers) {
  at::Tensor P = plane(2, 3);
  at::Tensor I = at::rand({2, 3}, at::kDouble) + 1;
  for (bool oversample : {true, false}) {
    for (const auto& o : {unit({0.3, -0.2, 1.0}), unit({0.2, 0.4, -1.0})}) {
      expect_gradients_match_fd(
          make(I, P, o, 3, oversample, false),
          std::string("per_layer=false oversample=") + (oversample ? "1" : "0"));
    }
    // Broadcast: intensity [3] over the slow axis, odet not normalised.
    expect_gradients_match_fd(
        make(I[0], P, at::tensor({0.1, 0.2, 0.9}, at::kDouble), 2, oversample, false),
        "broadcast intensity");
    expect_gradients_match_fd(make(I, P, unit({0, 0, 1}), 1, oversample, false), "L=1");
  }
}

TEST_P(Absorption, GradientsMatchFiniteDifferencesPerLayer) {
  const int64_t L = 3;
  at::Tensor base = plane(2, 2);
  at::Tensor PL = base.unsqueeze(0) + at::randn({L, 2, 2, 3}, at::kDouble) * 1e-3;
  at::Tensor IL = at::rand({L, 2, 2}, at::kDouble) + 1;
  for (bool oversample : {true, false}) {
    const std::string m = std::string(" oversample=") + (oversample ? "1" : "0");
    expect_gradients_match_fd(make(IL, PL, unit({0.3, -0.2, 1.0}), L, oversample, true),
                              "both per layer" + m);
    expect_gradients_match_fd(
        make(IL.slice(0, 0, 1), PL, unit({0.3, -0.2, 1.0}), L, oversample, true),
        "intensity shared" + m);
    expect_gradients_match_fd(
        make(IL, base.unsqueeze(0), unit({0.1, 0.2, -1.0}), L, oversample, true),
        "position shared" + m);
    expect_gradients_match_fd(
        make(IL.select(1, 0), PL, unit({0.3, -0.2, 1.0}), L, oversample, true),
        "intensity [L, F] broadcast" + m);
  }
}

TEST_P(Absorption, GradientAtZeroThicknessAndInfiniteAttenuation) {
  // Zero thickness: out = mean_t I_t, so only intensity has a gradient.
  at::Tensor P = plane(2, 2);
  AbsorptionCase c =
      make(at::rand({3, 2, 2}, at::kDouble), P.unsqueeze(0), unit({0, 0, 1}), 3, true, true, 0.0);
  for (auto* t : inputs_of(c)) t->requires_grad_(true);
  auto g = torch::autograd::grad({run(c).sum()}, {c.intensity, c.coords, c.odet, c.thickness});
  EXPECT_LE(max_rel_error(to_vector(g[0]), std::vector<double>(12, 1.0 / 3)), 1e-15);
  EXPECT_EQ(g[1].abs().max().item<double>(), 0.0);
  EXPECT_EQ(g[2].abs().max().item<double>(), 0.0);
  EXPECT_EQ(g[3].item<double>(), 0.0);
  // Infinite attenuation length: nothing is captured (out = 0), and every
  // gradient is exactly zero, not NaN (0 x inf).
  AbsorptionCase d = make(at::rand({2, 2}, at::kDouble), P, unit({0, 0, 1}), 3, true, false, 3e-4,
                          std::numeric_limits<double>::infinity());
  for (auto* t : inputs_of(d)) t->requires_grad_(true);
  EXPECT_EQ(run(d).abs().max().item<double>(), 0.0);
  auto gd = torch::autograd::grad(
      {run(d).sum()}, {d.intensity, d.coords, d.odet, d.thickness, d.attenuation_length});
  for (size_t i = 0; i < gd.size(); ++i) {
    EXPECT_EQ(gd[i].abs().max().item<double>(), 0.0) << "input " << i;
  }
}

// Valid lengths whose optical depth per layer is beyond any floating number
// (a float32 step past 3.4e38, a float64 one past 1.8e308, or 1 / att^2
// overflowing): layer 0 captures everything, so out = I_0 when oversampled,
// and mean_t I_t (one layer) or 0 (more) when not; every gradient but the
// intensity's is exactly 0. They were NaN (exp(-0 a), dL/da * a at a = inf,
// 0 * inf in the chain rule to the lengths).
TEST_P(Absorption, SaturatedAbsorptionIsItsLimit) {
  struct Lengths {
    at::ScalarType dtype;
    double thickness, attenuation_length;
  };
  for (const Lengths s : {Lengths{at::kFloat, 450e-6, 1e-50}, Lengths{at::kDouble, 1e300, 1e-10},
                          Lengths{at::kDouble, 450e-6, 1e-305}}) {
    for (const bool per_layer : {false, true}) {
      for (const auto& [L, oversample] :
           {std::pair<int64_t, bool>{1, false}, {3, false}, {3, true}}) {
        const std::string what =
            std::string(c10::toString(s.dtype)) + " thickness " + std::to_string(s.thickness) +
            " att " + std::to_string(s.attenuation_length) + (per_layer ? " per layer" : "") +
            " L " + std::to_string(L) + (oversample ? " oversampled" : "");
        at::Tensor I =
            at::rand(per_layer ? std::vector<int64_t>{L, 3, 4} : std::vector<int64_t>{3, 4},
                     at::kDouble) +
            0.5;
        AbsorptionCase c =
            make(I, per_layer ? plane(3, 4).unsqueeze(0) : plane(3, 4), unit({0.2, -0.1, 1.0}), L,
                 oversample, per_layer, 1.0, 1.0, s.dtype);
        c.thickness = at::scalar_tensor(s.thickness, opts(at::kDouble));
        c.attenuation_length = at::scalar_tensor(s.attenuation_length, opts(at::kDouble));
        for (auto* t : inputs_of(c)) t->requires_grad_(true);
        const at::Tensor layers = per_layer ? I : I.unsqueeze(0);
        at::Tensor capture = at::zeros({layers.size(0), 1, 1}, at::kDouble);
        if (oversample) {
          capture[0] = 1.0;
        } else if (L == 1) {
          capture.fill_(1.0 / static_cast<double>(layers.size(0)));
        }
        const at::Tensor out = run(c);
        EXPECT_LE(max_rel_error(to_vector(out), to_vector((capture * layers).sum(0)), 1e-300),
                  s.dtype == at::kFloat ? 1e-7 : 1e-16)
            << what;
        auto g = torch::autograd::grad(
            {out.sum()}, {c.intensity, c.coords, c.odet, c.thickness, c.attenuation_length});
        const at::Tensor want_I = per_layer ? capture.expand_as(I) : capture[0].expand_as(I);
        EXPECT_EQ(max_rel_error(to_vector(g[0]), to_vector(want_I), 1e-300), 0.0) << what;
        for (size_t i = 1; i < g.size(); ++i) {
          EXPECT_EQ(g[i].ne(0).sum().item<int64_t>(), 0) << what << ", input " << i << ": " << g[i];
        }
      }
    }
  }
}

// The sensor facing away with a step beyond the floating range: every
// fraction's limit is -inf, and so is the output (not NaN: exp(-0 a) at
// a = -inf). And NaN stays NaN through the capped optical depth: a NaN
// coordinate makes its own pixel NaN and no other.
TEST_P(Absorption, SaturatedFacingAwayAndNanCoordinates) {
  for (const at::ScalarType dtype : {at::kFloat, at::kDouble}) {
    for (const bool per_layer : {false, true}) {
      for (const auto& [L, oversample] :
           {std::pair<int64_t, bool>{1, false}, {3, false}, {3, true}}) {
        const std::string what = std::string(c10::toString(dtype)) +
                                 (per_layer ? " per layer" : "") + " L " + std::to_string(L) +
                                 (oversample ? " oversampled" : "");
        at::Tensor I =
            at::rand(per_layer ? std::vector<int64_t>{L, 3, 4} : std::vector<int64_t>{3, 4},
                     at::kDouble) +
            0.5;
        at::Tensor P = per_layer ? plane(3, 4).unsqueeze(0) : plane(3, 4);
        AbsorptionCase away =
            make(I, P, unit({0.05, 0.02, -1.0}), L, oversample, per_layer, 1.0, 1.0, dtype);
        away.thickness = at::scalar_tensor(1e300, opts(at::kDouble));
        away.attenuation_length = at::scalar_tensor(1e-10, opts(at::kDouble));
        const at::Tensor out = run(away);
        EXPECT_TRUE(out.eq(-std::numeric_limits<double>::infinity()).all().item<bool>())
            << what << ": " << out;

        AbsorptionCase nan =
            make(I, P.clone(), unit({0.2, -0.1, 1.0}), L, oversample, per_layer, 3e-4, 2e-4, dtype);
        nan.coords.select(-1, 0).select(-1, 2).select(-1, 1).fill_(std::nan(""));
        nan.intensity.requires_grad_(true);
        const at::Tensor nan_out = run(nan);
        const at::Tensor isnan = nan_out.isnan();
        EXPECT_EQ(isnan.sum().item<int64_t>(), 1) << what;
        EXPECT_TRUE(isnan[1][2].item<bool>()) << what;
        // The intensity's gradient (the backward's capped optical depth) too.
        const at::Tensor g = torch::autograd::grad({nan_out.sum()}, {nan.intensity})[0];
        const at::Tensor g_nan = per_layer ? g.isnan().any(0) : g.isnan();
        EXPECT_EQ(g_nan.sum().item<int64_t>(), 1) << what << ": " << g;
        EXPECT_TRUE(g_nan[1][2].item<bool>()) << what;
      }
    }
  }
}

// The incoming gradient as `.backward(g)` hands it over in any layout: the
// same values, so the same gradients. On the CPU each layout takes another
// route to the same arithmetic (one stride, or gathered block by block,
// row by row or, transposed, column by column), so they must agree to the
// bit; pixel counts that do not fill whole blocks or rows check the
// gathers' partial rows. With every input needing a gradient and with the
// intensity alone (its own loop).
TEST_P(Absorption, GradientsDoNotDependOnTheIncomingGradientsLayout) {
  const int64_t H = 70, W = 300;  // 21000 pixels: blocks of 4096 and 8192 end mid-row
  for (at::ScalarType dtype : {at::kFloat, at::kDouble}) {
    AbsorptionCase c = make(at::rand({H, W}, at::kDouble) + 1, plane(H, W), unit({0.2, 0.1, 1}), 5,
                            true, false, 3e-4, 2e-4, dtype);
    const at::Tensor g = at::rand({H, W}, c.intensity.options());
    at::Tensor wide = at::zeros({H, W + 5}, g.options());
    wide.slice(1, 0, W).copy_(g);
    at::Tensor every_other = at::zeros({H, 2 * W}, g.options());
    every_other.slice(1, 0, 2 * W, 2).copy_(g);
    at::Tensor tall = at::zeros({W, H + 3}, g.options());
    tall.slice(1, 0, H).copy_(g.t());
    const std::vector<std::pair<std::string, at::Tensor>> layouts = {
        {"transposed", g.t().contiguous().t()},
        {"transposed, columns of a taller tensor", tall.slice(1, 0, H).t()},
        {"rows of a wider tensor", wide.slice(1, 0, W)},
        {"every other column", every_other.slice(1, 0, 2 * W, 2)},
    };
    for (bool all : {true, false}) {
      auto grads = [&](const at::Tensor& grad_output) {
        std::vector<at::Tensor> leaves = {c.intensity.detach().requires_grad_(true)};
        AbsorptionCase d = c;
        d.intensity = leaves[0];
        if (all) {
          for (auto* t : {&d.coords, &d.odet, &d.thickness, &d.attenuation_length}) {
            *t = t->detach().requires_grad_(true);
            leaves.push_back(*t);
          }
        }
        return torch::autograd::grad({run(d)}, leaves, {grad_output});
      };
      const auto want = grads(g);
      for (const auto& [name, layout] : layouts) {
        const std::string what =
            name + (all ? ", every input" : ", intensity alone") + ", " + c10::toString(dtype);
        ASSERT_TRUE(at::equal(layout.cpu(), g.cpu())) << what;
        // (a view that merged into one dimension would test nothing new)
        if (name != "every other column") {
          ASSERT_FALSE(layout.is_contiguous()) << what;
        }
        const auto got = grads(layout);
        ASSERT_EQ(got.size(), want.size()) << what;
        for (size_t k = 0; k < got.size(); ++k) {
          if (got[k].is_cuda()) {
            EXPECT_LE(max_rel_error(to_vector(got[k]), to_vector(want[k]), 1e-30),
                      dtype == at::kDouble ? 1e-12 : 1e-5)
                << what << ", input " << k;
          } else {
            EXPECT_TRUE(bitwise_equal(got[k], want[k])) << what << ", input " << k;
          }
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Devices, Absorption, ::testing::ValuesIn(test_devices()),
                         device_test_name);

}  // namespace
}  // namespace nanobragg_test
