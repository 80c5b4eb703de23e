// Refinement through both operators, in C++ against the installed package:
// a synthetic image of a crystal (structure factors scaled by s) on a thick,
// tilted sensor (thickness T) is fitted from a wrong start by Adam, and s and T
// are recovered. Exits non-zero unless the loss falls 100-fold and both
// parameters land within 1% of the truth.
#include <nanobragg_ops/ops.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>

int main() {
  torch::manual_seed(0);
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);

  // Structure factors on h, k, l in [-8, 8].
  const auto idx = torch::arange(-8, 9, f64);
  const auto grids = torch::meshgrid({idx, idx, idx}, "ij");
  const auto& h = grids[0];
  const auto& k = grids[1];
  const auto& l = grids[2];
  const auto F =
      10 * torch::exp(-(h * h + k * k + l * l) / 60) * (1 + 0.5 * torch::cos(h + 2 * k - l)) + 1;

  // A 48 x 48 detector, 0.2 m wide, 0.1 m from the sample along its normal
  // odet, tilted by 40 degrees (which moves the pixels' Miller indices); the
  // parallax odet . p / |p| spans 0.59 (corners) to 1 across its width, what
  // makes T observable.
  const int64_t S = 48;
  const double tilt = 40.0 * M_PI / 180.0;
  const auto odet = torch::tensor({std::sin(tilt), 0.0, std::cos(tilt)}, f64);
  const auto fast = torch::tensor({std::cos(tilt), 0.0, -std::sin(tilt)}, f64);
  const auto slow = torch::tensor({0.0, 1.0, 0.0}, f64);
  const auto c = (torch::arange(S, f64) - (S - 1) / 2.0) * (0.2 / S);
  const auto yx = torch::meshgrid({c, c}, "ij");
  const auto pixels = 0.1 * odet + yx[1].unsqueeze(-1) * fast + yx[0].unsqueeze(-1) * slow;
  // Miller indices of each pixel: a 6 A cubic cell, 1 A X-rays along +z.
  const auto beam = torch::tensor({0.0, 0.0, 1.0}, f64);
  const auto hkl = 6.0 * (pixels / pixels.norm(2, -1, true) - beam);

  auto image = [&](const torch::Tensor& scale, const torch::Tensor& thickness_um) {
    const auto F_pixel = nanobragg_ops::tricubic_interp(scale * F, hkl, {-8, -8, -8});
    // thickness (m) a tensor, refined; the attenuation length (m) a known number
    return nanobragg_ops::detector_absorption(F_pixel * F_pixel, pixels, odet, thickness_um * 1e-6,
                                              /*attenuation_length=*/234e-6, /*thicksteps=*/4,
                                              /*oversample_thick=*/true);
  };
  const double true_scale = 2.0, true_thickness_um = 100.0;
  const auto observed =
      image(torch::tensor(true_scale, f64), torch::tensor(true_thickness_um, f64)).detach();
  const auto norm = (observed * observed).mean();

  auto scale = torch::tensor(1.5, f64).requires_grad_(true);
  auto thickness_100um = torch::tensor(0.5, f64).requires_grad_(true);  // 50 um to start
  torch::optim::Adam adam({scale, thickness_100um}, torch::optim::AdamOptions(0.02));
  double first = 0, last = 0;
  for (int step = 0; step <= 400; ++step) {
    adam.zero_grad();
    const auto loss = (image(scale, thickness_100um * 100) - observed).pow(2).mean() / norm;
    loss.backward();
    adam.step();
    last = loss.item<double>();
    if (step == 0) first = last;
    if (step % 50 == 0) {
      std::printf("step %3d  loss %.3e  scale %.5f  thickness %.3f um\n", step, last,
                  scale.item<double>(), 100 * thickness_100um.item<double>());
    }
  }
  const double s = scale.item<double>(), t = 100 * thickness_100um.item<double>();
  const double fall = first / last;
  const double err_s = std::abs(s / true_scale - 1), err_t = std::abs(t / true_thickness_um - 1);
  std::printf(
      "loss fell %.3g-fold; scale %.5f (truth %.1f, %.3f%% off), thickness %.3f um (truth %.1f, "
      "%.3f%% off)\n",
      fall, s, true_scale, 100 * err_s, t, true_thickness_um, 100 * err_t);
  const bool ok = fall >= 100 && err_s <= 0.01 && err_t <= 0.01;
  std::printf("%s\n", ok ? "recovered" : "NOT recovered");
  return ok ? 0 : 1;
}
