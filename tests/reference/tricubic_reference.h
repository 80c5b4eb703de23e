// An independent scalar reference for tricubic_interp, written the way
// nanoBragg writes it: polint (one 4-point Lagrange polynomial on absolute
// node coordinates), polin2 (4 + 1 polint), polin3 (4 polin2 + 1 polint, 21
// polint calls), with docs/CONTRACT.md §1's per-point range rules on top. It
// shares no code with the operator.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <string>

namespace nanobragg_test {

inline double polint(const double xa[4], const double ya[4], double x) {
  const double x0 = (x - xa[1]) * (x - xa[2]) * (x - xa[3]) * ya[0] /
                    ((xa[0] - xa[1]) * (xa[0] - xa[2]) * (xa[0] - xa[3]));
  const double x1 = (x - xa[0]) * (x - xa[2]) * (x - xa[3]) * ya[1] /
                    ((xa[1] - xa[0]) * (xa[1] - xa[2]) * (xa[1] - xa[3]));
  const double x2 = (x - xa[0]) * (x - xa[1]) * (x - xa[3]) * ya[2] /
                    ((xa[2] - xa[0]) * (xa[2] - xa[1]) * (xa[2] - xa[3]));
  const double x3 = (x - xa[0]) * (x - xa[1]) * (x - xa[2]) * ya[3] /
                    ((xa[3] - xa[0]) * (xa[3] - xa[1]) * (xa[3] - xa[2]));
  return x0 + x1 + x2 + x3;
}

inline double polin2(const double x1a[4], const double x2a[4], const double ya[4][4], double x1,
                     double x2) {
  double ymtmp[4];
  for (int j = 0; j < 4; ++j) {
    ymtmp[j] = polint(x2a, ya[j], x2);
  }
  return polint(x1a, ymtmp, x1);
}

inline double polin3(const double x1a[4], const double x2a[4], const double x3a[4],
                     const double ya[4][4][4], double x1, double x2, double x3) {
  double ymtmp[4];
  for (int j = 0; j < 4; ++j) {
    ymtmp[j] = polin2(x2a, x3a, ya[j], x2, x3);
  }
  return polint(x1a, ymtmp, x1);
}

// One point by the contract.s rules. `grid` is a CPU float64 tensor [Nh, Nk, Nl].
// The range and the nearest node are decided in double, which is exact for
// coordinates and index_min below 2^52 in magnitude, away from -0.5 by more
// than an ulp: what the tests draw. Beyond that the operators decide in
// integers (tests/python/test_index_exactness.py checks those cases).
inline double tricubic_reference(const at::Tensor& grid, const std::array<int64_t, 3>& index_min,
                                 const std::array<double, 3>& x, double default_value,
                                 const std::string& out_of_range) {
  auto g = grid.accessor<double, 3>();
  bool interpolate = true;
  std::array<int64_t, 3> n{};
  for (int d = 0; d < 3; ++d) {
    if (!std::isfinite(x[d])) {
      return default_value;
    }
    const double lo = static_cast<double>(index_min[d]);
    const double hi = lo + static_cast<double>(grid.size(d) - 1);
    const double f = std::floor(x[d]);
    if (!(lo <= f - 1 && f + 2 <= hi)) {
      interpolate = false;
    } else {
      n[d] = static_cast<int64_t>(f);
    }
  }
  if (interpolate) {
    double xa[3][4];
    double ya[4][4][4];
    for (int d = 0; d < 3; ++d) {
      for (int a = 0; a < 4; ++a) {
        xa[d][a] = static_cast<double>(n[d] - 1 + a);
      }
    }
    for (int a = 0; a < 4; ++a) {
      for (int b = 0; b < 4; ++b) {
        for (int c = 0; c < 4; ++c) {
          ya[a][b][c] = g[n[0] - 1 + a - index_min[0]][n[1] - 1 + b - index_min[1]]
                         [n[2] - 1 + c - index_min[2]];
        }
      }
    }
    return polin3(xa[0], xa[1], xa[2], ya, x[0], x[1], x[2]);
  }
  if (out_of_range == "nearest") {
    int64_t idx[3];
    for (int d = 0; d < 3; ++d) {
      const double m = std::ceil(x[d] - 0.5);  // nanoBragg's rounding
      const double lo = static_cast<double>(index_min[d]);
      if (m < lo || m > lo + static_cast<double>(grid.size(d) - 1)) {
        return default_value;
      }
      idx[d] = static_cast<int64_t>(m) - index_min[d];
    }
    return g[idx[0]][idx[1]][idx[2]];
  }
  return default_value;
}

// The whole [..., 3] tensor, as a flat vector of point values.
inline std::vector<double> tricubic_reference(const at::Tensor& grid, const at::Tensor& hkl,
                                              const std::array<int64_t, 3>& index_min,
                                              double default_value,
                                              const std::string& out_of_range) {
  at::Tensor g = grid.detach().to(at::kCPU, at::kDouble).contiguous();
  at::Tensor h = hkl.detach().to(at::kCPU, at::kDouble).reshape({-1, 3}).contiguous();
  auto acc = h.accessor<double, 2>();
  std::vector<double> out(h.size(0));
  for (int64_t i = 0; i < h.size(0); ++i) {
    out[i] = tricubic_reference(g, index_min, {acc[i][0], acc[i][1], acc[i][2]}, default_value,
                                out_of_range);
  }
  return out;
}

}  // namespace nanobragg_test
