// tricubic_interp forward: parity with the polin3 reference (docs/CONTRACT.md §1).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <limits>

#include "nanobragg_ops/ops.h"
#include "test_utils.h"
#include "tricubic_reference.h"

namespace nanobragg_test {
namespace {

constexpr const char* kOp = "nanobragg::tricubic_interp";
const std::array<int64_t, 3> kIndexMin = {-4, 2, -3};

class TricubicForward : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    NANOBRAGG_SKIP_UNLESS_DEVICE(GetParam(), kOp);
    at::manual_seed(1234);
  }
  at::TensorOptions opts(at::ScalarType dtype) const {
    return at::TensorOptions().dtype(dtype).device(GetParam());
  }
  // Structure-factor-like values in [1, 10].
  at::Tensor random_grid(at::IntArrayRef shape, at::ScalarType dtype) const {
    return (at::rand(shape, at::kDouble) * 9 + 1).to(opts(dtype));
  }
  // Points uniformly in [min - 3, max + 3] per axis: inside and outside.
  at::Tensor random_points(int64_t n, const at::Tensor& grid, at::ScalarType dtype) const {
    at::Tensor u = at::rand({n, 3}, at::kDouble);
    for (int d = 0; d < 3; ++d) {
      const double lo = kIndexMin[d] - 3.0;
      const double hi = kIndexMin[d] + grid.size(d) - 1 + 3.0;
      u.select(1, d).mul_(hi - lo).add_(lo);
    }
    return u.to(opts(dtype));
  }
};

TEST_P(TricubicForward, MatchesPolin3Float64BothModes) {
  at::Tensor grid = random_grid({9, 11, 7}, at::kDouble);
  at::Tensor hkl = random_points(4000, grid, at::kDouble);
  for (const std::string mode : {"default", "nearest"}) {
    at::Tensor out = nanobragg_ops::tricubic_interp(grid, hkl, kIndexMin, -7.5, mode);
    ASSERT_EQ(out.sizes(), at::IntArrayRef({4000}));
    ASSERT_EQ(out.scalar_type(), at::kDouble);
    const auto ref = tricubic_reference(grid, hkl, kIndexMin, -7.5, mode);
    EXPECT_LE(max_rel_error(to_vector(out), ref), 1e-12) << mode;
  }
}

TEST_P(TricubicForward, MatchesPolin3Float32) {
  at::Tensor grid = random_grid({9, 11, 7}, at::kFloat);
  at::Tensor hkl = random_points(4000, grid, at::kFloat);
  for (const std::string mode : {"default", "nearest"}) {
    at::Tensor out = nanobragg_ops::tricubic_interp(grid, hkl, kIndexMin, 0.25, mode);
    ASSERT_EQ(out.scalar_type(), at::kFloat);
    // The reference sees exactly the float32 inputs, in float64.
    const auto ref = tricubic_reference(grid, hkl, kIndexMin, 0.25, mode);
    EXPECT_LE(max_rel_error(to_vector(out), ref), 1e-5) << mode;
  }
}

TEST_P(TricubicForward, SomePointsInsideAndSomeOutside) {
  // Guards the parity tests above against testing only one branch.
  at::Tensor grid = random_grid({9, 11, 7}, at::kDouble);
  at::Tensor hkl = random_points(4000, grid, at::kDouble);
  const double sentinel = -12345.0;
  const auto ref = tricubic_reference(grid, hkl, kIndexMin, sentinel, "default");
  const auto inside =
      std::count_if(ref.begin(), ref.end(), [&](double v) { return v != sentinel; });
  EXPECT_GT(inside, 100);
  EXPECT_LT(inside, 3900);
}

TEST_P(TricubicForward, IntegersAndHalfIntegers) {
  at::Tensor grid = random_grid({8, 8, 8}, at::kDouble);
  std::vector<double> values;
  for (double h = -5; h <= 6; h += 0.5) {
    for (double k = 1; k <= 11; k += 0.5) {
      values.insert(values.end(), {h, k, 0.5 * (h + k) - 4.0});
    }
  }
  at::Tensor hkl = at::tensor(values, at::kDouble).reshape({-1, 3}).to(opts(at::kDouble));
  for (const std::string mode : {"default", "nearest"}) {
    at::Tensor out = nanobragg_ops::tricubic_interp(grid, hkl, kIndexMin, 0.0, mode);
    const auto ref = tricubic_reference(grid, hkl, kIndexMin, 0.0, mode);
    EXPECT_LE(max_rel_error(to_vector(out), ref), 1e-12) << mode;
  }
}

TEST_P(TricubicForward, InterpolatesGridNodesExactly) {
  // Lagrange interpolation passes through the nodes: at an integer point
  // with a full stencil the value is the grid value there.
  at::Tensor grid = random_grid({6, 6, 6}, at::kDouble);
  at::Tensor hkl = at::tensor({-2.0, 4.0, -1.0, -1.0, 5.0, 0.0}, at::kDouble)
                       .reshape({2, 3})
                       .to(opts(at::kDouble));
  const auto out = to_vector(nanobragg_ops::tricubic_interp(grid, hkl, kIndexMin));
  const auto g = to_vector(grid);
  // (-2,4,-1) -> node (2,2,2); (-1,5,0) -> node (3,3,3) of a 6x6x6 grid.
  EXPECT_NEAR(out[0], g[2 * 36 + 2 * 6 + 2], 1e-13);
  EXPECT_NEAR(out[1], g[3 * 36 + 3 * 6 + 3], 1e-13);
}

TEST_P(TricubicForward, ReproducesCubicPolynomialsExactly) {
  // A cubic in each axis is reproduced exactly by 4-point Lagrange: an
  // analytic check that does not depend on any reference implementation.
  const int64_t n = 10;
  at::Tensor idx = at::arange(n, at::kDouble);
  auto f = [](const at::Tensor& h, const at::Tensor& k, const at::Tensor& l) {
    return 0.3 * h.pow(3) - h * k + 2.0 * l.pow(2) * k - 0.1 * l.pow(3) + 1.0;
  };
  at::Tensor h = (idx + kIndexMin[0]).view({n, 1, 1}).expand({n, n, n});
  at::Tensor k = (idx + kIndexMin[1]).view({1, n, 1}).expand({n, n, n});
  at::Tensor l = (idx + kIndexMin[2]).view({1, 1, n}).expand({n, n, n});
  at::Tensor grid = f(h, k, l).contiguous().to(opts(at::kDouble));
  at::Tensor pts = at::rand({500, 3}, at::kDouble) * 5;
  for (int d = 0; d < 3; ++d) {
    pts.select(1, d).add_(kIndexMin[d] + 1.5);  // stencil always inside
  }
  const at::Tensor expected = f(pts.select(1, 0), pts.select(1, 1), pts.select(1, 2));
  at::Tensor out = nanobragg_ops::tricubic_interp(grid, pts.to(opts(at::kDouble)), kIndexMin);
  EXPECT_LE(max_rel_error(to_vector(out), to_vector(expected)), 1e-12);
}

TEST_P(TricubicForward, NearestRoundsLikeNanoBragg) {
  // ceil(x - 0.5): 1.5 -> 1 and -0.5 -> -1. A 1x1x1-wide stencil never fits,
  // so every point takes the nearest branch.
  at::Tensor grid = at::arange(4, at::kDouble).view({4, 1, 1}).to(opts(at::kDouble));
  const std::array<int64_t, 3> index_min = {-2, 0, 0};
  at::Tensor hkl =
      at::tensor({1.5, 0.0, 0.0, -0.5, 0.0, 0.0, -1.5, 0.2, -0.4, 0.49, 0.0, 0.0, 1.51, 0.0, 0.0},
                 at::kDouble)
          .reshape({5, 3})
          .to(opts(at::kDouble));
  const auto out = to_vector(nanobragg_ops::tricubic_interp(grid, hkl, index_min, -1.0, "nearest"));
  // grid value = index - h_min = h + 2; 1.51 -> 2 is outside (h_max = 1).
  EXPECT_EQ(out, (std::vector<double>{3.0, 1.0, 0.0, 2.0, -1.0}));
}

TEST_P(TricubicForward, NonFiniteAndHugeCoordinatesGetDefault) {
  at::Tensor grid = random_grid({8, 8, 8}, at::kDouble);
  const double inf = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const std::vector<double> bad = {nan, inf, -inf, 1e30, -1e30, 1e308, -1e308};
  for (auto dtype : {at::kDouble, at::kFloat}) {
    for (double v : bad) {
      for (int axis = 0; axis < 3; ++axis) {
        at::Tensor hkl = at::tensor({-0.5, 5.5, 0.5}, at::kDouble);  // in range
        hkl[axis] = v;
        for (const std::string mode : {"default", "nearest"}) {
          at::Tensor out = nanobragg_ops::tricubic_interp(grid.to(dtype), hkl.to(opts(dtype)),
                                                          kIndexMin, 42.0, mode);
          EXPECT_EQ(out.item<double>(), 42.0) << "value " << v << " axis " << axis << " " << mode;
        }
      }
    }
  }
}

TEST_P(TricubicForward, IndexMinNearInt64LimitsNeverIndexesOutOfBounds) {
  const int64_t big = std::numeric_limits<int64_t>::max();
  const int64_t small = std::numeric_limits<int64_t>::min();
  // Every row is outside the grid for every index_min below (worked out by
  // hand in integers); row 3 sits at 2^63, past int64. Grids of 5 and of 4
  // nodes: with index_min = big - 2 the last node of either lies past int64,
  // and the vector path's bounds (lo + 1, lo + size - 2) must be computed
  // without overflowing (the sanitized build traps on signed overflow).
  at::Tensor hkl =
      at::tensor({0.5, 0.5, 0.5, 1e19, -1e19, 9.2e18, -9.2e18, 3.0, 2.0, 9.223372036854775808e18,
                  9.223372036854775808e18, 9.223372036854775808e18},
                 at::kDouble)
          .reshape({4, 3})
          .to(opts(at::kDouble));
  for (const int64_t size : {5, 4}) {
    at::Tensor grid = random_grid({size, size, size}, at::kDouble);
    for (const std::array<int64_t, 3>& imin :
         {std::array<int64_t, 3>{big - 2, big - 2, big - 2},
          std::array<int64_t, 3>{big - 3, big - 3, big - 3},
          std::array<int64_t, 3>{small, small, small}, std::array<int64_t, 3>{big, small, 0}}) {
      for (const std::string mode : {"default", "nearest"}) {
        const auto out = to_vector(nanobragg_ops::tricubic_interp(grid, hkl, imin, -3.0, mode));
        for (int i = 0; i < 4; ++i) {
          EXPECT_EQ(out[i], -3.0) << "row " << i << " " << mode << " size " << size;
        }
      }
    }
  }
}

TEST_P(TricubicForward, NonContiguousInputs) {
  at::Tensor base = random_grid({14, 9, 11}, at::kDouble);
  at::Tensor grid = base.permute({2, 0, 1}).slice(1, 1, 13, 2);  // [11, 6, 9], strided
  ASSERT_FALSE(grid.is_contiguous());
  at::Tensor pts = random_points(3000, grid, at::kDouble);
  // hkl as a strided view: every other row, components spread apart.
  at::Tensor wide = at::zeros({6000, 7}, opts(at::kDouble));
  wide.slice(0, 0, 6000, 2).slice(1, 0, 7, 3).copy_(pts);
  at::Tensor hkl = wide.slice(0, 0, 6000, 2).slice(1, 0, 7, 3);
  ASSERT_FALSE(hkl.is_contiguous());
  for (const std::string mode : {"default", "nearest"}) {
    at::Tensor out = nanobragg_ops::tricubic_interp(grid, hkl, kIndexMin, 0.0, mode);
    const auto ref = tricubic_reference(grid.contiguous(), pts, kIndexMin, 0.0, mode);
    EXPECT_LE(max_rel_error(to_vector(out), ref), 1e-12) << mode;
  }
}

TEST_P(TricubicForward, AnyLeadingShapeAndEmpty) {
  at::Tensor grid = random_grid({9, 11, 7}, at::kDouble);
  at::Tensor pts = random_points(2 * 3 * 5, grid, at::kDouble);
  // [2, 3, 5, 3], a transposed view, a single point and empty inputs.
  at::Tensor hkl4 = pts.reshape({2, 3, 5, 3});
  at::Tensor out4 = nanobragg_ops::tricubic_interp(grid, hkl4, kIndexMin);
  EXPECT_EQ(out4.sizes(), at::IntArrayRef({2, 3, 5}));
  const auto ref = tricubic_reference(grid, pts, kIndexMin, 0.0, "default");
  EXPECT_LE(max_rel_error(to_vector(out4), ref), 1e-12);

  at::Tensor hkl_t = hkl4.transpose(0, 2);  // [5, 3, 2, 3]
  at::Tensor out_t = nanobragg_ops::tricubic_interp(grid, hkl_t, kIndexMin);
  EXPECT_EQ(out_t.sizes(), at::IntArrayRef({5, 3, 2}));
  EXPECT_LE(max_rel_error(to_vector(out_t.transpose(0, 2).contiguous()), ref), 1e-12);

  at::Tensor one = nanobragg_ops::tricubic_interp(grid, pts[0], kIndexMin);
  EXPECT_EQ(one.dim(), 0);
  EXPECT_LE(max_rel_error(to_vector(one), {ref[0]}), 1e-12);

  for (auto shape : {std::vector<int64_t>{0, 3}, std::vector<int64_t>{4, 0, 3}}) {
    at::Tensor out =
        nanobragg_ops::tricubic_interp(grid, at::empty(shape, opts(at::kDouble)), kIndexMin);
    EXPECT_EQ(out.sizes(), at::IntArrayRef(shape).slice(0, shape.size() - 1));
  }
  // An empty grid: every point out of range.
  at::Tensor empty_grid = at::empty({0, 4, 4}, opts(at::kDouble));
  const auto out_e =
      to_vector(nanobragg_ops::tricubic_interp(empty_grid, pts, kIndexMin, 5.0, "nearest"));
  EXPECT_EQ(out_e, std::vector<double>(pts.size(0), 5.0));
}

// CPU only: the CPU thread count does not reach the CUDA kernels, so on CUDA
// this would compare a result with itself.
class TricubicForwardCpuThreads : public TricubicForward {};

TEST_P(TricubicForwardCpuThreads, BitwiseIdenticalWithOneAndTwoThreads) {
  at::Tensor grid = random_grid({20, 20, 20}, at::kFloat);
  at::Tensor hkl = random_points(50000, grid, at::kFloat);
  const int saved = at::get_num_threads();
  at::set_num_threads(1);
  at::Tensor one = nanobragg_ops::tricubic_interp(grid, hkl, kIndexMin, 0.0, "nearest");
  at::set_num_threads(2);
  at::Tensor two = nanobragg_ops::tricubic_interp(grid, hkl, kIndexMin, 0.0, "nearest");
  at::set_num_threads(saved);
  EXPECT_TRUE(bitwise_equal(one, two));
}

// Detector lookups come in runs of consecutive points in one cell, which
// the CPU kernel contracts with each row read once for several points. Runs
// of 1 to 9 points, in random cells whose stencils are inside the grid, with
// a contiguous grid and one whose l axis is strided; each point's value must
// match polin3 and be, to the bit, the value it gets on its own (each point
// followed by one outside the grid, so that no group of points forms).
TEST_P(TricubicForward, RunsOfPointsInOneCellMatchPolin3AndIsolatedPoints) {
  for (const at::ScalarType dtype : {at::kDouble, at::kFloat}) {
    const at::Tensor contiguous = random_grid({10, 12, 9}, dtype);
    const at::Tensor strided_l = random_grid({10, 9, 12}, dtype).transpose(1, 2);
    for (const at::Tensor& grid : {contiguous, strided_l}) {
      std::vector<at::Tensor> runs;
      int64_t n = 0;
      while (n < 3000) {
        const int64_t length = 1 + (n * 7 + 3) % 9;
        at::Tensor corner = at::empty({1, 3}, at::kDouble);
        for (int d = 0; d < 3; ++d) {
          // first node n - 1 in [index_min, index_min + size - 4]
          corner[0][d] = kIndexMin[d] + 1 + at::randint(grid.size(d) - 3, {}).item<int64_t>();
        }
        runs.push_back(corner + at::rand({length, 3}, at::kDouble));
        n += length;
      }
      const at::Tensor hkl = at::cat(runs).to(opts(dtype));
      const at::Tensor out = nanobragg_ops::tricubic_interp(grid, hkl, kIndexMin, 0.0);
      const auto ref = tricubic_reference(grid, hkl, kIndexMin, 0.0, "default");
      EXPECT_LE(max_rel_error(to_vector(out), ref), dtype == at::kDouble ? 1e-12 : 1e-5)
          << dtype << (grid.is_contiguous() ? " contiguous" : " strided l");
      const at::Tensor mixed = at::stack({hkl, hkl + 1000}, 1).reshape({-1, 3});
      const at::Tensor alone =
          nanobragg_ops::tricubic_interp(grid, mixed, kIndexMin, 0.0).view({-1, 2}).select(1, 0);
      EXPECT_TRUE(bitwise_equal(out, alone.contiguous()))
          << dtype << (grid.is_contiguous() ? " contiguous" : " strided l");
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Devices, TricubicForward, ::testing::ValuesIn(test_devices()),
                         device_test_name);
INSTANTIATE_TEST_SUITE_P(Devices, TricubicForwardCpuThreads, ::testing::Values("cpu"),
                         device_test_name);

}  // namespace
}  // namespace nanobragg_test
