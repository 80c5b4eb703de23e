// Tests written for faults that scripts/mutants.sh plants (docs/RELIABILITY.md,
// "Mutation smoke run"), where the rest of the suite's cover was thin. CPU,
// float64, against the independent references of absorption_reference.h.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/autograd.h>

#include <vector>

#include "absorption_reference.h"
#include "nanobragg_ops/ops.h"

namespace {

using nanobragg_test::AbsorptionCase;
using nanobragg_test::port_reference;

// The shared-position case (one intensity and one position per pixel, the
// CPU kernels' fast path) with sensor normals tilted differently in x and
// y, so that an exchange of odet's or a pixel's x and y components changes
// every value and gradient. Values against the port's formulation, and the
// gradients in intensity, pixel_coords and odet against autograd through it.
TEST(MutantGuards, SharedPositionWithTiltedNormalsMatchesPortValuesAndGradients) {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  at::manual_seed(7);
  const int64_t S = 5, F = 6;
  at::Tensor s = at::linspace(-0.04, 0.05, S, f64).view({S, 1}).expand({S, F});
  at::Tensor f = at::linspace(-0.06, 0.03, F, f64).view({1, F}).expand({S, F});
  const at::Tensor coords =
      at::stack({f, 0.5 * s, at::full({S, F}, 0.1, f64)}, -1) + 1e-3 * at::randn({S, F, 3}, f64);
  const at::Tensor intensity = at::rand({S, F}, f64) + 0.5;
  const std::vector<std::vector<double>> normals = {{0.35, -0.1, 1.0}, {-0.2, 0.45, 0.9}};
  for (const auto& n : normals) {
    at::Tensor odet = at::tensor(n, f64);
    odet = odet / odet.norm();
    for (int64_t L : {1, 4}) {
      for (bool oversample : {true, false}) {
        AbsorptionCase c;
        c.intensity = intensity.clone().requires_grad_(true);
        c.coords = coords.clone().requires_grad_(true);
        c.odet = odet.clone().requires_grad_(true);
        c.thickness = at::scalar_tensor(3e-4, f64);
        c.attenuation_length = at::scalar_tensor(2e-4, f64);
        c.thicksteps = L;
        c.oversample = oversample;
        const at::Tensor out = nanobragg_ops::detector_absorption(
            c.intensity, c.coords, c.odet, c.thickness, c.attenuation_length, L, oversample,
            /*per_layer=*/false);
        const at::Tensor ref = port_reference(c);
        SCOPED_TRACE(::testing::Message()
                     << "L=" << L << " oversample=" << oversample << " odet=" << odet);
        ASSERT_TRUE(at::allclose(out, ref, 1e-12, 0.0)) << (out - ref).abs().max();
        const at::Tensor w = at::rand({S, F}, f64);
        const auto got = torch::autograd::grad({(out * w).sum()}, {c.intensity, c.coords, c.odet});
        const auto want = torch::autograd::grad({(ref * w).sum()}, {c.intensity, c.coords, c.odet});
        const char* names[3] = {"intensity", "pixel_coords", "odet"};
        for (size_t i = 0; i < 3; ++i) {
          EXPECT_TRUE(at::allclose(got[i], want[i], 1e-10, 1e-14))
              << names[i] << ": " << (got[i] - want[i]).abs().max();
        }
      }
    }
  }
}

}  // namespace
