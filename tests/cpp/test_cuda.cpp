// The CUDA kernels from C++: every op of both operators (forward, backward,
// double backward) against the CPU kernels in float64 on several layouts,
// the deterministic and atomic grid gradients, grid-stride loops that
// iterate, CPU 0-dim scalars with CUDA data and a non-default stream.
//
// Every suite has "Cuda" in its name (--gtest_filter='*Cuda*'), and every
// test skips, saying why, where CUDA cannot run; this file compiles in a
// CPU-only build too (CUDA headers only under NANOBRAGG_WITH_CUDA). The
// "CudaSmall" tests are small and fast, for compute-sanitizer (the cases it
// runs: SANITIZE_CASES in scripts/gpu_check.sh).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>
#include <torch/autograd.h>

#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "nanobragg_ops/ops.h"
#include "test_utils.h"

#ifdef NANOBRAGG_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Sleep.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace nanobragg_test {
namespace {

constexpr const char* kTricubic = "nanobragg::tricubic_interp";
constexpr const char* kAbsorption = "nanobragg::detector_absorption";
const std::array<int64_t, 3> kIndexMin = {-5, -6, -4};
const std::array<int64_t, 3> kGridShape = {11, 12, 13};
// CUDA against CPU, float64 (docs/CONTRACT.md, Devices): to kRtol of each
// result's largest entry, and entry by entry to 10 kRtol (expect_close).
constexpr double kRtol = 1e-12;

#define NANOBRAGG_SKIP_UNLESS_CUDA()                   \
  do {                                                 \
    NANOBRAGG_SKIP_UNLESS_DEVICE("cuda", kTricubic);   \
    NANOBRAGG_SKIP_UNLESS_DEVICE("cuda", kAbsorption); \
  } while (0)

using OptT = std::optional<at::Tensor>;
using Tensors = std::vector<at::Tensor>;

// ---------------------------------------------------------------- the ops

Tensors tricubic_backward(const at::Tensor& g, const at::Tensor& grid, const at::Tensor& hkl,
                          const std::string& mode, std::array<bool, 2> mask = {true, true}) {
  const auto& op = tricubic_backward_op();
  auto r = op.call(g, grid, hkl, kIndexMin, mode, mask);
  return {std::get<0>(r), std::get<1>(r)};
}

Tensors tricubic_double_backward(const OptT& gg_grid, const OptT& gg_hkl, const at::Tensor& g,
                                 const at::Tensor& grid, const at::Tensor& hkl,
                                 const std::string& mode,
                                 std::array<bool, 3> mask = {true, true, true}) {
  const auto& op = tricubic_double_backward_op();
  auto r = op.call(gg_grid, gg_hkl, g, grid, hkl, kIndexMin, mode, mask);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

struct Absorption {
  at::Tensor intensity, coords, odet, thickness, att;
  int64_t layers = 3;
  bool oversample = true, per_layer = false;

  Absorption to(const c10::Device& device) const {
    Absorption a = *this;
    for (at::Tensor* t : {&a.intensity, &a.coords, &a.odet, &a.thickness, &a.att}) {
      *t = t->to(device);
    }
    return a;
  }
  at::Tensor forward() const {
    return nanobragg_ops::detector_absorption(intensity, coords, odet, thickness, att, layers,
                                              oversample, per_layer);
  }
  Tensors backward(const at::Tensor& g) const {
    const auto& op = absorption_backward_op();
    auto r = op.call(g, intensity, coords, odet, thickness, att, layers, oversample, per_layer,
                     {true, true, true, true, true});
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r)};
  }
  Tensors double_backward(const Tensors& c, const at::Tensor& g) const {
    const auto& op = absorption_double_backward_op();
    auto r =
        op.call(c.at(0), c.at(1), c.at(2), c.at(3), c.at(4), g, intensity, coords, odet, thickness,
                att, layers, oversample, per_layer, {true, true, true, true, true, true});
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r),
            std::get<3>(r), std::get<4>(r), std::get<5>(r)};
  }
};

// ---------------------------------------------------------------- metrics

// max |a - e| / max(|e|, floor_frac max|e|) over the entries where e is
// finite, after both are moved to CPU float64; +inf when the shapes differ or
// NaN or infinite entries are not at the same places (with the same signs).
double scaled_error(const at::Tensor& actual, const at::Tensor& expected, double floor_frac,
                    std::string* why) {
  const at::Tensor a = actual.detach().to(at::kCPU, at::kDouble).contiguous();
  const at::Tensor e = expected.detach().to(at::kCPU, at::kDouble).contiguous();
  std::ostringstream msg;
  if (a.sizes() != e.sizes()) {
    msg << "shape " << a.sizes() << " != expected " << e.sizes();
    *why = msg.str();
    return INFINITY;
  }
  const std::vector<double> av = to_vector(a), ev = to_vector(e);
  double scale = 0.0;
  for (double x : ev) {
    if (std::isfinite(x)) scale = std::max(scale, std::abs(x));
  }
  double worst = 0.0;
  for (size_t i = 0; i < ev.size(); ++i) {
    if (std::isnan(ev[i]) || std::isnan(av[i]) || std::isinf(ev[i]) || std::isinf(av[i])) {
      const bool same = (std::isnan(ev[i]) && std::isnan(av[i])) || (av[i] == ev[i]);
      if (!same) {
        msg << "entry " << i << ": " << av[i] << ", expected " << ev[i];
        *why = msg.str();
        return INFINITY;
      }
      continue;
    }
    const double denom = std::max(std::abs(ev[i]), floor_frac * scale);
    const double err = denom > 0 ? std::abs(av[i] - ev[i]) / denom : std::abs(av[i]);
    if (err > worst) {
      worst = err;
      msg.str("");
      msg << "worst at entry " << i << ": " << av[i] << ", expected " << ev[i]
          << " (max |expected| " << scale << ")";
    }
  }
  *why = msg.str();
  return worst;
}

// Within tol of the largest expected entry, and entry by entry within 10 tol
// (down to 1e-3 of the largest): a sum over many points, such as a grid
// gradient, is added in another order on each device, which moves a small
// entry by more than tol of itself.
void expect_close(const at::Tensor& actual, const at::Tensor& expected, double tol,
                  const std::string& what) {
  std::string why;
  EXPECT_LE(scaled_error(actual, expected, 1.0, &why), tol) << what << ": " << why;
  EXPECT_LE(scaled_error(actual, expected, 1e-3, &why), 10 * tol)
      << what << " (entry by entry): " << why;
}

void expect_all_close(const Tensors& actual, const Tensors& expected, double tol,
                      const std::string& what) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  for (size_t i = 0; i < actual.size(); ++i) {
    expect_close(actual[i], expected[i], tol, what + " [result " + std::to_string(i) + "]");
  }
}

at::TensorOptions f64() {
  return at::TensorOptions().dtype(at::kDouble);
}
const c10::Device kCuda("cuda");
const c10::Device kCpu("cpu");

// ---------------------------------------------------------------- inputs

at::Tensor tricubic_grid() {
  return at::rand({kGridShape[0], kGridShape[1], kGridShape[2]}, f64()) * 9 + 1;
}

// [n, 3] points over the grid and a margin past it; the first n/10 leave it
// on h (half of them within the nearest node range); with `special`, rows of
// NaN, +-Inf, 1e30, integers and the first/last valid stencil positions.
at::Tensor tricubic_points(int64_t n, bool special) {
  at::Tensor hkl = at::empty({n, 3}, f64());
  for (int d = 0; d < 3; ++d) {
    hkl.select(1, d).copy_(at::rand({n}, f64()) * double(kGridShape[d] - 2) + double(kIndexMin[d]) +
                           0.5);
  }
  const int64_t outside = n / 10;
  const double h_last = double(kIndexMin[0] + kGridShape[0] - 1);
  hkl.slice(0, 0, outside).select(1, 0).add_(double(kGridShape[0]) - 0.5);
  hkl.slice(0, 0, outside / 2).select(1, 0).fill_(h_last - 0.2);
  if (special && n >= 10) {
    const double inf = std::numeric_limits<double>::infinity();
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const double lo0 = double(kIndexMin[0]), lo1 = double(kIndexMin[1]), lo2 = double(kIndexMin[2]);
    // the stencil n-1..n+2 fits while n <= lo + size - 3
    const double fit0 = lo0 + double(kGridShape[0]) - 3;
    const std::vector<std::array<double, 3>> rows = {{nan, 0.3, 0.2},
                                                     {0.1, inf, 0.2},
                                                     {0.1, 0.3, -inf},
                                                     {1e30, 0.3, 0.2},
                                                     {0.1, -1e30, 0.2},
                                                     {-2.0, 0.0, 1.0},
                                                     {lo0 + 1, lo1 + 1, lo2 + 1},
                                                     {fit0, 0.5, 0.5},
                                                     {fit0 + 1 - 1e-7, 0.5, 0.5},
                                                     {fit0 + 1, 0.5, 0.5}};
    for (size_t i = 0; i < rows.size(); ++i) {
      for (int d = 0; d < 3; ++d) hkl[static_cast<int64_t>(i)][d] = rows[i][static_cast<size_t>(d)];
    }
  }
  return hkl;
}

enum class Layout { Contiguous, Strided, Expanded };
const char* layout_name(Layout l) {
  return l == Layout::Contiguous ? "contiguous" : l == Layout::Strided ? "strided" : "expanded";
}

// A tricubic case on a device: every tensor derived from the same CPU data.
struct TricubicCase {
  at::Tensor grid, hkl, g, G, V;  // inputs, output cotangent, (grad_grid, grad_hkl) cotangents
};

TricubicCase tricubic_case(const TricubicCase& base, Layout layout, const c10::Device& dev) {
  TricubicCase c;
  const int64_t n = base.hkl.size(0);
  switch (layout) {
    case Layout::Contiguous:
      c = {base.grid.to(dev), base.hkl.to(dev), base.g.to(dev), base.G.to(dev), base.V.to(dev)};
      break;
    case Layout::Strided: {
      c.grid = base.grid.permute({2, 1, 0}).contiguous().to(dev).permute({2, 1, 0});
      at::Tensor wide = at::zeros({n, 7}, f64());
      wide.slice(1, 1, 7, 2).copy_(base.hkl);
      c.hkl = wide.to(dev).slice(1, 1, 7, 2);
      c.g = at::stack({base.g, base.g}, 1).to(dev).select(1, 1);
      c.G = base.G.transpose(0, 1).contiguous().to(dev).transpose(0, 1);
      c.V = base.V.t().contiguous().to(dev).t();
      break;
    }
    case Layout::Expanded:
      c.grid = base.grid.to(dev);
      // one point, stride 0, inside the grid: near its middle
      c.hkl = at::tensor(
                  {kIndexMin[0] + kGridShape[0] / 2 + 0.37, kIndexMin[1] + kGridShape[1] / 2 - 0.21,
                   kIndexMin[2] + kGridShape[2] / 2 + 0.13},
                  f64())
                  .view({1, 3})
                  .to(dev)
                  .expand({n, 3});
      c.g = at::ones({}, f64()).to(dev).expand({n});  // out.sum().backward()
      c.G = base.G.to(dev);
      c.V = base.V.slice(0, n - 1, n).to(dev).expand({n, 3});
      break;
  }
  return c;
}

// forward, backward (both), double backward (all three) of a case.
Tensors tricubic_all_ops(const TricubicCase& c, const std::string& mode) {
  Tensors r = {nanobragg_ops::tricubic_interp(c.grid, c.hkl, kIndexMin, -1.5, mode)};
  for (const auto& t : tricubic_backward(c.g, c.grid, c.hkl, mode)) r.push_back(t);
  for (const auto& t : tricubic_double_backward(c.G, c.V, c.g, c.grid, c.hkl, mode)) r.push_back(t);
  return r;
}

TricubicCase tricubic_base(int64_t n, bool special) {
  return {tricubic_grid(), tricubic_points(n, special), at::randn({n}, f64()),
          at::randn({kGridShape[0], kGridShape[1], kGridShape[2]}, f64()),
          at::randn({n, 3}, f64())};
}

// A detector plane at z = 0.1, pixels over +-0.05, jittered; with per_layer
// a leading layer dimension of size `layers` (each layer a little deeper).
Absorption absorption_base(int64_t S, int64_t F, int64_t layers, bool oversample, bool per_layer) {
  Absorption a;
  a.layers = layers;
  a.oversample = oversample;
  a.per_layer = per_layer;
  at::Tensor y = at::linspace(-0.05, 0.05, S, f64()).view({S, 1}).expand({S, F});
  at::Tensor x = at::linspace(-0.05, 0.05, F, f64()).view({1, F}).expand({S, F});
  at::Tensor p = at::stack({x, y, at::full({S, F}, 0.1, f64())}, -1);
  if (per_layer) {
    p = p.unsqueeze(0).repeat({layers, 1, 1, 1});
    p.select(-1, 2).add_(at::arange(layers, f64()).view({layers, 1, 1}) * 1e-4);
  }
  a.coords = (p + 2e-3 * (at::rand(p.sizes(), f64()) - 0.5)).contiguous();
  a.intensity = per_layer ? at::rand({layers, S, F}, f64()) + 0.5 : at::rand({S, F}, f64()) + 0.5;
  at::Tensor o = at::tensor({0.1, -0.05, 1.0}, f64());
  a.odet = o / o.norm();
  a.thickness = at::scalar_tensor(450e-6, f64());
  a.att = at::scalar_tensor(234e-6, f64());
  return a;
}

// The same case in a layout, on a device.
Absorption absorption_layout(const Absorption& base, Layout layout, const c10::Device& dev) {
  Absorption a = base.to(dev);
  if (layout == Layout::Strided) {
    a.intensity = base.intensity.transpose(-1, -2).contiguous().to(dev).transpose(-1, -2);
    std::vector<int64_t> wide_shape = base.coords.sizes().vec();
    wide_shape.back() = 8;
    at::Tensor wide = at::zeros(wide_shape, f64());
    wide.slice(-1, 0, 6, 2).copy_(base.coords);
    a.coords = wide.to(dev).slice(-1, 0, 6, 2);
  } else if (layout == Layout::Expanded) {
    const int64_t d = base.intensity.dim();
    a.intensity = base.intensity.slice(d - 2, 0, 1).to(dev).expand(base.intensity.sizes());
    a.coords = base.coords.slice(-2, 0, 1).to(dev).expand(base.coords.sizes());
  }
  return a;
}

// forward, backward (5), double backward (6) with fixed cotangents.
Tensors absorption_all_ops(const Absorption& a, const at::Tensor& g, const Tensors& c) {
  Tensors r = {a.forward()};
  for (const auto& t : a.backward(g)) r.push_back(t);
  for (const auto& t : a.double_backward(c, g)) r.push_back(t);
  return r;
}

Tensors absorption_cotangents(const Absorption& a) {
  return {at::randn(a.intensity.sizes(), f64()), at::randn(a.coords.sizes(), f64()),
          at::randn({3}, f64()), at::randn({}, f64()), at::randn({}, f64())};
}

Tensors to_device(const Tensors& ts, const c10::Device& dev) {
  Tensors r;
  for (const auto& t : ts) r.push_back(t.to(dev));
  return r;
}

int64_t resident_threads() {
#ifdef NANOBRAGG_WITH_CUDA
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  return int64_t(props->multiProcessorCount) * int64_t(props->maxThreadsPerMultiProcessor);
#else
  return 0;  // unreachable: every test skips in a CPU-only build
#endif
}

// ---------------------------------------------------------------- small (sanitizer) cases

TEST(CudaSmall, TricubicForwardBackward) {
  NANOBRAGG_SKIP_UNLESS_CUDA();
  at::manual_seed(1);
  const TricubicCase base = tricubic_base(64, true);
  for (const std::string mode : {"default", "nearest"}) {
    const TricubicCase cu = tricubic_case(base, Layout::Contiguous, kCuda);
    Tensors got = {nanobragg_ops::tricubic_interp(cu.grid, cu.hkl, kIndexMin, -1.5, mode)};
    Tensors want = {nanobragg_ops::tricubic_interp(base.grid, base.hkl, kIndexMin, -1.5, mode)};
    for (const auto& t : tricubic_backward(cu.g, cu.grid, cu.hkl, mode)) got.push_back(t);
    for (const auto& t : tricubic_backward(base.g, base.grid, base.hkl, mode)) want.push_back(t);
    ASSERT_TRUE(got[0].is_cuda() && got[1].is_cuda() && got[2].is_cuda()) << mode;
    expect_all_close(got, want, kRtol, "tricubic small " + mode);
    EXPECT_GT(want[1].abs().sum().item<double>(), 0.0);
  }
}

TEST(CudaSmall, AbsorptionForwardBackward) {
  NANOBRAGG_SKIP_UNLESS_CUDA();
  at::manual_seed(2);
  for (bool per_layer : {false, true}) {
    for (bool oversample : {true, false}) {
      const Absorption cpu = absorption_base(5, 7, 3, oversample, per_layer);
      const Absorption cu = cpu.to(kCuda);
      const at::Tensor g = at::randn({5, 7}, f64());
      Tensors got = {cu.forward()}, want = {cpu.forward()};
      for (const auto& t : cu.backward(g.to(kCuda))) got.push_back(t);
      for (const auto& t : cpu.backward(g)) want.push_back(t);
      ASSERT_TRUE(got[0].is_cuda());
      expect_all_close(got, want, kRtol,
                       "absorption small per_layer=" + std::to_string(per_layer) +
                           " oversample=" + std::to_string(oversample));
    }
  }
}

TEST(CudaSmall, DeterministicGridGradient) {
  NANOBRAGG_SKIP_UNLESS_CUDA();
  at::manual_seed(3);
  // 4096 points on a 6x6x6 grid: every node takes many atomics.
  at::Tensor grid = at::rand({6, 6, 6}, f64());
  at::Tensor hkl = at::rand({4096, 3}, f64()) * 7 + at::tensor({-6.0, -7.0, -5.0}, f64());
  at::Tensor g = at::randn({4096}, f64());
  at::Tensor v = at::randn({4096, 3}, f64());
  const at::Tensor ref1 = tricubic_backward(g, grid, hkl, "nearest", {true, false})[0];
  const at::Tensor ref2 =
      tricubic_double_backward(std::nullopt, v, g, grid, hkl, "nearest", {false, true, false})[1];
  at::Tensor cg = grid.to(kCuda), ch = hkl.to(kCuda), cgo = g.to(kCuda), cv = v.to(kCuda);
  Tensors atomic, det1, det2;
  auto run = [&](Tensors& out) {
    out.push_back(tricubic_backward(cgo, cg, ch, "nearest", {true, false})[0]);
    out.push_back(tricubic_double_backward(std::nullopt, cv, cgo, cg, ch, "nearest",
                                           {false, true, false})[1]);
  };
  {
    DeterministicScope det(false);
    run(atomic);
  }
  {
    DeterministicScope det(true);
    run(det1);
    run(det2);
  }
  for (size_t order = 0; order < 2; ++order) {
    const std::string what = "order " + std::to_string(order + 1);
    EXPECT_TRUE(bitwise_equal(det1[order], det2[order]))
        << what << ": deterministic path not repeatable";
    expect_close(det1[order], atomic[order], 1e-12, what + " deterministic vs atomic");
    expect_close(det1[order], order == 0 ? ref1 : ref2, 1e-12, what + " deterministic vs CPU");
    expect_close(atomic[order], order == 0 ? ref1 : ref2, 1e-12, what + " atomic vs CPU");
  }
  EXPECT_GT(ref1.abs().sum().item<double>(), 1.0);
  EXPECT_GT(ref2.abs().sum().item<double>(), 1.0);
}

TEST(CudaSmall, DoubleBackward) {
  NANOBRAGG_SKIP_UNLESS_CUDA();
  at::manual_seed(4);
  const TricubicCase base = tricubic_base(48, false);
  for (const std::string mode : {"default", "nearest"}) {
    const TricubicCase cu = tricubic_case(base, Layout::Contiguous, kCuda);
    expect_all_close(tricubic_double_backward(cu.G, cu.V, cu.g, cu.grid, cu.hkl, mode),
                     tricubic_double_backward(base.G, base.V, base.g, base.grid, base.hkl, mode),
                     kRtol, "tricubic double backward " + mode);
  }
  const Absorption cpu = absorption_base(4, 6, 3, true, false);
  const at::Tensor g = at::randn({4, 6}, f64());
  const Tensors c = absorption_cotangents(cpu);
  expect_all_close(cpu.to(kCuda).double_backward(to_device(c, kCuda), g.to(kCuda)),
                   cpu.double_backward(c, g), kRtol, "absorption double backward");
}

// index_min at the int64 limits, and coordinates that overflow any index:
// every lookup gives the default, none reads outside the grid (a stray read
// on the GPU rarely faults; compute-sanitizer's memcheck runs this case).
TEST(CudaSmall, IndexMinNearInt64LimitsNeverReadsOutOfBounds) {
  NANOBRAGG_SKIP_UNLESS_CUDA();
  at::manual_seed(5);
  const int64_t big = std::numeric_limits<int64_t>::max();
  const int64_t small = std::numeric_limits<int64_t>::min();
  const at::Tensor grid = (at::rand({5, 5, 5}, f64()) * 9 + 1).to(kCuda);
  const at::Tensor hkl =
      at::tensor({0.5, 0.5, 0.5, 1e19, -1e19, 9.2e18, -9.2e18, 3.0, 2.0}, f64()).view({3, 3});
  const at::Tensor chkl = hkl.to(kCuda);
  const at::Tensor g = at::ones({3}, f64()).to(kCuda);
  const std::vector<std::array<int64_t, 3>> mins = {
      {big - 2, big - 2, big - 2}, {small, small, small}, {big, small, 0}};
  for (const auto& lo : mins) {
    for (const std::string mode : {"default", "nearest"}) {
      const at::Tensor out = nanobragg_ops::tricubic_interp(grid, chkl, lo, -3.0, mode).cpu();
      EXPECT_TRUE(at::equal(out, at::full({3}, -3.0, f64())))
          << lo[0] << " " << lo[1] << " " << lo[2] << " " << mode << ": " << out;
      auto r = tricubic_backward_op().call(g, grid, chkl, lo, mode, {true, true});
      EXPECT_EQ(std::get<0>(r).abs().max().item<double>(), 0.0) << mode;
      EXPECT_EQ(std::get<1>(r).abs().max().item<double>(), 0.0) << mode;
    }
  }
}

// ---------------------------------------------------------------- parity on layouts

TEST(CudaParity, TricubicAllOpsMatchCpuOnLayouts) {
  NANOBRAGG_SKIP_UNLESS_CUDA();
  at::manual_seed(10);
  const TricubicCase base = tricubic_base(300, true);
  for (Layout layout : {Layout::Contiguous, Layout::Strided, Layout::Expanded}) {
    for (const std::string mode : {"default", "nearest"}) {
      const Tensors want = tricubic_all_ops(tricubic_case(base, layout, kCpu), mode);
      const TricubicCase cu = tricubic_case(base, layout, kCuda);
      if (layout == Layout::Strided) {
        ASSERT_FALSE(cu.grid.is_contiguous() || cu.hkl.is_contiguous() || cu.g.is_contiguous());
      }
      expect_all_close(tricubic_all_ops(cu, mode), want, kRtol,
                       std::string("tricubic ") + layout_name(layout) + " " + mode);
    }
  }
}

TEST(CudaParity, AbsorptionAllOpsMatchCpuOnLayouts) {
  NANOBRAGG_SKIP_UNLESS_CUDA();
  at::manual_seed(11);
  for (Layout layout : {Layout::Contiguous, Layout::Strided, Layout::Expanded}) {
    for (bool per_layer : {false, true}) {
      for (bool oversample : {true, false}) {
        const Absorption base = absorption_base(6, 7, 3, oversample, per_layer);
        const at::Tensor g = at::randn({6, 7}, f64());
        const Tensors c = absorption_cotangents(base);
        const Tensors want = absorption_all_ops(absorption_layout(base, layout, kCpu), g, c);
        const Tensors got = absorption_all_ops(absorption_layout(base, layout, kCuda), g.to(kCuda),
                                               to_device(c, kCuda));
        expect_all_close(got, want, kRtol,
                         std::string("absorption ") + layout_name(layout) +
                             " per_layer=" + std::to_string(per_layer) +
                             " oversample=" + std::to_string(oversample));
      }
    }
  }
}

TEST(CudaParity, AbsorptionEdgeValuesMatchCpu) {
  NANOBRAGG_SKIP_UNLESS_CUDA();
  at::manual_seed(12);
  const double inf = std::numeric_limits<double>::infinity();
  // NaN/Inf pixels and grazing pixels in separate images: a NaN pixel makes
  // the summed odet, thickness and attenuation gradients NaN, which would
  // leave the grazing pixels compared only as NaN == NaN.
  for (int edge = 0; edge < 4; ++edge) {
    for (bool per_layer : {false, true}) {
      for (bool oversample : {true, false}) {
        Absorption base = absorption_base(5, 6, 4, oversample, per_layer);
        at::Tensor fi = base.intensity.view({-1}), fp = base.coords.view({-1, 3});
        std::string what;
        if (edge == 0) {
          base.thickness = at::scalar_tensor(0.0, f64());
          what = "thickness 0";
        } else if (edge == 1) {
          base.att = at::scalar_tensor(inf, f64());
          what = "attenuation_length inf";
        } else if (edge == 2) {
          fp[0][0] = std::numeric_limits<double>::quiet_NaN();
          fi[1] = std::numeric_limits<double>::quiet_NaN();
          fi[2] = inf;
          fi[5] = -inf;
          what = "NaN/Inf";
        } else {
          // grazing: a pixel perpendicular to odet (odet x e_x, 0.1 long), so
          // that the parallax reaches its clamp through the per-layer path;
          // 1e-14 along odet puts it on the + side, far above the rounding
          // of the dot product (1e-19), whose sign depends on how the
          // compiler fuses it: -1e-10 would make the output -inf.
          const at::Tensor o = base.odet;
          const at::Tensor across = at::stack({at::zeros({}, f64()), o[2], -o[1]});
          fp[3] = across * (0.1 / across.norm().item<double>()) + o * 1e-14;
          ASSERT_LT(std::abs((fp[3] * o).sum().item<double>()) / 0.1, 1e-10) << "not grazing";
          fp[4].zero_();  // the sample position
          what = "grazing";
        }
        what +=
            " per_layer=" + std::to_string(per_layer) + " oversample=" + std::to_string(oversample);
        const at::Tensor g = at::randn({5, 6}, f64());
        const Tensors c = absorption_cotangents(base);
        const Tensors want = absorption_all_ops(base, g, c);
        expect_all_close(absorption_all_ops(base.to(kCuda), g.to(kCuda), to_device(c, kCuda)), want,
                         kRtol, what);
        if (edge == 3) {
          // compared as numbers: every result finite, and the summed odet,
          // thickness and attenuation gradients (both orders) nonzero
          for (size_t i = 0; i < want.size(); ++i) {
            EXPECT_TRUE(at::isfinite(want[i]).all().item<bool>()) << what << " result " << i;
          }
          for (size_t i : {3, 4, 5, 9, 10, 11}) {
            EXPECT_GT(want[i].abs().sum().item<double>(), 0.0) << what << " result " << i;
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------- grid gradient paths

TEST(CudaDeterminism, ContendedGridGradientDeterministicVsAtomic) {
  NANOBRAGG_SKIP_UNLESS_CUDA();
  at::manual_seed(20);
  const int64_t n = 200000;
  const at::Tensor grid = tricubic_grid(), hkl = tricubic_points(n, false);
  const at::Tensor g = at::randn({n}, f64()), v = at::randn({n, 3}, f64());
  for (auto dtype : {at::kFloat, at::kDouble}) {
    const auto o = at::TensorOptions().device(kCuda).dtype(dtype);
    const at::Tensor cg = grid.to(o), ch = hkl.to(o), cgo = g.to(o), cv = v.to(o);
    // The float64 reference takes the values the GPU gets: a coordinate
    // rounded to float32 can cross a half-integer and move its point to the
    // next nearest node.
    auto host = [](const at::Tensor& t) { return t.to(at::kCPU).to(at::kDouble); };
    const Tensors ref = {
        tricubic_backward(host(cgo), host(cg), host(ch), "nearest", {true, false})[0],
        tricubic_double_backward(std::nullopt, host(cv), host(cgo), host(cg), host(ch), "nearest",
                                 {false, true, false})[1]};
    auto run = [&] {
      return Tensors{tricubic_backward(cgo, cg, ch, "nearest", {true, false})[0],
                     tricubic_double_backward(std::nullopt, cv, cgo, cg, ch, "nearest",
                                              {false, true, false})[1]};
    };
    Tensors atomic, d1, d2;
    {
      DeterministicScope det(false);
      atomic = run();
    }
    {
      DeterministicScope det(true);
      d1 = run();
      d2 = run();
    }
    const double tol = dtype == at::kFloat ? 1e-4 : 1e-12;
    for (size_t order = 0; order < 2; ++order) {
      const std::string what =
          std::string(c10::toString(dtype)) + " order " + std::to_string(order + 1);
      EXPECT_TRUE(bitwise_equal(d1[order], d2[order]))
          << what << ": deterministic path not repeatable";
      // relative to the largest node (floor 1 of the scale): float32 sums of
      // thousands of terms per node
      EXPECT_LE(max_rel_error(to_vector(d1[order]), to_vector(atomic[order]),
                              ref[order].abs().max().item<double>()),
                tol)
          << what << " deterministic vs atomic";
      EXPECT_LE(max_rel_error(to_vector(d1[order]), to_vector(ref[order]),
                              ref[order].abs().max().item<double>()),
                tol)
          << what << " deterministic vs CPU float64";
      EXPECT_LE(max_rel_error(to_vector(atomic[order]), to_vector(ref[order]),
                              ref[order].abs().max().item<double>()),
                tol)
          << what << " atomic vs CPU float64";
    }
  }
}

// The atomic path sums the taps of a warp's points that share a stencil
// start before adding them (tricubic_cuda.cu, grid_grad_atomic_kernel): up
// to 8 shared starts per warp, the rest point by point. Points laid out so
// that warps see each case: all 32 in one cell, 4 cells in turn, 16 cells of
// 2 points each (8 rounds, then the rest alone), every point its own cell,
// and warps mixing stencil points with nearest and out-of-grid ones; a last
// warp only partly filled; a NaN and an Inf incoming gradient among them;
// more points than the device's resident threads (warps loop). Against the
// CPU kernel in float64, in both out_of_range modes and both dtypes.
TEST(CudaDeterminism, WarpAggregatedGridGradientMatchesCpu) {
  NANOBRAGG_SKIP_UNLESS_CUDA();
  at::manual_seed(23);
  const int64_t warp = 32, warps_per_case = 2048;  // 5 cases: 327 680 points, + 19
  // [m] cell numbers -> [m, 3] stencil starts inside the grid (n - 1 in
  // [0, size - 4] per axis; multipliers 3, 5, 7 coprime with the spans 8, 9,
  // 10, so every start of each axis occurs)
  auto cell_corner = [&](const at::Tensor& cell_index) {
    at::Tensor c = at::empty({cell_index.size(0), 3}, f64());
    for (int d = 0; d < 3; ++d) {
      const int64_t span = kGridShape[d] - 3;
      c.select(1, d).copy_((cell_index * (2 * d + 3)).remainder(span).to(at::kDouble) + 1 +
                           double(kIndexMin[d]));
    }
    return c;
  };
  std::vector<at::Tensor> parts;
  const int64_t m = warp * warps_per_case;
  const at::Tensor i = at::arange(m, at::TensorOptions().dtype(at::kLong));
  const at::Tensor warp_of = at::floor_divide(i, warp);
  parts.push_back(cell_corner(warp_of));                       // one cell a warp
  parts.push_back(cell_corner(warp_of * 7 + i.remainder(4)));  // 4 in turn
  parts.push_back(cell_corner(warp_of * 5 + at::floor_divide(i.remainder(warp), 2)));  // 16 of 2
  parts.push_back(cell_corner(i));          // each its own
  at::Tensor mixed = cell_corner(warp_of);  // one cell, and
  mixed.slice(0, 0, m, 3).select(1, 0).fill_(double(kIndexMin[0] + kGridShape[0]) + 5);  // out
  mixed.slice(0, 1, m, 5).select(1, 0).fill_(double(kIndexMin[0]) + 0.25);  // nearest range
  parts.push_back(mixed);
  parts.push_back(cell_corner(at::full({19}, 11, at::TensorOptions().dtype(at::kLong))));  // tail
  at::Tensor hkl = at::cat(parts);
  hkl = hkl + at::rand(hkl.sizes(), f64()) * 0.999;  // fractional offsets in the cell
  const int64_t n = hkl.size(0);
  const at::Tensor grid = tricubic_grid();
  at::Tensor g = at::randn({n}, f64());
  g[5] = std::numeric_limits<double>::quiet_NaN();      // in a one-cell warp: its 64 nodes NaN
  g[m + 40] = std::numeric_limits<double>::infinity();  // in a 4-cell warp
  for (const char* mode : {"default", "nearest"}) {
    for (auto dtype : {at::kFloat, at::kDouble}) {
      const auto o = at::TensorOptions().device(kCuda).dtype(dtype);
      const at::Tensor cg = grid.to(o), ch = hkl.to(o), cgo = g.to(o);
      auto host = [](const at::Tensor& t) { return t.to(at::kCPU).to(at::kDouble); };
      const at::Tensor ref =
          tricubic_backward(host(cgo), host(cg), host(ch), mode, {true, false})[0];
      at::Tensor got;
      {
        DeterministicScope det(false);
        got = host(tricubic_backward(cgo, cg, ch, mode, {true, false})[0]);
      }
      const std::string what = std::string(mode) + " " + c10::toString(dtype);
      // Non-finite nodes where the CPU has them, and of the same kind.
      EXPECT_TRUE(at::equal(at::isnan(got), at::isnan(ref))) << what;
      EXPECT_TRUE(at::equal(at::isinf(got), at::isinf(ref))) << what;
      EXPECT_GT(at::isnan(ref).sum().item<int64_t>(), 0) << what;
      const at::Tensor finite = at::isfinite(ref);
      const at::Tensor want = ref.masked_select(finite), have = got.masked_select(finite);
      const double tol = dtype == at::kFloat ? 2e-5 : 1e-12;
      EXPECT_LE(max_rel_error(to_vector(have), to_vector(want), want.abs().max().item<double>()),
                tol)
          << what;
      EXPECT_GT(want.abs().sum().item<double>(), 1.0) << what;
    }
  }
}

// The deterministic path's piece table (tricubic_math.h, steps 4 and 5):
// stencil runs of 31, 32 (the shortest long piece), 538, 941, 1023, 1024,
// 1025, 5000 and 150 000 points (148 pieces of one run: each lane of a
// node's warp reads several table rows), each in a cell of its own, in
// shuffled point order; laid out so that the 150 000 end 10 points into a
// 1024-position span and the 1023 ... 5000 start 10 or 11 before one ends
// (short first and last pieces of cut runs). In "nearest" mode 3072 more
// points nearest one corner node sort first (three long nearest pieces, the
// rest shifted by whole spans); 100 outside the grid. Against the CPU in
// float64, first and second order, both dtypes, and bitwise repeatable.
TEST(CudaDeterminism, RunsCutIntoPiecesMatchCpu) {
  NANOBRAGG_SKIP_UNLESS_CUDA();
  at::manual_seed(24);
  const std::vector<int64_t> lengths = {538, 31, 32, 941, 1023, 1024, 1025, 5000, 150000};
  std::vector<at::Tensor> parts;
  const int64_t span0 = kGridShape[0] - 3;
  for (size_t j = 0; j < lengths.size(); ++j) {
    const int64_t c = static_cast<int64_t>(j);
    const at::Tensor corner =
        at::tensor({double(kIndexMin[0] + 1 + c % span0), double(kIndexMin[1] + 1 + c / span0),
                    double(kIndexMin[2] + 2)},
                   f64());
    parts.push_back(corner + at::rand({lengths[j], 3}, f64()) * 0.999);
  }
  const at::Tensor lo =
      at::tensor({double(kIndexMin[0]), double(kIndexMin[1]), double(kIndexMin[2])}, f64());
  parts.push_back(lo + at::rand({3072, 3}, f64()) * 0.4);  // nearest node 0
  parts.push_back(lo - 50.0 + at::rand({100, 3}, f64()));  // outside
  at::Tensor hkl = at::cat(parts);
  hkl = hkl.index_select(0, at::randperm(hkl.size(0), at::TensorOptions().dtype(at::kLong)))
            .contiguous();
  const int64_t n = hkl.size(0);
  const at::Tensor grid = tricubic_grid();
  const at::Tensor g = at::randn({n}, f64()), v = at::randn({n, 3}, f64());
  DeterministicScope det(true);
  for (const std::string mode : {"default", "nearest"}) {
    for (auto dtype : {at::kFloat, at::kDouble}) {
      const auto o = at::TensorOptions().device(kCuda).dtype(dtype);
      const at::Tensor cg = grid.to(o), ch = hkl.to(o), cgo = g.to(o), cv = v.to(o);
      auto host = [](const at::Tensor& t) { return t.to(at::kCPU).to(at::kDouble); };
      const Tensors ref = {tricubic_backward(host(cgo), host(cg), host(ch), mode, {true, false})[0],
                           tricubic_double_backward(std::nullopt, host(cv), host(cgo), host(cg),
                                                    host(ch), mode, {false, true, false})[1]};
      auto run = [&] {
        return Tensors{
            tricubic_backward(cgo, cg, ch, mode, {true, false})[0],
            tricubic_double_backward(std::nullopt, cv, cgo, cg, ch, mode, {false, true, false})[1]};
      };
      const Tensors d1 = run(), d2 = run();
      const double tol = dtype == at::kFloat ? 1e-4 : 1e-12;
      for (size_t order = 0; order < 2; ++order) {
        const std::string what =
            mode + " " + c10::toString(dtype) + " order " + std::to_string(order + 1);
        EXPECT_TRUE(bitwise_equal(d1[order], d2[order])) << what << ": not repeatable";
        const double scale = ref[order].abs().max().item<double>();
        EXPECT_GT(scale, 1.0) << what;
        EXPECT_LE(max_rel_error(to_vector(host(d1[order])), to_vector(ref[order]), scale), tol)
            << what;
      }
    }
  }
}

TEST(CudaDeterminism, AutogradGridGradientRepeatsBitwiseUnderDeterministicAlgorithms) {
  NANOBRAGG_SKIP_UNLESS_CUDA();
  at::manual_seed(21);
  const at::Tensor grid = tricubic_grid().to(kCuda);
  const at::Tensor hkl = tricubic_points(50000, false).to(kCuda);
  const at::Tensor c = at::randn({50000}, f64()).to(kCuda);
  DeterministicScope det(true);
  Tensors grads;
  for (int run = 0; run < 2; ++run) {
    at::Tensor gr = grid.clone().requires_grad_(true);
    at::Tensor out = nanobragg_ops::tricubic_interp(gr, hkl, kIndexMin, 0.0, "nearest");
    grads.push_back(torch::autograd::grad({out}, {gr}, {c})[0]);
  }
  EXPECT_TRUE(bitwise_equal(grads[0], grads[1]));
}

// The sorted gather's radix sort takes an int count: 2^31 points are a clear
// error (CONTRACT §3), not a wrong answer. The check comes before anything of
// the points' size is allocated (tricubic_interp_backward_cuda: with only the
// grid gradient asked for, a stride-0 hkl and grad_output are used in place;
// deterministic_grid_grad checks before its keys), so this costs no memory.
TEST(CudaDeterminism, GridGradientRefusesMoreThan2To31MinusOnePoints) {
  NANOBRAGG_SKIP_UNLESS_CUDA();
  const int64_t n = int64_t(1) << 31;
  const at::Tensor grid = tricubic_grid().to(kCuda);
  const at::Tensor hkl = at::tensor({0.3, 0.2, 0.1}, f64()).to(kCuda).view({1, 3}).expand({n, 3});
  const at::Tensor g = at::ones({}, f64()).to(kCuda).expand({n});
  DeterministicScope det(true);
  expect_error(
      [&] {
        tricubic_backward(g, grid, hkl, "default", {true, false});
      },
      {"nanobragg::tricubic_interp_backward", "deterministic grid gradient",
       "at most 2^31 - 1 points, got 2147483648"});
}

// ---------------------------------------------------------------- grid-stride loops

// n >= 3 x (SMs x resident threads per SM): whatever grid the kernels launch
// (at most SMs * threads_per_SM / 256 blocks of 256), every grid-stride loop
// runs more than once (the deterministic path's piece table too: a warp per
// 32 sorted positions), and absorption's reductions have several partials.
TEST(CudaGridStride, LargeNMatchesCpu) {
  NANOBRAGG_SKIP_UNLESS_CUDA();
  at::manual_seed(30);
  const int64_t n = 3 * resident_threads() + 12345;
  ASSERT_GT(n, 12345);
  const TricubicCase base = tricubic_base(n, false);
  const TricubicCase cu = tricubic_case(base, Layout::Contiguous, kCuda);
  for (bool deterministic : {false, true}) {  // the atomic and the sorted grid gradient
    DeterministicScope det(deterministic);
    for (const std::string mode : {"default", "nearest"}) {
      Tensors got = {nanobragg_ops::tricubic_interp(cu.grid, cu.hkl, kIndexMin, 0.0, mode)};
      Tensors want = {nanobragg_ops::tricubic_interp(base.grid, base.hkl, kIndexMin, 0.0, mode)};
      for (const auto& t : tricubic_backward(cu.g, cu.grid, cu.hkl, mode)) got.push_back(t);
      for (const auto& t : tricubic_backward(base.g, base.grid, base.hkl, mode)) want.push_back(t);
      got.push_back(tricubic_double_backward(std::nullopt, cu.V, cu.g, cu.grid, cu.hkl, mode,
                                             {false, true, false})[1]);
      want.push_back(tricubic_double_backward(std::nullopt, base.V, base.g, base.grid, base.hkl,
                                              mode, {false, true, false})[1]);
      expect_all_close(got, want, kRtol,
                       "tricubic n=" + std::to_string(n) + " " + mode +
                           (deterministic ? " deterministic" : " atomic"));
    }
  }
  const int64_t side = static_cast<int64_t>(std::sqrt(double(n))) + 1;  // side^2 > n pixels
  for (bool oversample : {true, false}) {
    const Absorption cpu = absorption_base(side, side, 4, oversample, false);
    const at::Tensor g = at::randn({side, side}, f64());
    Tensors got = {cpu.to(kCuda).forward()}, want = {cpu.forward()};
    for (const auto& t : cpu.to(kCuda).backward(g.to(kCuda))) got.push_back(t);
    for (const auto& t : cpu.backward(g)) want.push_back(t);
    expect_all_close(
        got, want, kRtol,
        "absorption " + std::to_string(side) + "^2 oversample=" + std::to_string(oversample));
  }
}

// The deterministic grid gradient's gather gives a warp per grid node: with
// more nodes than 3 x the resident warps, its loop over nodes iterates too
// (the grid above has 1716 nodes). 40^3 nodes, points over all of them.
TEST(CudaGridStride, DeterministicGatherOverALargeGridMatchesCpu) {
  NANOBRAGG_SKIP_UNLESS_CUDA();
  at::manual_seed(31);
  const int64_t side = 40, nodes = side * side * side;
  ASSERT_GT(nodes, 3 * resident_threads() / 32) << "a GPU with more warps: enlarge the grid";
  const int64_t n = 3 * resident_threads() + 999;
  const at::Tensor grid = at::rand({side, side, side}, f64()) * 9 + 1;
  at::Tensor hkl = at::empty({n, 3}, f64());
  for (int d = 0; d < 3; ++d) {  // every stencil inside: first node >= lo, last <= lo + side - 1
    hkl.select(1, d).copy_(at::rand({n}, f64()) * double(side - 3.1) + double(kIndexMin[d] + 1));
  }
  const at::Tensor g = at::randn({n}, f64()), v = at::randn({n, 3}, f64());
  const at::Tensor cg = grid.to(kCuda), ch = hkl.to(kCuda), cgo = g.to(kCuda), cv = v.to(kCuda);
  DeterministicScope det(true);
  for (const std::string mode : {"default", "nearest"}) {
    const Tensors got = {
        tricubic_backward(cgo, cg, ch, mode, {true, false})[0],
        tricubic_double_backward(std::nullopt, cv, cgo, cg, ch, mode, {false, true, false})[1]};
    const Tensors want = {
        tricubic_backward(g, grid, hkl, mode, {true, false})[0],
        tricubic_double_backward(std::nullopt, v, g, grid, hkl, mode, {false, true, false})[1]};
    expect_all_close(got, want, 1e-12, "40^3 grid, deterministic " + mode);
    EXPECT_GT(want[0].abs().min().item<double>(), 0.0) << "a node no stencil covers";
  }
}

// ---------------------------------------------------------------- scalars and streams

TEST(CudaScalars, CpuZeroDimScalarsWithCudaData) {
  NANOBRAGG_SKIP_UNLESS_CUDA();
  at::manual_seed(40);
  for (bool oversample : {true, false}) {
    const Absorption cpu = absorption_base(9, 10, 4, oversample, false);
    Absorption all = cpu.to(kCuda), mixed = cpu.to(kCuda);
    mixed.thickness = cpu.thickness.clone().requires_grad_(true);  // CPU 0-dim
    mixed.att = cpu.att.clone().requires_grad_(true);
    all.thickness = all.thickness.clone().requires_grad_(true);
    all.att = all.att.clone().requires_grad_(true);
    const at::Tensor g = at::randn({9, 10}, f64()).to(kCuda);
    const at::Tensor out_mixed = mixed.forward();
    const at::Tensor out_all = all.forward();
    ASSERT_TRUE(out_mixed.is_cuda());
    EXPECT_LE(max_rel_error(to_vector(out_mixed), to_vector(out_all), 1e-300), 1e-14);
    const auto gm = torch::autograd::grad({out_mixed}, {mixed.thickness, mixed.att}, {g});
    const auto ga = torch::autograd::grad({out_all}, {all.thickness, all.att}, {g});
    for (size_t i = 0; i < 2; ++i) {
      const std::string what = i == 0 ? "thickness" : "attenuation_length";
      EXPECT_TRUE(gm[i].device().is_cpu()) << what << " gradient came back on " << gm[i].device();
      EXPECT_EQ(gm[i].dim(), 0) << what;
      expect_close(gm[i], ga[i], 1e-12, "gradient of a CPU " + what);
      EXPECT_GT(std::abs(ga[i].item<double>()), 0.0) << what;
    }
    // The backward op itself with CPU scalars: the data gradients stay on CUDA.
    const Tensors b = mixed.backward(g);
    const Tensors b_all = all.backward(g);
    EXPECT_TRUE(b[0].is_cuda() && b[1].is_cuda() && b[2].is_cuda());
    expect_all_close(b, b_all, 1e-12, "backward op with CPU scalars");
  }
}

// The C++ overload with numbers for thickness and attenuation length puts
// them on the device with a fill: no copy from host memory that would wait
// for the GPU (sync debug mode "error" throws on one).
TEST(CudaScalars, NumbersForTheLengthsDoNotSynchronise) {
  NANOBRAGG_SKIP_UNLESS_CUDA();
#ifdef NANOBRAGG_WITH_CUDA
  at::manual_seed(41);
  const Absorption cu = absorption_base(9, 10, 4, true, false).to(kCuda);
  const double thickness = cu.thickness.item<double>(), att = cu.att.item<double>();
  const at::Tensor want = cu.forward();
  c10::cuda::device_synchronize();
  struct SyncDebugError {  // sets the mode for a scope, restores it even on a throw
    c10::cuda::SyncDebugMode saved = c10::cuda::warning_state().get_sync_debug_mode();
    SyncDebugError() {
      c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_ERROR);
    }
    ~SyncDebugError() { c10::cuda::warning_state().set_sync_debug_mode(saved); }
  };
  at::Tensor got, got_mixed;
  {
    SyncDebugError mode;
    got = nanobragg_ops::detector_absorption(cu.intensity, cu.coords, cu.odet, thickness, att,
                                             cu.layers, cu.oversample, cu.per_layer);
    // one number beside a CUDA tensor
    got_mixed = nanobragg_ops::detector_absorption(cu.intensity, cu.coords, cu.odet, cu.thickness,
                                                   att, cu.layers, cu.oversample, cu.per_layer);
  }
  ASSERT_TRUE(got.is_cuda() && got_mixed.is_cuda());
  EXPECT_TRUE(bitwise_equal(got, want));
  EXPECT_TRUE(bitwise_equal(got_mixed, want));
#endif
}

TEST(CudaStream, NonDefaultStreamMatchesDefaultStream) {
  NANOBRAGG_SKIP_UNLESS_CUDA();
#ifdef NANOBRAGG_WITH_CUDA
  at::manual_seed(50);
  const int64_t S = 40, F = 50, n = S * F;
  const TricubicCase base = tricubic_base(n, false);
  const Absorption abs_cpu = absorption_base(S, F, 3, true, false);
  const at::Tensor grid = base.grid.to(kCuda), hkl = base.hkl.to(kCuda);
  const Absorption src = abs_cpu.to(kCuda);

  // Forward and every gradient of a small pipeline through both ops.
  auto run = [&](const at::Tensor& grid_in, const at::Tensor& hkl_in, const Absorption& a_in) {
    at::Tensor gr = grid_in.clone().requires_grad_(true);
    at::Tensor h = hkl_in.clone().requires_grad_(true);
    Absorption a = a_in;
    for (at::Tensor* t : {&a.intensity, &a.coords, &a.odet, &a.thickness, &a.att}) {
      *t = t->clone().requires_grad_(true);
    }
    at::Tensor Fv = nanobragg_ops::tricubic_interp(gr, h, kIndexMin, 0.0, "nearest");
    Absorption b = a;
    b.intensity = a.intensity * Fv.view({S, F});
    at::Tensor out = b.forward();
    auto grads = torch::autograd::grad({(out * out).sum()},
                                       {gr, h, a.intensity, a.coords, a.odet, a.thickness, a.att});
    Tensors r = {Fv.detach(), out.detach()};
    for (const auto& t : grads) r.push_back(t.clone());
    return r;
  };
  const Tensors expected = run(grid, hkl, src);
  c10::cuda::device_synchronize();

  c10::cuda::CUDAStream stream = c10::cuda::getStreamFromPool();
  ASSERT_TRUE(stream != c10::cuda::getDefaultCUDAStream()) << "the pool gave the default stream";
  Tensors got;
  {
    c10::cuda::CUDAStreamGuard guard(stream);
    // A long kernel first, then the inputs copied on this stream: a kernel
    // that ran on another stream would read them before they exist.
    at::cuda::sleep(100000000);
    got = run(grid, hkl, src);
  }
  stream.synchronize();
  c10::cuda::device_synchronize();
  expect_all_close(got, expected, 1e-12, "stream from the pool vs default stream");
#endif
}

}  // namespace
}  // namespace nanobragg_test
