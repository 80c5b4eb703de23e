// The scalar_reference baselines, compiled once per CPU capability with the
// library's flags for it (bench/CMakeLists.txt), so that the fused ops are
// compared with the same loop built the way they are: the ratio measures the
// kernels, not the compiler flags.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "tricubic_reference.h"
#include "workloads.h"

#ifndef CPU_CAPABILITY
#error "compiled once per CPU capability by bench/CMakeLists.txt, never alone"
#endif

namespace nanobragg_bench {
namespace CPU_CAPABILITY {
namespace {

// polint/polin3 are the tests' nanoBragg-style reference
// (tests/reference/tricubic_reference.h): the loop below is that reference, timed.
using nanobragg_test::polin3;

template <typename T>
void tricubic_scalar_loop(const TricubicInputs& in, at::Tensor& out) {
  const at::Tensor g = in.grid.contiguous();
  const at::Tensor x = in.hkl.contiguous();
  const T* grid = g.const_data_ptr<T>();
  const T* hkl = x.const_data_ptr<T>();
  T* o = out.mutable_data_ptr<T>();
  const int64_t nh = g.size(0), nk = g.size(1), nl = g.size(2);
  const int64_t hmin = in.index_min[0], kmin = in.index_min[1], lmin = in.index_min[2];
  at::parallel_for(0, x.size(0), 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double h = hkl[3 * i], k = hkl[3 * i + 1], l = hkl[3 * i + 2];
      const int64_t h0 = static_cast<int64_t>(std::floor(h));
      const int64_t k0 = static_cast<int64_t>(std::floor(k));
      const int64_t l0 = static_cast<int64_t>(std::floor(l));
      if (h0 - 1 < hmin || h0 + 2 > hmin + nh - 1 || k0 - 1 < kmin || k0 + 2 > kmin + nk - 1 ||
          l0 - 1 < lmin || l0 + 2 > lmin + nl - 1) {
        o[i] = T(0);
        continue;
      }
      double ha[4], ka[4], la[4], sub[4][4][4];
      for (int a = 0; a < 4; ++a) {
        ha[a] = double(h0 - 1 + a);
        ka[a] = double(k0 - 1 + a);
        la[a] = double(l0 - 1 + a);
      }
      for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 4; ++b)
          for (int c = 0; c < 4; ++c)
            sub[a][b][c] =
                grid[((h0 - 1 + a - hmin) * nk + (k0 - 1 + b - kmin)) * nl + (l0 - 1 + c - lmin)];
      o[i] = static_cast<T>(polin3(ha, ka, la, sub, h, k, l));
    }
  });
}

template <typename T>
void absorption_scalar_loop(const AbsorptionInputs& in, at::Tensor& out) {
  const at::Tensor I = in.intensity.contiguous();
  const at::Tensor P = in.pixel_coords.contiguous();
  const at::Tensor od = in.odet.to(at::kDouble).contiguous();
  const double o[3] = {od[0].item<double>(), od[1].item<double>(), od[2].item<double>()};
  const double mu = 1.0 / in.attenuation_length.item<double>();
  const double dz = in.thickness.item<double>() / double(in.thicksteps);
  const T* intensity = I.const_data_ptr<T>();
  const T* pos = P.const_data_ptr<T>();
  T* result = out.mutable_data_ptr<T>();
  const int64_t L = in.thicksteps;
  const bool oversample = in.oversample_thick;
  at::parallel_for(0, I.numel(), 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double x = pos[3 * i], y = pos[3 * i + 1], z = pos[3 * i + 2];
      const double r = std::sqrt(x * x + y * y + z * z);
      const double parallax = (o[0] * x + o[1] * y + o[2] * z) / r;
      double capture = 0.0;
      for (int64_t t = 0; t < L; ++t) {
        const double c =
            std::exp(-t * dz * mu / parallax) - std::exp(-(t + 1) * dz * mu / parallax);
        capture = oversample ? capture + c : c;
      }
      result[i] = static_cast<T>(intensity[i] * capture);
    }
  });
}

}  // namespace

at::Tensor tricubic_scalar_reference(const TricubicInputs& in) {
  at::Tensor out = at::empty({in.hkl.size(0)}, in.grid.options());
  AT_DISPATCH_FLOATING_TYPES(in.grid.scalar_type(), "tricubic_scalar_reference",
                             [&] { tricubic_scalar_loop<scalar_t>(in, out); });
  return out;
}

at::Tensor absorption_scalar_reference(const AbsorptionInputs& in) {
  at::Tensor out = at::empty_like(in.intensity);
  AT_DISPATCH_FLOATING_TYPES(in.intensity.scalar_type(), "absorption_scalar_reference",
                             [&] { absorption_scalar_loop<scalar_t>(in, out); });
  return out;
}

}  // namespace CPU_CAPABILITY
}  // namespace nanobragg_bench
