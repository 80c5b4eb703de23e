// tricubic_interp gradients: analytic (backward op, Autograd kernel) against
// central finite differences of the forward, in float64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/autograd.h>

#include <cmath>
#include <tuple>

#include "nanobragg_ops/ops.h"
#include "test_utils.h"

namespace nanobragg_test {
namespace {

constexpr const char* kOp = "nanobragg::tricubic_interp_backward";
const std::array<int64_t, 3> kIndexMin = {3, -5, 0};

using BackwardOp = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, c10::IntArrayRef,
                                                      c10::string_view, std::array<bool, 2>);

std::tuple<at::Tensor, at::Tensor> backward_op(const at::Tensor& grad, const at::Tensor& grid,
                                               const at::Tensor& hkl, const std::string& mode,
                                               std::array<bool, 2> mask) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow(kOp, "").typed<BackwardOp>();
  return op.call(grad, grid, hkl, kIndexMin, mode, mask);
}

class TricubicBackward : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    NANOBRAGG_SKIP_UNLESS_DEVICE(GetParam(), kOp);
    at::manual_seed(77);
  }
  at::TensorOptions opts(at::ScalarType dtype = at::kDouble) const {
    return at::TensorOptions().dtype(dtype).device(GetParam());
  }
  at::Tensor random_grid(at::IntArrayRef shape, at::ScalarType dtype = at::kDouble) const {
    return (at::rand(shape, at::kDouble) * 9 + 1).to(opts(dtype));
  }
  // Points whose coordinates keep >= `margin` away from integers, so a
  // finite-difference step never moves the stencil. The first `outside` of
  // them leave the grid on h: the first half (rounded up) within 0.4 of the
  // first or the last node (alternately), where the stencil is out of range
  // but "nearest" takes the node's value, with k and l >= 0.1 from x.5 (where
  // nearest rounding, ceil(x - 0.5), jumps); the rest beyond the grid's upper
  // end, past the nearest range too (default_value in both modes).
  at::Tensor points_off_integers(int64_t n, const at::Tensor& grid, int64_t outside,
                                 double margin = 0.1) const {
    at::Tensor base = at::empty({n, 3}, at::kDouble);
    for (int d = 0; d < 3; ++d) {
      // integer part chosen so that the stencil fits: n-1 >= lo, n+2 <= hi
      at::Tensor ints =
          at::randint(kIndexMin[d] + 1, kIndexMin[d] + grid.size(d) - 2, {n}, at::kDouble);
      at::Tensor frac = at::rand({n}, at::kDouble) * (1 - 2 * margin) + margin;
      base.select(1, d).copy_(ints + frac);
    }
    base.slice(0, 0, outside).select(1, 0).add_(static_cast<double>(grid.size(0)) + 0.5);
    const int64_t near = (outside + 1) / 2;
    const double first = static_cast<double>(kIndexMin[0]);
    const double last = first + static_cast<double>(grid.size(0) - 1);
    for (int64_t i = 0; i < near; ++i) {
      const double offset = at::rand({}, at::kDouble).item<double>() * 0.8 - 0.4;
      base[i][0] = (i % 2 == 0 ? first : last) + offset;
      for (int d = 1; d < 3; ++d) {
        const double node = std::floor(base[i][d].item<double>());
        base[i][d] = node + 0.1 + 0.3 * at::rand({}, at::kDouble).item<double>();
      }
    }
    return base.to(opts());
  }
};

// d(sum_i c_i F_i)/d grid by central differences, one node at a time.
at::Tensor fd_grid_grad(const at::Tensor& grid, const at::Tensor& hkl, const at::Tensor& c,
                        const std::string& mode) {
  at::Tensor g = grid.clone();
  at::Tensor flat = g.view({-1});
  at::Tensor out = at::zeros_like(flat);
  const double eps = 1e-3;  // F is linear in grid: the step size is free
  for (int64_t i = 0; i < flat.numel(); ++i) {
    const double v = flat[i].item<double>();
    flat[i] = v + eps;
    const double up =
        (nanobragg_ops::tricubic_interp(g, hkl, kIndexMin, 0.0, mode) * c).sum().item<double>();
    flat[i] = v - eps;
    const double down =
        (nanobragg_ops::tricubic_interp(g, hkl, kIndexMin, 0.0, mode) * c).sum().item<double>();
    flat[i] = v;
    out[i] = (up - down) / (2 * eps);
  }
  return out.view(grid.sizes());
}

// d(sum_i c_i F_i)/d hkl: F_i depends only on point i.
// c times the finite differences of the forward along h, k and l: central,
// or (from_above) forward differences, the derivative from above.
at::Tensor fd_hkl_grad(const at::Tensor& grid, const at::Tensor& hkl, const at::Tensor& c,
                       const std::string& mode, double eps = 1e-6, bool from_above = false) {
  at::Tensor out = at::zeros_like(hkl);
  for (int d = 0; d < 3; ++d) {
    at::Tensor step = at::zeros_like(hkl);
    step.select(-1, d).fill_(eps);
    at::Tensor up = nanobragg_ops::tricubic_interp(grid, hkl + step, kIndexMin, 0.0, mode);
    at::Tensor down =
        nanobragg_ops::tricubic_interp(grid, from_above ? hkl : hkl - step, kIndexMin, 0.0, mode);
    out.select(-1, d).copy_(c * (up - down) / (from_above ? eps : 2 * eps));
  }
  return out;
}

// Nearest and default differ somewhere: the inputs hold nearest-mode points.
void expect_nearest_points(const at::Tensor& grid, const at::Tensor& hkl) {
  const at::Tensor near = nanobragg_ops::tricubic_interp(grid, hkl, kIndexMin, 0.0, "nearest");
  const at::Tensor dflt = nanobragg_ops::tricubic_interp(grid, hkl, kIndexMin, 0.0, "default");
  EXPECT_TRUE(at::ne(near, dflt).any().item<bool>()) << "no nearest-mode point";
}

TEST_P(TricubicBackward, GridGradientMatchesFiniteDifferences) {
  at::Tensor grid = random_grid({7, 8, 6});
  // 5 of the 10 outside points are nearest-mode points.
  at::Tensor hkl = points_off_integers(60, grid, 10);
  expect_nearest_points(grid, hkl);
  // And points exactly on nodes.
  hkl[10][0] = 5.0;
  hkl[11][1] = -3.0;
  at::Tensor c = at::randn({60}, opts());
  for (const std::string mode : {"default", "nearest"}) {
    at::Tensor g = grid.clone().requires_grad_(true);
    at::Tensor out = nanobragg_ops::tricubic_interp(g, hkl, kIndexMin, 0.0, mode);
    const auto grads = torch::autograd::grad({out}, {g}, {c});
    const at::Tensor fd = fd_grid_grad(grid, hkl, c, mode);
    EXPECT_LE(max_rel_error(to_vector(grads[0]), to_vector(fd), 1.0), 1e-9) << mode;
    EXPECT_GT(fd.abs().sum().item<double>(), 1.0);  // not vacuous
  }
}

TEST_P(TricubicBackward, HklGradientMatchesFiniteDifferences) {
  at::Tensor grid = random_grid({7, 8, 6});
  at::Tensor hkl = points_off_integers(200, grid, 20);
  expect_nearest_points(grid, hkl);
  at::Tensor c = at::randn({200}, opts());
  for (const std::string mode : {"default", "nearest"}) {
    at::Tensor h = hkl.clone().requires_grad_(true);
    at::Tensor out = nanobragg_ops::tricubic_interp(grid, h, kIndexMin, 0.0, mode);
    const auto grads = torch::autograd::grad({out}, {h}, {c});
    const at::Tensor fd = fd_hkl_grad(grid, hkl, c, mode);
    EXPECT_LE(max_rel_error(to_vector(grads[0]), to_vector(fd), 1.0), 1e-7) << mode;
    // Out-of-range points do not move with hkl: default ones, and in
    // "nearest" the 10 nearest-mode ones.
    EXPECT_EQ(grads[0].slice(0, 0, 20).abs().max().item<double>(), 0.0);
    EXPECT_GT(grads[0].abs().sum().item<double>(), 1.0);
  }
}

TEST_P(TricubicBackward, HklGradientOnANodeIsTheOneFromAbove) {
  // At an exact integer coordinate the stencil of floor(x) is the one
  // differentiated (docs/CONTRACT.md §1, Gradients): the derivative from
  // above, checked by forward differences (error about step/2 times the
  // second derivative, ~1e-6 relative here). Points on nodes in every axis
  // or in one, the highest stencil start among them.
  at::Tensor grid = random_grid({7, 8, 6});
  at::Tensor hkl =
      at::tensor({5.0, -2.0, 2.0, 5.3, -2.0, 1.7, 6.4, -3.6, 3.0, 7.0, 0.0, 3.0}, at::kDouble)
          .view({4, 3})
          .to(opts());
  at::Tensor c = at::tensor({1.0, -0.7, 1.3, 0.9}, at::kDouble).to(opts());
  at::Tensor h = hkl.clone().requires_grad_(true);
  at::Tensor out = nanobragg_ops::tricubic_interp(grid, h, kIndexMin, -100.0);
  ASSERT_TRUE(at::ne(out, -100.0).all().item<bool>()) << "every point interpolates";
  const auto grads = torch::autograd::grad({out}, {h}, {c});
  const at::Tensor fd = fd_hkl_grad(grid, hkl, c, "default", 1e-7, /*from_above=*/true);
  EXPECT_LE(max_rel_error(to_vector(grads[0]), to_vector(fd), 1.0), 1e-5);
}

TEST_P(TricubicBackward, NearestScattersIntoOneNodeAndDefaultNowhere) {
  at::Tensor grid = random_grid({5, 5, 5});
  // h outside: (8.6 -> nearest h = 9 is outside too -> default),
  //            (7.2 -> h = 7, index 4: inside, nearest).
  at::Tensor hkl =
      at::tensor({8.6, -3.0, 2.0, 7.2, -2.6, 1.4}, at::kDouble).view({2, 3}).to(opts());
  at::Tensor grad = at::tensor({1.5, 2.5}, at::kDouble).to(opts());
  auto [gg, gh] = backward_op(grad, grid, hkl, "nearest", {true, true});
  at::Tensor expected = at::zeros({5, 5, 5}, at::kDouble);
  expected[4][2][1] = 2.5;  // (7, -3, 1) - (3, -5, 0)
  EXPECT_TRUE(at::equal(gg.cpu(), expected));
  EXPECT_EQ(gh.abs().max().item<double>(), 0.0);
  auto [gd, ghd] = backward_op(grad, grid, hkl, "default", {true, true});
  EXPECT_EQ(gd.abs().max().item<double>(), 0.0);
}

TEST_P(TricubicBackward, OutputMaskAndShapes) {
  at::Tensor grid = random_grid({7, 8, 6});
  at::Tensor hkl = points_off_integers(30, grid, 3).view({5, 6, 3});
  at::Tensor grad = at::randn({5, 6}, opts());
  auto [g1, h1] = backward_op(grad, grid, hkl, "default", {true, false});
  EXPECT_EQ(g1.sizes(), grid.sizes());
  EXPECT_EQ(h1.sizes(), at::IntArrayRef({0}));  // not asked for
  auto [g2, h2] = backward_op(grad, grid, hkl, "default", {false, true});
  EXPECT_EQ(g2.sizes(), at::IntArrayRef({0}));
  EXPECT_EQ(h2.sizes(), hkl.sizes());
  auto [g3, h3] = backward_op(grad, grid, hkl, "default", {true, true});
  // Bitwise on the CPU and on CUDA's deterministic path; CUDA's default
  // atomicAdd scatter may add in another order each run.
  expect_same_grid_gradient(g1, g3, 1e-13, "grad_grid of two runs");
  EXPECT_TRUE(bitwise_equal(h2, h3));  // per point: no accumulation
}

TEST_P(TricubicBackward, StridedInputsAndExpandedGradient) {
  at::Tensor grid_base = random_grid({8, 9, 10});
  at::Tensor grid = grid_base.transpose(0, 2);  // [10, 9, 8], non-contiguous
  at::Tensor pts = points_off_integers(400, grid, 40);
  at::Tensor wide = at::zeros({400, 5}, opts());
  wide.slice(1, 0, 5, 2).copy_(pts);
  at::Tensor hkl = wide.slice(1, 0, 5, 2);
  ASSERT_FALSE(hkl.is_contiguous());
  // out.sum().backward() hands the kernel an expanded (stride 0) gradient.
  at::Tensor g = grid.detach().requires_grad_(true);
  at::Tensor h = hkl.detach().requires_grad_(true);
  nanobragg_ops::tricubic_interp(g, h, kIndexMin).sum().backward();
  at::Tensor gc = grid.contiguous().requires_grad_(true);
  at::Tensor hc = pts.clone().requires_grad_(true);
  nanobragg_ops::tricubic_interp(gc, hc, kIndexMin).backward(at::ones({400}, opts()));
  EXPECT_LE(max_rel_error(to_vector(g.grad()), to_vector(gc.grad())), 1e-13);
  EXPECT_LE(max_rel_error(to_vector(h.grad()), to_vector(hc.grad())), 1e-13);
}

TEST_P(TricubicBackward, EmptyPoints) {
  at::Tensor grid = random_grid({7, 8, 6});
  at::Tensor hkl = at::empty({0, 3}, opts());
  auto [gg, gh] = backward_op(at::empty({0}, opts()), grid, hkl, "default", {true, true});
  EXPECT_EQ(gg.sizes(), grid.sizes());
  EXPECT_EQ(gg.abs().sum().item<double>(), 0.0);
  EXPECT_EQ(gh.sizes(), hkl.sizes());
}

TEST_P(TricubicBackward, BitwiseIdenticalWithOneAndTwoThreads) {
  // Enough points on a small grid that the grid gradient is accumulated in
  // several partial grids (see grid_grad_lane_count in tricubic_cpu.cpp).
  for (auto dtype : {at::kFloat, at::kDouble}) {
    at::Tensor grid = random_grid({16, 16, 16}, dtype);
    at::Tensor hkl =
        (at::rand({60000, 3}, at::kDouble) * 14 + at::tensor({2.0, -4.0, 1.0}, at::kDouble))
            .to(opts(dtype));
    at::Tensor grad = at::randn({60000}, opts(dtype));
    // (On CUDA the thread count is moot; the deterministic path (sorted
    // gather) is what makes two runs agree bitwise there.)
    const int saved = at::get_num_threads();
    at::Tensor g1, h1, g2, h2;
    {
      DeterministicScope det(GetParam() == "cuda");
      at::set_num_threads(1);
      std::tie(g1, h1) = backward_op(grad, grid, hkl, "nearest", {true, true});
      at::set_num_threads(2);
      std::tie(g2, h2) = backward_op(grad, grid, hkl, "nearest", {true, true});
      at::set_num_threads(saved);
    }
    EXPECT_TRUE(bitwise_equal(g1, g2)) << dtype;
    EXPECT_TRUE(bitwise_equal(h1, h2)) << dtype;
    // And the reduction agrees with another one: the float64 sum of calls on
    // slices of 4000 points, each of which the CPU accumulates in a single
    // lane (fewer than 4096 points: grid_grad_lane_count), where the whole
    // call adds 14 partial grids (on CUDA: the atomic path in float64, so
    // this also compares the two CUDA paths, with a tolerance).
    const at::Tensor grid64 = grid.to(at::kDouble);
    at::Tensor by_slices = at::zeros_like(grid64);
    for (int64_t begin = 0; begin < 60000; begin += 4000) {
      by_slices += std::get<0>(
          backward_op(grad.slice(0, begin, begin + 4000).to(at::kDouble), grid64,
                      hkl.slice(0, begin, begin + 4000).to(at::kDouble), "nearest", {true, false}));
    }
    EXPECT_LE(max_rel_error(to_vector(g1), to_vector(by_slices), 1.0),
              dtype == at::kFloat ? 1e-3 : 1e-12);
    EXPECT_GT(by_slices.abs().sum().item<double>(), 1.0);
  }
}

TEST_P(TricubicBackward, APointDoesNotDependOnWhereItsBatchStarts) {
  // The CPU kernels take points in batches of a vector's lanes, and
  // consecutive lanes all inside the grid together (2 or 4 points per
  // register, by capability and dtype): the value and hkl gradient of each
  // point must be the same to the last bit whatever its neighbours, so the
  // calls on hkl[s:] must give the slices [s:] of the call on all of hkl.
  for (auto dtype : {at::kFloat, at::kDouble}) {
    at::Tensor grid = random_grid({12, 12, 12}, dtype);
    at::Tensor hkl = points_off_integers(203, grid, /*outside=*/0).to(dtype);
    // some stencils leave the grid, here and there: groups break up
    for (int64_t p : {5, 6, 19, 40, 41, 42, 77, 130, 131, 200}) {
      hkl[p][p % 3] = kIndexMin[p % 3] + 0.5 + (p % 2 ? 20.0 : 0.0);
    }
    at::Tensor grad = at::linspace(-1.0, 2.0, hkl.size(0), opts(dtype));
    const at::Tensor value = nanobragg_ops::tricubic_interp(grid, hkl, kIndexMin, -3.0, "default");
    const at::Tensor hkl_grad = std::get<1>(backward_op(grad, grid, hkl, "default", {true, true}));
    const at::Tensor hkl_grad_only =
        std::get<1>(backward_op(grad, grid, hkl, "default", {false, true}));
    EXPECT_TRUE(bitwise_equal(hkl_grad, hkl_grad_only)) << dtype;
    for (int64_t s = 1; s <= 17; ++s) {
      const at::Tensor h = hkl.slice(0, s), g = grad.slice(0, s);
      EXPECT_TRUE(bitwise_equal(nanobragg_ops::tricubic_interp(grid, h, kIndexMin, -3.0, "default"),
                                value.slice(0, s)))
          << dtype << " from " << s;
      EXPECT_TRUE(bitwise_equal(std::get<1>(backward_op(g, grid, h, "default", {true, true})),
                                hkl_grad.slice(0, s)))
          << dtype << " from " << s;
    }
    // both kinds of point are there
    const at::Tensor inside = value != -3.0;
    EXPECT_GT(inside.sum().item<int64_t>(), 150);
    EXPECT_LT(inside.sum().item<int64_t>(), 203);
  }
}

TEST_P(TricubicBackward, DeterministicAlgorithmsGiveRepeatableGridGradient) {
  // On CUDA this selects the sorted gather path instead of atomics.
  at::Tensor grid = random_grid({12, 13, 14}, at::kFloat);
  at::Tensor hkl =
      (at::rand({20000, 3}, at::kDouble) * 16 + at::tensor({1.0, -7.0, -2.0}, at::kDouble))
          .to(opts(at::kFloat));
  at::Tensor grad = at::randn({20000}, opts(at::kFloat));
  at::Tensor fast, d1, d2;
  {
    DeterministicScope det(false);  // CUDA: atomicAdd scatter
    fast = std::get<0>(backward_op(grad, grid, hkl, "nearest", {true, false}));
  }
  {
    DeterministicScope det(true);
    d1 = std::get<0>(backward_op(grad, grid, hkl, "nearest", {true, false}));
    d2 = std::get<0>(backward_op(grad, grid, hkl, "nearest", {true, false}));
  }
  EXPECT_TRUE(bitwise_equal(d1, d2)) << "deterministic grid gradient differs between two runs";
  // The two paths add the same float32 terms in different orders: a
  // tolerance, and both against the CPU kernel in float64.
  EXPECT_LE(max_rel_error(to_vector(d1), to_vector(fast), 1.0), 1e-4);
  auto [ref, unused] = backward_op(grad.to(at::kCPU, at::kDouble), grid.to(at::kCPU, at::kDouble),
                                   hkl.to(at::kCPU, at::kDouble), "nearest", {true, false});
  EXPECT_LE(max_rel_error(to_vector(d1), to_vector(ref), 1.0), 1e-4)
      << "deterministic vs CPU float64";
  EXPECT_LE(max_rel_error(to_vector(fast), to_vector(ref), 1.0), 1e-4) << "default vs CPU float64";
  EXPECT_GT(d1.abs().sum().item<double>(), 1.0);
}

INSTANTIATE_TEST_SUITE_P(Devices, TricubicBackward, ::testing::ValuesIn(test_devices()),
                         device_test_name);

// The gather formulation of the grid gradient (CUDA's deterministic path)
// against the CPU scatter, through the shared header on the CPU:
// test_gather_math.cpp (first and second order).

class TricubicDoubleBackward : public TricubicBackward {};

// Through the public C++ API: a second derivative with create_graph works
// (its values are checked in test_double_backward.cpp), a third says it is
// not implemented.
TEST_P(TricubicDoubleBackward, SecondDerivativeRunsThirdSaysNotImplemented) {
  at::Tensor grid = random_grid({7, 8, 6}).requires_grad_(true);
  at::Tensor hkl = points_off_integers(10, grid.detach(), 0).requires_grad_(true);
  at::Tensor out = nanobragg_ops::tricubic_interp(grid, hkl, kIndexMin);
  auto first = torch::autograd::grad({out.sum()}, {hkl}, {}, true, true);
  auto second = torch::autograd::grad({first[0].pow(2).sum()}, {hkl, grid}, {}, true, true);
  EXPECT_TRUE(at::isfinite(second[0]).all().item<bool>());
  EXPECT_GT(second[1].abs().max().item<double>(), 0.0);  // the mixed term d2/dhkl dgrid
  expect_error([&] { torch::autograd::grad({second[0].sum()}, {hkl}); },
               {"third derivatives are not implemented"});
}

INSTANTIATE_TEST_SUITE_P(Devices, TricubicDoubleBackward, ::testing::ValuesIn(test_devices()),
                         device_test_name);

}  // namespace
}  // namespace nanobragg_test
