// The GPU goals of issue 14, measured when the bench runs with --device cuda,
// in float32 whatever --dtype says (report: "GPU goals"):
//
//   * tricubic forward over 2048² × 9 clustered lookups (workloads.h's
//     detector, pixel-major, a 30 A cell so that all of them are inside the
//     64³ grid): at least 10 G lookups/s;
//   * the same forward+backward, gradients to hkl and to the grid: at least
//     2 G lookups/s;
//   * the grid gradient alone, deterministic
//     (at::globalContext().setDeterministicAlgorithms(true, false)) against
//     the default atomic one: at most 2× its time (the rows also count how
//     the lookups' taps spread over the nodes: workloads.h,
//     GridGradientWork);
//   * absorption forward at 2048²: bytes read + written per call / time, as a
//     fraction of the device's copy bandwidth measured in the same run (a
//     1 GiB device-to-device copy_): at least 50% (kBandwidthGoal).
//
// The times are the GPU's (CUDA events), not the host's: see cuda_goals.cpp.
#pragma once

#include <cstdint>
#include <vector>

#include "report.h"

namespace nanobragg_bench {

// The workload of the tricubic goals: a kGoalSize² detector, kGoalPointsPerPixel
// lookups per pixel, a kGoalCell cell (A; every lookup inside the 64³ grid,
// workloads.h); the absorption goal's detector is kGoalSize² too.
constexpr int64_t kGoalSize = 2048, kGoalPointsPerPixel = 9;
constexpr double kGoalCell = 30.0;

// The goal rows (Row::cuda_goal), each with its Goal where it measures one;
// a measurement that fails gives a row with its error instead. At most
// `repeats` timed batches, and no more than about `max_seconds` of them, per
// measurement. Throws if the bench was built without CUDA.
std::vector<Row> run_cuda_goals(int64_t repeats, double max_seconds);

}  // namespace nanobragg_bench
