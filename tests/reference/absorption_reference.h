// Independent references for detector_absorption (docs/CONTRACT.md §2), sharing
// no code with the operator:
//  * port_reference: the PyTorch port's formulation, written with ATen ops
//    (broadcast [L, *P] capture fractions, then sum or last value), for
//    per_layer=false;
//  * layer_loop_reference: a plain scalar loop over pixels and layers, for
//    per_layer=true (layer dimension of size L or 1 on either input).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

namespace nanobragg_test {

struct AbsorptionCase {
  at::Tensor intensity, coords, odet, thickness, attenuation_length;
  int64_t thicksteps = 1;
  bool oversample = true;
  bool per_layer = false;
};

inline at::Tensor port_parallax(const at::Tensor& coords, const at::Tensor& odet) {
  at::Tensor dist = coords.norm(2, -1, true).clamp_min(1e-10);
  at::Tensor rho = (coords / dist * odet).sum(-1);
  at::Tensor clamped = at::where(rho < 0, at::full_like(rho, -1e-10), at::full_like(rho, 1e-10));
  return at::where(rho.abs() < 1e-10, clamped, rho);
}

inline at::Tensor port_reference(const AbsorptionCase& c) {
  at::Tensor I = c.intensity.to(at::kCPU, at::kDouble);
  at::Tensor P = c.coords.to(at::kCPU, at::kDouble);
  at::Tensor o = c.odet.to(at::kCPU, at::kDouble);
  const double T = c.thickness.item<double>();
  const double att = c.attenuation_length.item<double>();
  at::Tensor rho = port_parallax(P, o);
  if (T == 0) {
    return I * at::ones_like(rho);  // broadcast to the pixel shape
  }
  const double dz = T / static_cast<double>(c.thicksteps), mu = 1.0 / att;
  std::vector<int64_t> tshape(rho.dim() + 1, 1);
  tshape[0] = c.thicksteps;
  at::Tensor t = at::arange(c.thicksteps, at::kDouble).view(tshape);
  at::Tensor capture = at::exp(-t * dz * mu / rho) - at::exp(-(t + 1) * dz * mu / rho);
  return c.oversample ? I * capture.sum(0) : I * capture[c.thicksteps - 1];
}

inline std::vector<double> layer_loop_reference(const AbsorptionCase& c) {
  const int64_t L = c.thicksteps;
  at::Tensor I = c.intensity.to(at::kCPU, at::kDouble);
  at::Tensor P = c.coords.to(at::kCPU, at::kDouble);
  // Pixel shape P: the broadcast of both inputs without their layer dims.
  std::vector<int64_t> pix = at::infer_size(I.sizes().slice(1), P.sizes().slice(1, P.dim() - 2));
  std::vector<int64_t> ishape = {I.size(0)}, pshape = {P.size(0)};
  ishape.insert(ishape.end(), pix.begin(), pix.end());
  pshape.insert(pshape.end(), pix.begin(), pix.end());
  pshape.push_back(3);
  while (I.dim() < static_cast<int64_t>(ishape.size())) I = I.unsqueeze(1);
  while (P.dim() < static_cast<int64_t>(pshape.size())) P = P.unsqueeze(1);
  I = I.expand(ishape).reshape({ishape[0], -1}).contiguous();
  P = P.expand(pshape).reshape({pshape[0], -1, 3}).contiguous();
  const double o[3] = {c.odet[0].item<double>(), c.odet[1].item<double>(),
                       c.odet[2].item<double>()};
  const double T = c.thickness.item<double>();
  const double mu = 1.0 / c.attenuation_length.item<double>();
  const double dz = T / static_cast<double>(L);
  auto Ia = I.accessor<double, 2>();
  auto Pa = P.accessor<double, 3>();
  std::vector<double> out(static_cast<size_t>(I.size(1)));
  for (int64_t px = 0; px < I.size(1); ++px) {
    double sum = 0.0, mean = 0.0, last = 0.0;
    for (int64_t t = 0; t < L; ++t) {
      const double It = Ia[I.size(0) == 1 ? 0 : t][px];
      const int64_t lp = P.size(0) == 1 ? 0 : t;
      const double x = Pa[lp][px][0], y = Pa[lp][px][1], z = Pa[lp][px][2];
      const double norm = std::max(std::sqrt(x * x + y * y + z * z), 1e-10);
      double rho = (o[0] * x + o[1] * y + o[2] * z) / norm;
      if (std::abs(rho) < 1e-10) rho = rho < 0 ? -1e-10 : 1e-10;
      const double ct = std::exp(-t * dz * mu / rho) - std::exp(-(t + 1) * dz * mu / rho);
      sum += ct * It;
      mean += It / static_cast<double>(L);
      last = ct;
    }
    out[static_cast<size_t>(px)] = T == 0 ? mean : (c.oversample ? sum : last * mean);
  }
  return out;
}

}  // namespace nanobragg_test
