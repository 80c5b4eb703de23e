// The deterministic grid gradient's gather (what CUDA runs under
// torch.use_deterministic_algorithms), executed here on the CPU through the
// shared header, step by step as the CUDA kernels do it (sort keys, runs,
// sorted samples, 32 lanes per node, the lanes' shuffle tree), against the
// CPU kernels' scatter: first order (the backward op's grid gradient) and
// second order (the double backward's grid gradient). And the per-point
// functions the CUDA kernels call (value, hkl gradient, the atomic path's
// scatter), against polin3.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "test_utils.h"
#include "tricubic_reference.h"
#include "tricubic/tricubic_math.h"

namespace nanobragg_test {
namespace {

using namespace nanobragg::tricubic;

const std::array<int64_t, 3> kIndexMin = {3, -5, 0};

at::Tensor backward_grid(const at::Tensor& grad, const at::Tensor& grid, const at::Tensor& hkl,
                         const std::string& mode) {
  const auto& op = tricubic_backward_op();
  return std::get<0>(op.call(grad, grid, hkl, kIndexMin, mode, {true, false}));
}

at::Tensor double_backward_grid(const at::Tensor& v, const at::Tensor& grad, const at::Tensor& grid,
                                const at::Tensor& hkl, const std::string& mode) {
  const auto& op = tricubic_double_backward_op();
  return std::get<1>(
      op.call(std::nullopt, v, grad, grid, hkl, kIndexMin, mode, {false, true, false}));
}

// What the host run of the deterministic path met: pieces that the table
// holds (stencil and nearest) and runs cut into several pieces.
struct PieceCounts {
  int64_t long_stencil = 0, long_nearest = 0, cut_runs = 0, short_ends_of_cut_runs = 0;
  int64_t short_firsts_of_cut_runs = 0;
};

// The five steps of the deterministic path, on the host.
// Key: the sort key's type, int32 or int64 as the CUDA path picks by grid
// size (the host sorts int64 keys and hands steps 2 to 5 a copy of Key's).
template <bool kSecondOrder, typename Key = int64_t>
std::vector<double> gather_on_host(const at::Tensor& grid, const at::Tensor& hkl,
                                   const at::Tensor& grad, const at::Tensor& v, OutOfRange mode,
                                   PieceCounts* counts = nullptr) {
  const GridShape shape{{grid.size(0), grid.size(1), grid.size(2)},
                        {kIndexMin[0], kIndexMin[1], kIndexMin[2]}};
  const int64_t n = hkl.size(0);
  auto h = hkl.accessor<double, 2>();
  auto g = grad.accessor<double, 1>();
  auto w = v.accessor<double, 2>();
  auto point = [&](int64_t i) {
    return PointSample<double>{h[i][0], h[i][1], h[i][2], g[i], {w[i][0], w[i][1], w[i][2]}};
  };
  // 1. keys; 2. stable sort and runs; 3. samples in sorted order.
  at::Tensor keys = at::empty({n}, at::kLong);
  for (int64_t i = 0; i < n; ++i) {
    const PointSample<double> s = point(i);
    keys[i] = point_sort_key<double>(shape, s.h, s.k, s.l, mode);
  }
  auto [sorted, order] = at::sort(keys, /*stable=*/true, 0, false);
  const int64_t max_key = max_sort_key(shape.size);
  std::vector<int32_t> run_begin(static_cast<size_t>(max_key + 1), 0);
  std::vector<int32_t> run_end(static_cast<size_t>(max_key + 1), 0);
  std::vector<SortedSample<double, kSecondOrder>> samples(static_cast<size_t>(n));
  const at::Tensor sorted_keys = sorted.to(c10::CppTypeToScalarType<Key>::value).contiguous();
  const Key* sk = sorted_keys.const_data_ptr<Key>();
  const int64_t* ord = order.const_data_ptr<int64_t>();
  const int64_t rows = piece_table_rows(n);
  std::vector<int32_t> row_marks(static_cast<size_t>(rows), 0);
  for (int64_t i = 0; i < n; ++i) {
    mark_run(sk, n, i, run_begin.data(), run_end.data());
    // at most one mark per row: a second would overwrite the first (each
    // position of a row marks a value of its own)
    const int32_t before = row_marks[static_cast<size_t>(i / kLongPiece)];
    mark_long_piece<kSecondOrder>(sk, n, i, max_key, row_marks.data());
    EXPECT_TRUE(before == 0 || row_marks[static_cast<size_t>(i / kLongPiece)] == before) << i;
    samples[static_cast<size_t>(i)] =
        make_sorted_sample<double, kSecondOrder>(shape, point(ord[i]), mode);
  }
  // 4. the table of long pieces, found by their rows' marks: 32 lanes and
  // their trees.
  std::vector<double> table(static_cast<size_t>(rows * kTaps), NAN);
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t mark = row_marks[static_cast<size_t>(r)];
    if (mark == 0) continue;
    const Piece piece = marked_piece(sk, r, mark, run_end.data());
    EXPECT_TRUE(piece.is_long()) << piece.begin;
    EXPECT_EQ(piece.table_row(), r);
    double* row = table.data() + r * kTaps;
    const int64_t q = piece.begin;
    if (sk[q] % 2 == 0) {
      double lanes[32][kTaps], sums[kTaps];
      for (int lane = 0; lane < 32; ++lane) {
        piece_lane_taps<double, kSecondOrder>(samples.data(), piece, lane, lanes[lane]);
      }
      warp_tap_sums(lanes, sums);
      std::copy(sums, sums + kTaps, row);
      if (counts != nullptr) ++counts->long_stencil;
    } else {
      double lanes[32];
      for (int lane = 0; lane < 32; ++lane) {
        lanes[lane] = piece_lane_grads<double, kSecondOrder>(samples.data(), piece, lane);
      }
      row[0] = lane_tree_sum(lanes);
      if (counts != nullptr) ++counts->long_nearest;
    }
  }
  if (counts != nullptr) {
    for (int64_t key = 0; key < max_key; ++key) {
      const int64_t pieces = piece_count(run_begin[key], run_end[key]);
      if (pieces < 2) continue;
      ++counts->cut_runs;
      for (int64_t k : {int64_t(0), pieces - 1}) {
        counts->short_ends_of_cut_runs += !run_piece(run_begin[key], run_end[key], k).is_long();
      }
      counts->short_firsts_of_cut_runs += !run_piece(run_begin[key], run_end[key], 0).is_long();
    }
  }
  // 5. per node, 32 lanes and their tree.
  std::vector<double> out(static_cast<size_t>(grid.numel()));
  for (int64_t node = 0; node < grid.numel(); ++node) {
    double lanes[32];
    for (int lane = 0; lane < 32; ++lane) {
      lanes[lane] = gather_node_lane<double, kSecondOrder>(
          shape, node, lane, run_begin.data(), run_end.data(), samples.data(), table.data());
    }
    out[static_cast<size_t>(node)] = lane_tree_sum(lanes);
  }
  return out;
}

// Points clustered into a few cells (long runs, so every lane has work),
// spread ones, one exactly on a node, NaN, and some outside the grid.
at::Tensor clustered_points(int64_t n) {
  at::Tensor hkl = at::rand({n, 3}, at::kDouble) * 14 + at::tensor({2.0, -6.0, -1.0}, at::kDouble);
  const int64_t clustered = n / 2;
  at::Tensor centres = at::tensor({7.3, -1.6, 4.2, 9.8, 0.4, 2.9}, at::kDouble).view({2, 3});
  at::Tensor which = at::randint(0, 2, {clustered}, at::kLong);
  hkl.slice(0, 0, clustered)
      .copy_(centres.index_select(0, which) + at::rand({clustered, 3}, at::kDouble) * 0.3);
  hkl[clustered][0] = 8.0;  // exactly on a node
  hkl[clustered + 1][1] = NAN;
  hkl[clustered + 2][2] = 1e30;
  return hkl;
}

TEST(TricubicGatherMath, FirstOrderMatchesScatter) {
  at::manual_seed(5);
  at::Tensor grid = at::rand({9, 10, 11}, at::kDouble);
  const int64_t n = 6000;
  at::Tensor hkl = clustered_points(n);
  at::Tensor grad = at::randn({n}, at::kDouble);
  at::Tensor no_v = at::zeros({n, 3}, at::kDouble);
  for (const std::string mode : {"default", "nearest"}) {
    const OutOfRange m = mode == "nearest" ? OutOfRange::Nearest : OutOfRange::Default;
    const std::vector<double> gathered = gather_on_host<false>(grid, hkl, grad, no_v, m);
    const std::vector<double> expected = to_vector(backward_grid(grad, grid, hkl, mode));
    EXPECT_LE(max_rel_error(gathered, expected, 1.0), 1e-12) << mode;
    double norm = 0;
    for (double x : expected) norm += std::abs(x);
    EXPECT_GT(norm, 1.0) << "the reference gradient should not be empty";
  }
}

TEST(TricubicGatherMath, SecondOrderMatchesScatter) {
  at::manual_seed(6);
  at::Tensor grid = at::rand({8, 9, 10}, at::kDouble);
  const int64_t n = 5000;
  at::Tensor hkl = clustered_points(n);
  at::Tensor grad = at::randn({n}, at::kDouble);
  at::Tensor v = at::randn({n, 3}, at::kDouble);
  for (const std::string mode : {"default", "nearest"}) {
    const OutOfRange m = mode == "nearest" ? OutOfRange::Nearest : OutOfRange::Default;
    const std::vector<double> gathered = gather_on_host<true>(grid, hkl, grad, v, m);
    const std::vector<double> expected = to_vector(double_backward_grid(v, grad, grid, hkl, mode));
    EXPECT_LE(max_rel_error(gathered, expected, 1.0), 1e-12) << mode;
  }
}

// The per-point functions of the shared header that the CUDA kernels run
// (tricubic_value, tricubic_hkl_grad, tricubic_grid_grad_scatter: the
// forward, the hkl gradient and the atomic grid gradient) and the CPU's
// per-point backward (tricubic_backward_point, both gradients in one pass),
// on the host, against polin3. The CPU kernels' vector path takes every
// stencil point it can test exactly, with its own contractions and scatter,
// so without this test a fault in these shows only on a GPU. Values against
// polin3; the hkl gradient against central differences of it; the grid
// gradient, summed over points with random incoming gradients, against
// polin3 of unit grids (the op is linear in the grid, so dF(x)/dgrid[j] is
// polin3 of the grid that is 1 at node j and 0 elsewhere).
TEST(TricubicPointMath, PerPointFunctionsOfTheGpuKernelsMatchPolin3) {
  at::manual_seed(8);
  const std::array<int64_t, 3>& lo = kIndexMin;
  at::Tensor grid = at::rand({6, 7, 8}, at::kDouble);
  const int64_t n = 24;
  // Inside (fractional in every axis, over every stencil start: floor(x) in
  // [4, 6] x [-4, -1] x [1, 5]), near each face, on a node, and out.
  at::Tensor hkl = at::rand({n, 3}, at::kDouble) * at::tensor({3.0, 4.0, 5.0}, at::kDouble) +
                   at::tensor({4.0, -4.0, 1.0}, at::kDouble);
  hkl[0] = at::tensor({4.01, -3.98, 1.02}, at::kDouble);  // the lowest stencil start
  hkl[1] = at::tensor({6.99, -0.01, 5.99}, at::kDouble);  // the highest
  hkl[2] = at::tensor({5.0, -2.0, 3.0}, at::kDouble);     // on a node
  hkl[3] = at::tensor({2.6, -2.2, 3.4}, at::kDouble);     // h below the stencil range
  hkl[4] = at::tensor({4.3, -2.2, 7.3}, at::kDouble);     // l two nodes past it
  hkl[5] = at::tensor({7.01, -2.2, 3.4}, at::kDouble);    // just past the top, h
  hkl[6] = at::tensor({5.3, 0.01, 3.4}, at::kDouble);     // k
  hkl[7] = at::tensor({5.3, -2.2, 6.01}, at::kDouble);    // l
  at::Tensor grad = at::randn({n}, at::kDouble);
  auto x = hkl.accessor<double, 2>();
  auto g = grad.accessor<double, 1>();
  const GridShape shape{{grid.size(0), grid.size(1), grid.size(2)}, {lo[0], lo[1], lo[2]}};
  const GridView<double> view{grid.const_data_ptr<double>(),
                              {shape.size[0], shape.size[1], shape.size[2]},
                              {grid.stride(0), grid.stride(1), grid.stride(2)},
                              {lo[0], lo[1], lo[2]}};
  const double fill = -7.5;
  for (const std::string mode : {"default", "nearest"}) {
    SCOPED_TRACE(mode);
    const OutOfRange m = mode == "nearest" ? OutOfRange::Nearest : OutOfRange::Default;
    std::vector<double> scattered(static_cast<size_t>(grid.numel()), 0.0);
    std::vector<double> in_one_pass(scattered.size(), 0.0);
    auto add = [&](int64_t i, double v) { scattered[static_cast<size_t>(i)] += v; };
    auto add_one_pass = [&](int64_t i, double v) { in_one_pass[static_cast<size_t>(i)] += v; };
    for (int64_t p = 0; p < n; ++p) {
      SCOPED_TRACE("point " + std::to_string(p));
      const std::array<double, 3> xp = {x[p][0], x[p][1], x[p][2]};
      EXPECT_NEAR((tricubic_value<double>(view, xp[0], xp[1], xp[2], m, fill)),
                  tricubic_reference(grid, lo, xp, fill, mode), 1e-12);
      double d_hkl[3], d_hkl_one_pass[3];
      tricubic_hkl_grad<double>(view, xp[0], xp[1], xp[2], m, g[p], d_hkl);
      for (int d = 0; d < 3; ++d) {
        // Central differences of polin3, a cubic along each axis: the
        // step's error is step^2/6 times the third derivative, about 1e-9
        // here; zero where the point takes the nearest node or the default.
        // On a node the stencil moves with floor(x), so there the op's
        // derivative is the one from above: a forward difference (error
        // about step/2 times the second derivative).
        const bool on_node = p == 2;
        const double step = on_node ? 1e-7 : 1e-4;
        std::array<double, 3> up = xp, down = xp;
        up[d] += step;
        if (!on_node) down[d] -= step;
        const double fd = (tricubic_reference(grid, lo, up, fill, mode) -
                           tricubic_reference(grid, lo, down, fill, mode)) /
                          (on_node ? step : 2 * step);
        EXPECT_NEAR(d_hkl[d], g[p] * fd, 1e-6 * (1 + std::abs(g[p] * fd))) << "axis " << d;
      }
      tricubic_grid_grad_scatter<double>(shape.size, shape.lo, xp[0], xp[1], xp[2], m, g[p], add);
      tricubic_backward_point<double, true>(view, xp[0], xp[1], xp[2], m, g[p], d_hkl_one_pass,
                                            add_one_pass);
      for (int d = 0; d < 3; ++d) EXPECT_NEAR(d_hkl_one_pass[d], d_hkl[d], 1e-12);
    }
    std::vector<double> expected(scattered.size(), 0.0);
    at::Tensor unit = at::zeros_like(grid);
    double* u = unit.mutable_data_ptr<double>();
    for (int64_t j = 0; j < grid.numel(); ++j) {
      u[j] = 1.0;
      for (int64_t p = 0; p < n; ++p) {
        expected[static_cast<size_t>(j)] +=
            g[p] * tricubic_reference(unit, lo, {x[p][0], x[p][1], x[p][2]}, 0.0, mode);
      }
      u[j] = 0.0;
    }
    EXPECT_LE(max_rel_error(scattered, expected, 1.0), 1e-12);
    EXPECT_LE(max_rel_error(in_one_pass, expected, 1.0), 1e-12);
    double norm = 0;
    for (double v : expected) norm += std::abs(v);
    EXPECT_GT(norm, 1.0) << "the reference gradient should not be empty";
  }
}

// Runs of every length that matters to the piece table (tricubic_math.h,
// step 4): 1, 31 (short), 32 (the shortest long piece), 33, 1023, 1024,
// 1025 (one kPieceSpan, either side), 2600 and 364 stencil points in a cell
// of their own, in shuffled point order, so that runs start at many offsets
// into a span and are cut into long and short pieces (in "default" mode the
// run after the 364 starts 10 points before a span ends); in "nearest" mode
// 417 more points nearest one corner node (a long nearest piece, sorted
// first: then the 2600-point run ends 10 points into a span) and some
// outside the grid. The host run of all five steps against the CPU scatter.
TEST(TricubicGatherMath, RunsOfEveryPieceShapeMatchScatter) {
  at::manual_seed(7);
  at::Tensor grid = at::rand({9, 10, 11}, at::kDouble);
  const std::vector<int64_t> lengths = {1, 31, 32, 33, 1023, 1024, 1025, 2600, 364};
  std::vector<at::Tensor> parts;
  for (size_t j = 0; j < lengths.size(); ++j) {  // cell j: first stencil node (j % 5, j / 5, 1)
    const at::Tensor cell =
        at::tensor({double(kIndexMin[0] + 1 + int64_t(j) % 5),
                    double(kIndexMin[1] + 1 + int64_t(j) / 5), double(kIndexMin[2] + 2)},
                   at::kDouble);
    parts.push_back(cell + at::rand({lengths[j], 3}, at::kDouble) * 0.999);
  }
  const at::Tensor corner =
      at::tensor({double(kIndexMin[0]), double(kIndexMin[1]), double(kIndexMin[2])}, at::kDouble);
  parts.push_back(corner + at::rand({417, 3}, at::kDouble) * 0.4);  // nearest node 0
  parts.push_back(corner - 50.0 + at::rand({40, 3}, at::kDouble));  // outside the grid
  at::Tensor hkl = at::cat(parts);
  hkl = hkl.index_select(0, at::randperm(hkl.size(0), at::kLong)).contiguous();
  const int64_t n = hkl.size(0);
  at::Tensor grad = at::randn({n}, at::kDouble);
  at::Tensor v = at::randn({n, 3}, at::kDouble);
  for (const std::string mode : {"default", "nearest"}) {
    const OutOfRange m = mode == "nearest" ? OutOfRange::Nearest : OutOfRange::Default;
    PieceCounts first, second;
    const std::vector<double> gathered = gather_on_host<false>(grid, hkl, grad, v, m, &first);
    EXPECT_LE(max_rel_error(gathered, to_vector(backward_grid(grad, grid, hkl, mode)), 1.0), 1e-12)
        << mode;
    // int32 keys (every grid below 2^30 nodes on CUDA) give the same sums
    EXPECT_EQ(gathered, (gather_on_host<false, int32_t>(grid, hkl, grad, v, m))) << mode;
    const std::vector<double> gathered2 = gather_on_host<true>(grid, hkl, grad, v, m, &second);
    EXPECT_LE(
        max_rel_error(gathered2, to_vector(double_backward_grid(v, grad, grid, hkl, mode)), 1.0),
        1e-12)
        << mode;
    // 32, 33: one long piece each; 1023 ... 2600 cut at span boundaries.
    EXPECT_GE(first.long_stencil, 2 + 4 * 2) << mode;
    EXPECT_EQ(first.long_stencil, second.long_stencil) << mode;
    EXPECT_GE(first.cut_runs, 4) << mode;
    EXPECT_GE(first.short_ends_of_cut_runs, 1) << mode << ": no run ends in a short piece";
    if (mode == "default") {
      EXPECT_GE(first.short_firsts_of_cut_runs, 1) << mode << ": no run starts with a short piece";
    }
    EXPECT_EQ(first.long_nearest > 0, mode == "nearest") << mode;
    EXPECT_EQ(second.long_nearest, 0) << mode << ": the second order has no nearest terms";
  }
}

// The CUDA kernels' transposing warp sum gives each of its 64 sums the same
// tree of additions as a warp's xor shuffles give one value (offsets 16, 8,
// 4, 2, 1), so its host reproduction must equal lane_tree_sum column by
// column, to the bit, on values whose sum depends on the order.
TEST(TricubicGatherMath, WarpTapSumsAddEachTapInTheLaneTree) {
  at::manual_seed(9);
  const at::Tensor values = at::randn({32, kTaps}, at::kFloat) *
                            at::pow(10.0, at::randint(-6, 7, {32, kTaps}, at::kFloat));
  float lanes[32][kTaps], sums[kTaps];
  auto acc = values.accessor<float, 2>();
  for (int l = 0; l < 32; ++l)
    for (int t = 0; t < kTaps; ++t) lanes[l][t] = acc[l][t];
  warp_tap_sums(lanes, sums);
  int order_matters = 0;
  for (int t = 0; t < kTaps; ++t) {
    float column[32];
    float in_order = 0.0f;
    for (int l = 0; l < 32; ++l) column[l] = lanes[l][t], in_order += lanes[l][t];
    EXPECT_EQ(sums[t], lane_tree_sum(column)) << "tap " << t;
    order_matters += sums[t] != in_order;
  }
  EXPECT_GT(order_matters, 8) << "values whose sum does not depend on the order test nothing";
}

TEST(TricubicGatherMath, LaneTreeSumAddsInATree) {
  // Lane 0 holds 1e8, the others 4 (float spacing at 1e8 is 8). Added left
  // to right every +4 is a tie that rounds back to 1e8; in the tree lane 0
  // first gets one 4 (lost), then partial sums of 1 + 2 + 4 + 8 + 16 lanes
  // (8, 16, 32, 64, exact): 1e8 + 120. The exact sum is 1e8 + 124.
  float lanes[32];
  for (int l = 0; l < 32; ++l) lanes[l] = l == 0 ? 1e8f : 4.0f;
  EXPECT_EQ(lane_tree_sum(lanes), 100000120.0f);
}

}  // namespace
}  // namespace nanobragg_test
