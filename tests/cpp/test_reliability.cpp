// Reliability: concurrent callers, float32 numerics at the edges (grazing
// parallax, the grid border, tiny absorption), and element offsets and
// addition counts past 2^31 (on each device).
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/autograd.h>

#include <thread>
#include <vector>

#include "absorption_reference.h"
#include "tricubic_reference.h"
#include "nanobragg_ops/ops.h"
#include "test_utils.h"

#ifdef NANOBRAGG_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace nanobragg_test {
namespace {

// Forward and both gradients of tricubic and absorption for fixed inputs.
std::vector<at::Tensor> run_both(const at::Tensor& grid, const at::Tensor& hkl,
                                 const at::Tensor& pixels, const at::Tensor& intensity) {
  at::Tensor g = grid.detach().requires_grad_(true);
  at::Tensor h = hkl.detach().requires_grad_(true);
  at::Tensor F = nanobragg_ops::tricubic_interp(g, h, {-6, -6, -6}, 0.0, "nearest");
  at::Tensor I = intensity.detach().requires_grad_(true);
  at::Tensor P = pixels.detach().requires_grad_(true);
  at::Tensor T = at::scalar_tensor(3e-4, at::kDouble).requires_grad_(true);
  at::Tensor A = at::scalar_tensor(2e-4, at::kDouble);
  at::Tensor odet = at::tensor({0.1, 0.0, 1.0}, at::kDouble);
  at::Tensor out = nanobragg_ops::detector_absorption(I * F.detach(), P, odet, T, A, 3, true);
  auto grads = torch::autograd::grad({F.sum(), out.sum()}, {g, h, I, P, T});
  std::vector<at::Tensor> all = {F.detach(), out.detach()};
  all.insert(all.end(), grads.begin(), grads.end());
  return all;
}

TEST(Reliability, ConcurrentCallersGetTheSerialResults) {
  at::manual_seed(9);
  const at::Tensor grid = at::rand({12, 12, 12}, at::kDouble);
  const at::Tensor hkl = at::rand({20000, 3}, at::kDouble) * 14 - 7;
  at::Tensor pixels = at::rand({20000, 3}, at::kDouble) * 0.1 - 0.05;
  pixels.select(1, 2).fill_(0.1);
  const at::Tensor intensity = at::rand({20000}, at::kDouble);
  const auto serial = run_both(grid, hkl, pixels, intensity);

  constexpr int kThreads = 4, kRounds = 5;
  std::vector<std::vector<std::vector<at::Tensor>>> results(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int r = 0; r < kRounds; ++r)
        results[t].push_back(run_both(grid, hkl, pixels, intensity));
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) {
    for (int r = 0; r < kRounds; ++r) {
      ASSERT_EQ(results[t][r].size(), serial.size());
      for (size_t i = 0; i < serial.size(); ++i) {
        EXPECT_TRUE(bitwise_equal(results[t][r][i], serial[i]))
            << "thread " << t << " round " << r << " output " << i;
      }
    }
  }
}

TEST(Reliability, Float32GradientsStayFiniteAtGrazingParallaxAndTheGridBorder) {
  // Pixels almost in the detector plane (parallax down to the 1e-10 clamp).
  at::Tensor P =
      at::tensor({0.1, 0.0, 1e-7, 0.1, 0.0, 1e-12, 0.1, 0.0, 0.0, 0.05, 0.05, 1e-4}, at::kDouble)
          .view({4, 3})
          .to(at::kFloat)
          .requires_grad_(true);
  at::Tensor I = at::ones({4}, at::kFloat).requires_grad_(true);
  at::Tensor odet = at::tensor({0.0f, 0.0f, 1.0f}).requires_grad_(true);
  at::Tensor T = at::scalar_tensor(3e-4f).requires_grad_(true);
  at::Tensor A = at::scalar_tensor(2e-4f).requires_grad_(true);
  for (bool oversample : {true, false}) {
    at::Tensor out = nanobragg_ops::detector_absorption(I, P, odet, T, A, 4, oversample);
    auto g = torch::autograd::grad({out.sum()}, {I, P, odet, T, A});
    EXPECT_TRUE(at::isfinite(out).all().item<bool>()) << oversample;
    for (const auto& t : g) EXPECT_TRUE(at::isfinite(t).all().item<bool>()) << oversample;
  }
  // Points whose stencils touch the first and the last grid nodes (nodes
  // 0..7: the stencil of floor(x) = 1 starts at node 0, that of 5 ends at 7).
  at::manual_seed(17);
  // Values in [1e3, 2e3]: an interpolated value is positive whatever the
  // draw (the negative Lagrange weights carry less than a third of the mass).
  at::Tensor grid = (at::rand({8, 8, 8}) * 1e3 + 1e3).requires_grad_(true);
  at::Tensor hkl =
      at::tensor({1.0f, 1.0f, 1.0f, 5.999999f, 5.999999f, 5.999999f, 1.000001f, 3.5f, 5.99f})
          .view({3, 3})
          .requires_grad_(true);
  at::Tensor F = nanobragg_ops::tricubic_interp(grid, hkl, {0, 0, 0}, -1.0);
  auto g = torch::autograd::grad({F.sum()}, {grid, hkl});
  EXPECT_TRUE(at::isfinite(F).all().item<bool>());
  EXPECT_TRUE(at::isfinite(g[0]).all().item<bool>());
  EXPECT_TRUE(at::isfinite(g[1]).all().item<bool>());
  EXPECT_GT(g[1].abs().sum().item<double>(), 0.0);
  // Every point interpolates (no default -1), as polin3 does in float64 on
  // the same float32 values, and the first and last nodes get gradient.
  const std::vector<double> want =
      tricubic_reference(grid.detach(), hkl.detach(), {0, 0, 0}, -1.0, "default");
  EXPECT_LE(max_rel_error(to_vector(F), want, 1.0), 1e-5);
  for (double w : want) EXPECT_GT(w, 0.0);
  EXPECT_GT(g[0][0].abs().sum().item<double>(), 0.0);  // the first h-slab
  EXPECT_GT(g[0][7].abs().sum().item<double>(), 0.0);  // the last
}

TEST(Reliability, TelescopedFormMatchesTheLayerLoopForTinyAbsorption) {
  // thickness * mu / rho from 1e-14 to 1e-3: the telescoped 1 - exp(-L a)
  // (per_layer=false) against the per-layer sum of exp(-t a) (1 - exp(-a))
  // (per_layer=true with a per-layer intensity), both through the operator,
  // and against 1 - exp(-x) ~ x (1 - x/2) in double.
  at::Tensor P = at::tensor({0.0, 0.0, 0.1}, at::kDouble).view({1, 3});
  at::Tensor odet = at::tensor({0.0, 0.0, 1.0}, at::kDouble);
  at::Tensor A = at::scalar_tensor(1.0, at::kDouble);
  for (double x : {1e-14, 1e-10, 1e-7, 1e-5, 1e-3}) {
    at::Tensor T = at::scalar_tensor(x, at::kDouble);
    const int64_t L = 8;
    const double telescoped =
        nanobragg_ops::detector_absorption(at::ones({1}, at::kDouble), P, odet, T, A, L, true)
            .item<double>();
    const double layered =
        nanobragg_ops::detector_absorption(at::ones({L, 1}, at::kDouble), P.unsqueeze(0), odet, T,
                                           A, L, true, true)
            .item<double>();
    const double series = x * (1 - x / 2 + x * x / 6 - x * x * x / 24 + x * x * x * x / 120);
    EXPECT_NEAR(telescoped / series, 1.0, 1e-13) << x;
    EXPECT_NEAR(layered / series, 1.0, 1e-13) << x;
    EXPECT_NEAR(layered / telescoped, 1.0, 1e-14) << x;  // the two forms, to rounding
    for (auto dtype : {at::kFloat}) {
      const double t32 =
          nanobragg_ops::detector_absorption(at::ones({1}, dtype), P.to(dtype), odet.to(dtype),
                                             T.to(dtype), A.to(dtype), L, true)
              .item<double>();
      EXPECT_NEAR(t32 / series, 1.0, 1e-6) << x;
    }
  }
}

}  // namespace
}  // namespace nanobragg_test

namespace nanobragg_test {
namespace {

// Indices past 2^31 on each device (the CUDA instances skip, saying why,
// without a GPU). Stride tricks keep the memory small: a virtual CPU
// buffer, stride-0 views.
class ReliabilityLargeIndices : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override { NANOBRAGG_SKIP_UNLESS_DEVICE(GetParam(), "nanobragg::tricubic_interp"); }
  void TearDown() override {
#ifdef NANOBRAGG_WITH_CUDA
    // The 8 GiB buffer below is not kept in the caching allocator for the
    // tests after this one.
    if (GetParam() == "cuda" && at::hasCUDA()) {
      c10::cuda::CUDACachingAllocator::emptyCache();
    }
#endif
  }
  at::TensorOptions opts(at::ScalarType dtype) const {
    return at::TensorOptions().dtype(dtype).device(GetParam());
  }
};

TEST_P(ReliabilityLargeIndices, ElementOffsetsBeyond2To31InStridedViews) {
  // Views into an 8 GiB float32 buffer that is never touched except where
  // the views lie (on the CPU the allocation stays virtual until written; on
  // CUDA it is 8 GiB of device memory, released after the test): the second
  // hkl point and the grid's last h-slab sit more than 2^31 elements from
  // the buffer's start, so any 32-bit offset arithmetic reads elsewhere.
  const int64_t big = (int64_t(1) << 31) + 64;
  at::Tensor buffer;
  try {
    buffer = at::empty({big}, opts(at::kFloat));
  } catch (const c10::Error& e) {  // (no overcommit, or a small GPU)
    GTEST_SKIP() << "cannot reserve the 8 GiB buffer here: " << e.what_without_backtrace();
  }
  at::manual_seed(31);
  const at::Tensor grid_ref = (at::rand({6, 6, 6}, at::kFloat) * 4 + 1).to(opts(at::kFloat));
  // Point 0's stencil (h nodes 2..5) reads the last h-slab, past 2^31.
  const at::Tensor hkl_ref =
      at::tensor({3.4, 2.6, 1.9, 2.7, 1.2, 2.4}, at::kFloat).view({2, 3}).to(opts(at::kFloat));
  // hkl: point 1 starts at element 2^31 + 3.
  at::Tensor hkl = buffer.as_strided({2, 3}, {(int64_t(1) << 31) + 3, 1});
  hkl.copy_(hkl_ref);
  // grid: h-stride ceil(2^31 / 5), so slab 5 starts past 2^31.
  const int64_t h_stride = ((int64_t(1) << 31) + 4) / 5;
  ASSERT_GT(5 * h_stride, int64_t(1) << 31);
  ASSERT_LT(5 * h_stride + 36, big);
  at::Tensor grid = buffer.as_strided({6, 6, 6}, {h_stride, 6, 1}, 8);
  grid.copy_(grid_ref);
  ASSERT_TRUE(at::equal(hkl, hkl_ref) && at::equal(grid, grid_ref));
  auto run = [](const at::Tensor& g, const at::Tensor& h) {
    at::Tensor gg = g.detach().requires_grad_(true);
    at::Tensor hh = h.detach().requires_grad_(true);
    at::Tensor out = nanobragg_ops::tricubic_interp(gg, hh, {0, 0, 0});
    auto grads = torch::autograd::grad({(out * out).sum()}, {gg, hh});
    return std::vector<at::Tensor>{out, grads[0], grads[1]};
  };
  const auto got = run(grid, hkl);
  const auto want = run(grid_ref, hkl_ref);  // the same values, contiguous
  for (size_t i = 0; i < got.size(); ++i) {
    if (GetParam() == "cpu") {
      EXPECT_TRUE(at::equal(got[i], want[i])) << "output " << i;
    } else {
      // CUDA promises no bitwise equality across layouts: to float32
      // rounding (an offset gone wrong reads other values entirely).
      EXPECT_LE(max_rel_error(to_vector(got[i]), to_vector(want[i]), 1.0), 1e-6) << "output " << i;
    }
  }
  EXPECT_GT(want[0].abs().min().item<float>(), 0.5f);  // both points interpolate
}

TEST_P(ReliabilityLargeIndices, MoreThan2To31TapContributionsInTheBackward) {
  // 2^25 + 8 points (a stride-0 view of one point, so no memory for hkl or
  // the incoming gradient), 64 taps each: 2^31 + 512 tap contributions to the
  // grid gradient, a count that a 32-bit counter of points times taps would
  // get wrong. How they reach the grid differs: the CPU sums a run of points
  // in one block in registers and adds each run once, a CUDA warp sums its
  // points of one stencil start before its atomics, and the deterministic
  // CUDA path sorts one run of n points into pieces of 1024 and a table.
  // Each gives n times the gradient of the one point.
  const int64_t n = (int64_t(1) << 25) + 8;
  at::Tensor grid = at::rand({8, 8, 8}, at::kDouble).to(opts(at::kDouble)).requires_grad_(true);
  at::Tensor one = at::tensor({3.3, 4.6, 3.9}, at::kDouble).to(opts(at::kDouble));
  at::Tensor hkl = one.view({1, 3}).expand({n, 3});
  at::Tensor g1 = grid.detach().clone().requires_grad_(true);
  auto single = torch::autograd::grad(
      {nanobragg_ops::tricubic_interp(g1, one.view({1, 3}), {0, 0, 0}).sum()}, {g1});
  EXPECT_GT(single[0].abs().sum().item<double>(), 0.0);
  for (const bool deterministic : {false, true}) {
    if (deterministic && GetParam() != "cuda") continue;  // one CPU path
    DeterministicScope scope(deterministic);
    at::Tensor out = nanobragg_ops::tricubic_interp(grid, hkl, {0, 0, 0});
    ASSERT_EQ(out.numel(), n);
    auto g = torch::autograd::grad({out.sum()}, {grid});
    // n equal terms summed one after another (CUDA's atomic adds, in any
    // order) are within (n - 1) 2^-53 ~ 3.7e-9 of n times one; the CPU's
    // partial sums and the sorted path's tree sums are closer.
    const double tol = GetParam() == "cuda" ? 1e-8 : 1e-9;
    EXPECT_LE(max_rel_error(to_vector(g[0]), to_vector(single[0] * static_cast<double>(n)), 1.0),
              tol)
        << "deterministic " << deterministic;
    EXPECT_EQ(out[n - 1].item<double>(), out[0].item<double>());
  }
}

INSTANTIATE_TEST_SUITE_P(Devices, ReliabilityLargeIndices, ::testing::ValuesIn(test_devices()),
                         device_test_name);

}  // namespace
}  // namespace nanobragg_test
