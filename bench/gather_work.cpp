#include "gather_work.h"

#include <ATen/ATen.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <limits>
#include <sstream>
#include <string>

#include "cuda_goals.h"
#include "workloads.h"

namespace nanobragg_bench {
namespace {

// An H200's resident warps: 132 SMs × 64 (2048 threads each), the warps the
// gather runs at once; its fair share of the work is all nodes' iterations
// over these. (The GPU goals' rows use the device's own numbers.)
constexpr int64_t kH200ResidentWarps = 132 * 64;

// A count with thousands separators (counts are never negative).
std::string with_commas(int64_t v) {
  const std::string digits = std::to_string(v);
  std::string out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

std::string row(const std::string& name, const GridGradientWork& w) {
  char ratio[32];
  std::snprintf(ratio, sizeof ratio, "%.1f", w.busiest_over_fair_share(kH200ResidentWarps));
  return "| " + name + " | " + with_commas(w.points_inside) + " | " + with_commas(w.cells_used) +
         " | " + with_commas(w.most_points_in_a_cell) + " | " + with_commas(w.nodes_with_taps) +
         " | " + with_commas(w.table_iterations) + " | " + with_commas(w.gather_iterations) +
         " | " + with_commas(w.busiest_node_iterations) + " | " + ratio + " | " +
         with_commas(w.busiest_node_taps) + " |";
}

std::string workload_name(int64_t size, int64_t per_pixel, double cell) {
  return std::to_string(size) + "² × " + std::to_string(per_pixel) + ", " +
         std::to_string(int(cell)) + " A cell";
}

GridGradientWork workload(int64_t size, int64_t per_pixel, double cell) {
  const TricubicInputs in =
      make_tricubic_inputs(size, per_pixel, at::TensorOptions().dtype(at::kDouble), cell);
  return grid_gradient_work(points_per_cell(in.hkl, in.index_min, in.grid.sizes()));
}

// The counts where they are known in closed form; throws if one is off.
void check_counts() {
  // Stencils at the grid's edges (nodes -32 .. 31): x's stencil is nodes
  // floor(x) - 1 .. floor(x) + 2, so x = -31 and 29.9 are inside, -31.5 and
  // 30 are not, nor are NaN and Inf; 0.5 starts at node -1, cell 31.
  const double inf = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const at::Tensor edges =
      at::tensor({0.5, 0.5, 0.5, -31.0, -31.0, -31.0, 29.9, 29.9, 29.9, -31.5, 0.5,  0.5, 0.5, 30.0,
                  0.5, nan, 0.5, 0.5,   0.5,   inf,   0.5,  0.5,  0.5,  -inf,  1e30, 0.5, 0.5},
                 at::kDouble)
          .view({9, 3});
  const at::Tensor edge_counts = points_per_cell(edges, {-32, -32, -32}, {64, 64, 64});
  TORCH_CHECK(
      edge_counts.sum().item<int64_t>() == 3 && edge_counts[31][31][31].item<int64_t>() == 1 &&
          edge_counts[0][0][0].item<int64_t>() == 1 && edge_counts[60][60][60].item<int64_t>() == 1,
      "points_per_cell: stencils at the grid's edges counted wrong");
  // Two neighbouring cells along l with 1000 points each: sorted positions
  // [0, 1000) and [1000, 2000). The first is one long piece (32 table
  // iterations); the second is cut at 1024 into a short piece of 24 and a
  // long one of 976 (31 iterations). A node covered by the first's stencil
  // takes 1 iteration, by the second's 2 (a table read, a short piece); the
  // 48 nodes both cover 3, the other 16 + 16 one or two.
  at::Tensor two = at::zeros({61, 61, 61}, at::kLong);
  two[30][30][30] = 1000;
  two[30][30][31] = 1000;
  const GridGradientWork w = grid_gradient_work(two);
  TORCH_CHECK(w.points_inside == 2000 && w.cells_used == 2 && w.most_points_in_a_cell == 1000 &&
                  w.nodes_with_taps == 80 && w.busiest_node_taps == 2000 &&
                  w.table_iterations == 32 + 31 && w.busiest_node_iterations == 3 &&
                  w.gather_iterations == 48 * 3 + 16 * 1 + 16 * 2,
              "grid_gradient_work: two neighbouring cells, whose counts are known, came out wrong");
  // One cell of 40 × 1024 points: 40 whole pieces, 40 × 32 table
  // iterations; its 64 nodes read 40 table rows in ceil(40 / 32) = 2.
  at::Tensor one = at::zeros({61, 61, 61}, at::kLong);
  one[5][6][7] = 40 * 1024;
  const GridGradientWork v = grid_gradient_work(one);
  TORCH_CHECK(v.table_iterations == 40 * 32 && v.busiest_node_iterations == 2 &&
                  v.gather_iterations == 64 * 2,
              "grid_gradient_work: one cell of whole pieces came out wrong");
}

}  // namespace

void write_gather_work(const std::string& path, const std::string& env_line,
                       const std::vector<int64_t>& sizes, int64_t per_pixel) {
  check_counts();
  std::ostringstream t;
  t << "# The CUDA grid gradient's work per node\n\n"
    << "Counted by `nanobragg_bench --gather-work` from the bench's own lookups "
       "(`bench/workloads.cpp`, float64, on the CPU; "
    << env_line
    << "). A node's taps are the points of the 64 stencils that cover it. The deterministic "
       "path sorts the points by stencil start and cuts each start's run of points at every "
       "1024th sorted position; one warp sums each piece of 32 points or more into a table row "
       "(table iterations: 32 points each), and one warp per node takes, for each of its 64 "
       "stencil starts, the table rows of that run 32 at a time and each short piece's points "
       "(fewer than 32) in one iteration (gather iterations). The atomic path adds every tap "
       "at its node's address. A fair share is all nodes' gather iterations divided by "
    << kH200ResidentWarps << " resident warps (an H200: 132 SMs × 64).\n\n"
    << "| workload | points inside | cells used | most points in a cell | nodes with taps | "
       "table: warp iterations | gather: warp iterations, all nodes | gather: the busiest "
       "node's | busiest ÷ fair share of an H200's resident warps | atomic: adds to the hottest "
       "node |\n"
    << "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
  if (sizes.empty()) {
    t << row("GPU goals: " + workload_name(kGoalSize, kGoalPointsPerPixel, kGoalCell),
             workload(kGoalSize, kGoalPointsPerPixel, kGoalCell))
      << "\n";
    t << row(workload_name(kGoalSize, kGoalPointsPerPixel, 50.0),
             workload(kGoalSize, kGoalPointsPerPixel, 50.0))
      << "\n";
    t << row("512² × 1, 50 A cell (the bench's CPU cases)", workload(512, 1, 50.0)) << "\n";
  }
  for (const int64_t size : sizes) {
    for (const double cell : {30.0, 50.0}) {
      t << row(workload_name(size, per_pixel, cell), workload(size, per_pixel, cell)) << "\n";
    }
  }
  // Every point of the GPU goals in one cell of the bench's grid (a stencil
  // start per cell: kGridSide - 3 per axis): 64 nodes of n taps each.
  const int64_t cells = kGridSide - 3, middle = cells / 2;
  at::Tensor one_cell = at::zeros({cells, cells, cells}, at::kLong);
  one_cell[middle][middle][middle] = kGoalSize * kGoalSize * kGoalPointsPerPixel;
  t << row("worst case: " + std::to_string(kGoalSize) + "² × " +
               std::to_string(kGoalPointsPerPixel) + " in one cell",
           grid_gradient_work(one_cell))
    << "\n";
  std::ofstream file(path);
  file << t.str();
  file.close();
  TORCH_CHECK(file.good(), "--gather-work: could not write ", path);
  std::cout << t.str();
}

}  // namespace nanobragg_bench
