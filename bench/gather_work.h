// `nanobragg_bench --gather-work`: how the CUDA grid gradient's work spreads
// over the grid's nodes for the bench's tricubic workloads (workloads.h,
// GridGradientWork), counted on the CPU in float64 whatever --device and
// --dtype say; no GPU needed. The GPU goals' grid-gradient rows carry the
// same counts for the float32 lookups they time (a point on a cell's edge
// may round into the next cell there), beside the times they measure.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace nanobragg_bench {

// Writes `path` (markdown: one row per workload, and a worst case with every
// point in one cell) and prints it; first checks the counts where they are
// known in closed form (stencils at the grid's edges, NaN and Inf, two
// neighbouring cells), and throws if one is off or the file cannot be
// written. The workloads: the GPU goals' (2048² × 9, 30 A cell), the same
// with a 50 A cell, and the bench's CPU cases (512² × 1, 50 A); or, when
// `sizes` is not empty, size² × per_pixel with a 30 A and a 50 A cell for
// each size.
void write_gather_work(const std::string& path, const std::string& env_line,
                       const std::vector<int64_t>& sizes, int64_t per_pixel);

}  // namespace nanobragg_bench
