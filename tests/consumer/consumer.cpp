// Calls both operators through the installed package and checks them against
// closed forms: tricubic interpolation reproduces a linear grid exactly, and
// a pixel on the detector normal captures I (1 - exp(-T / att)). The
// thickness is float32 with float64 data (PyTorch's scalar rules).
#include <ATen/ATen.h>
#include <nanobragg_ops/ops.h>

#include <cmath>
#include <cstdio>

int main() {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor idx = at::arange(-4, 5, f64);  // h, k, l = -4..4
  const at::Tensor grid = idx.view({9, 1, 1}) + 2 * idx.view({1, 9, 1}) + 3 * idx.view({1, 1, 9});
  const at::Tensor hkl = at::tensor({0.25, -1.5, 1.75}, f64).view({1, 3});
  const double F = nanobragg_ops::tricubic_interp(grid, hkl, {-4, -4, -4}).item<double>();
  const double F_want = 0.25 - 3.0 + 5.25;

  const at::Tensor image = at::full({2, 2}, 10.0, f64);
  const at::Tensor pixels = at::tensor({0.0, 0.0, 0.1}, f64).expand({2, 2, 3});
  const at::Tensor odet = at::tensor({0.0, 0.0, 1.0}, f64);
  const at::Tensor thickness = at::scalar_tensor(450e-6, at::kFloat);
  const at::Tensor att = at::scalar_tensor(234e-6, f64);
  const double I = nanobragg_ops::detector_absorption(image, pixels, odet, thickness, att, 4, true)
                       .sum()
                       .item<double>();
  const double I_want = 4 * 10.0 * -std::expm1(-static_cast<double>(450e-6f) / 234e-6);

  std::printf("tricubic %.15g (want %.15g)\nabsorption %.15g (want %.15g)\n", F, F_want, I, I_want);
  const bool ok = std::abs(F - F_want) < 1e-12 && std::abs(I - I_want) < 1e-12 * I_want;
  std::printf("%s\n", ok ? "consumer ok" : "consumer MISMATCH");
  return ok ? 0 : 1;
}
