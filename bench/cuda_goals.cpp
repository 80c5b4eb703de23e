#include "cuda_goals.h"

#include <stdexcept>

#ifdef NANOBRAGG_WITH_CUDA
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/Sleep.h>
#include <c10/cuda/CUDAFunctions.h>
#include <torch/autograd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <functional>
#include <iomanip>
#include <iostream>
#include <string>
#include <tuple>

#include "memory.h"
#include "nanobragg_ops/ops.h"
#include "workloads.h"
#endif

namespace nanobragg_bench {

#ifndef NANOBRAGG_WITH_CUDA

std::vector<Row> run_cuda_goals(int64_t, double) {
  throw std::runtime_error("the GPU goals need a bench built with CUDA (NANOBRAGG_CUDA=ON)");
}

#else

namespace {

constexpr double kForwardGoal = 10.0;         // G lookups/s
constexpr double kForwardBackwardGoal = 2.0;  // G lookups/s
constexpr double kDeterministicGoal = 2.0;    // × the atomic grid gradient's time
constexpr double kBandwidthGoal = 0.5;        // of the measured copy bandwidth (issue 14)
constexpr int64_t kCopyBytes = int64_t(1) << 30;

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// GPU seconds per call. The host clock around a synchronised call counts the
// launch and the synchronisation too, which is most of an absorption call
// (~20 us of GPU time at 2048² on an H200). So the calls run in batches of
// about 2 ms of GPU work between two CUDA events, and each batch is queued
// behind a sleep kernel that holds the stream until the host has queued the
// whole batch: the events then see the GPU's time only. Per call: a batch's
// time / its calls; the row's warm figures are the median over batches.
// The first call (cold, host clock, synchronised) and one warm call, which
// sizes the batch, are not part of it.
void time_on_gpu(Row& r, const std::function<void()>& call, int64_t repeats, double max_seconds) {
  auto t0 = Clock::now();
  call();
  c10::cuda::device_synchronize();
  r.cold_seconds = since(t0);
  t0 = Clock::now();
  call();
  c10::cuda::device_synchronize();
  const double host = std::max(since(t0), 1e-6);
  const int64_t batch = std::clamp<int64_t>(static_cast<int64_t>(std::ceil(2e-3 / host)), 1, 200);
  // Queuing a call takes the host no longer than a synchronised call; the
  // cycles are counted at 2.5 GHz, above any GPU clock, so the sleep lasts
  // at least that long.
  const int64_t cycles = static_cast<int64_t>(std::min(batch * host, 0.05) * 2.5e9);
  at::cuda::CUDAEvent start(cudaEventDefault), end(cudaEventDefault);
  std::vector<double> per_call;
  const auto begin = Clock::now();
  while (static_cast<int64_t>(per_call.size()) < repeats &&
         (per_call.size() < 3 || since(begin) < max_seconds)) {
    at::cuda::sleep(cycles);
    start.record();
    for (int64_t i = 0; i < batch; ++i) call();
    end.record();
    end.synchronize();
    per_call.push_back(start.elapsed_time(end) * 1e-3 / batch);
  }
  set_warm_times(r, per_call);
  r.fields["calls_per_batch"] = static_cast<double>(batch);
}

Row goal_row(const std::string& op, const std::string& impl, const std::string& pass, int64_t size,
             int64_t points) {
  Row r;
  r.op = op;
  r.impl = impl;
  r.pass = pass;
  r.device = "cuda";
  r.dtype = "float32";
  r.size = size;
  r.points = points;
  r.peak_method = "not_measured";  // the main rows measure the fused ops' peaks
  r.cuda_goal = true;
  return r;
}

// Sets the deterministic-algorithms flag for a scope and restores it after,
// also when the measurement throws.
class DeterministicAlgorithms {
 public:
  DeterministicAlgorithms()
      : was_(at::globalContext().deterministicAlgorithms()),
        warn_only_(at::globalContext().deterministicAlgorithmsWarnOnly()) {
    at::globalContext().setDeterministicAlgorithms(true, false);
  }
  ~DeterministicAlgorithms() { at::globalContext().setDeterministicAlgorithms(was_, warn_only_); }
  DeterministicAlgorithms(const DeterministicAlgorithms&) = delete;
  DeterministicAlgorithms& operator=(const DeterministicAlgorithms&) = delete;

 private:
  bool was_, warn_only_;
};

using BackwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                       const at::Tensor&, c10::IntArrayRef,
                                                       c10::string_view, std::array<bool, 2>);

}  // namespace

std::vector<Row> run_cuda_goals(int64_t repeats, double max_seconds) {
  std::vector<Row> rows;
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA);
  std::cerr << "GPU goals (cuda, float32)\n";
  // Each measurement gives a row, its error included if it fails, so that
  // one failure does not cost the others.
  auto measure = [&](Row r, const std::function<void(Row&)>& body) {
    std::cerr << "  " << r.op << " " << r.pass << " " << r.impl << " size " << r.size << " ("
              << r.points << " points) ... " << std::flush;
    try {
      body(r);
      std::cerr << std::fixed << std::setprecision(4) << r.warm_seconds * 1e3
                << " ms GPU time per call";
      if (r.goal)
        std::cerr << "; " << r.goal->name << " " << std::setprecision(3) << r.goal->value << " "
                  << r.goal->unit;
      std::cerr << "\n";
    } catch (const std::exception& e) {
      r.error = message_of(e);
      std::cerr << "failed: " << r.error << "\n";
    }
    rows.push_back(r);
    release_cached_memory("cuda");
  };

  // Tricubic over the clustered lookups.
  {
    const int64_t n = kGoalSize * kGoalSize * kGoalPointsPerPixel;
    std::shared_ptr<TricubicInputs> in;
    std::string no_inputs;
    // The share of points whose 4×4×4 stencil is inside the grid (the
    // others cost no taps, so they would flatter a throughput), from the
    // count of the grid gradient's work (workloads.h).
    double in_range = 0;
    GridGradientWork work;
    try {
      auto built = std::make_shared<TricubicInputs>(
          make_tricubic_inputs(kGoalSize, kGoalPointsPerPixel, opts, kGoalCell));
      work = grid_gradient_work(points_per_cell(built->hkl, built->index_min, built->grid.sizes()));
      in_range = double(work.points_inside) / double(n);
      in = built;
    } catch (const std::exception& e) {
      no_inputs = "building the inputs: " + message_of(e);
    }
    auto inputs = [&]() -> const TricubicInputs& {
      if (!in) throw std::runtime_error(no_inputs);
      return *in;
    };
    auto row = [&](const std::string& pass) {
      Row r = goal_row("tricubic_interp", "fused", pass, kGoalSize, n);
      r.fields["in_range_fraction"] = in_range;
      return r;
    };
    auto lookups = [](const Row& r) { return r.points / r.warm_seconds / 1e9; };

    measure(row("forward"), [&](Row& r) {
      const TricubicInputs& x = inputs();
      time_on_gpu(
          r, [&] { nanobragg_ops::tricubic_interp(x.grid, x.hkl, x.index_min); }, repeats,
          max_seconds);
      r.goal = Goal{"tricubic forward throughput", "G lookups/s", lookups(r), kForwardGoal, false};
    });
    measure(row("forward_backward"), [&](Row& r) {
      const TricubicInputs& x = inputs();
      const at::Tensor g = x.grid.clone().requires_grad_(true),
                       h = x.hkl.clone().requires_grad_(true);
      const at::Tensor ones = at::ones({n}, opts);
      time_on_gpu(
          r,
          [&] {
            g.mutable_grad().reset();
            h.mutable_grad().reset();
            nanobragg_ops::tricubic_interp(g, h, x.index_min).backward(ones);
          },
          repeats, max_seconds);
      r.goal = Goal{"tricubic forward+backward throughput (gradients to hkl and grid)",
                    "G lookups/s", lookups(r), kForwardBackwardGoal, false};
    });

    // The grid gradient alone, through the backward op itself: the forward
    // and the hkl gradient, the same in both modes, would dilute the ratio.
    at::Tensor atomic_grad;
    double atomic_seconds = 0;
    auto grid_gradient = [&](const TricubicInputs& x, const at::Tensor& ones) {
      static const auto backward = c10::Dispatcher::singleton()
                                       .findSchemaOrThrow("nanobragg::tricubic_interp_backward", "")
                                       .typed<BackwardSig>();
      return std::get<0>(backward.call(ones, x.grid, x.hkl, x.index_min, "default", {true, false}));
    };
    // The grid-gradient rows carry how their taps spread over the nodes
    // (workloads.h): the gather's busiest node against an even split over
    // the warps this device runs at once, and the atomic path's adds to its
    // hottest address.
    auto grid_gradient_row = [&](const std::string& pass) {
      Row r = row(pass);
      const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
      r.fields["table_iterations"] = double(work.table_iterations);
      r.fields["gather_iterations_all_nodes"] = double(work.gather_iterations);
      r.fields["gather_iterations_busiest_node"] = double(work.busiest_node_iterations);
      r.fields["gather_busiest_over_fair_share"] = work.busiest_over_fair_share(
          double(prop->multiProcessorCount) * prop->maxThreadsPerMultiProcessor / kGatherLanes);
      r.fields["atomic_adds_to_hottest_node"] = double(work.busiest_node_taps);
      return r;
    };
    measure(grid_gradient_row("grid_gradient_atomic"), [&](Row& r) {
      const TricubicInputs& x = inputs();
      const at::Tensor ones = at::ones({n}, opts);
      time_on_gpu(
          r, [&] { grid_gradient(x, ones); }, repeats, max_seconds);
      atomic_grad = grid_gradient(x, ones);
      atomic_seconds = r.warm_seconds;
    });
    measure(grid_gradient_row("grid_gradient_deterministic"), [&](Row& r) {
      const TricubicInputs& x = inputs();
      const at::Tensor ones = at::ones({n}, opts);
      const DeterministicAlgorithms deterministic;
      time_on_gpu(
          r, [&] { grid_gradient(x, ones); }, repeats, max_seconds);
      if (atomic_grad.defined()) {
        // The two orders of summation must agree to rounding.
        r.check_rel_err = relative_difference(grid_gradient(x, ones), atomic_grad);
        r.check_tolerance = check_tolerance(at::kFloat);
        r.check_what = "grid gradients (deterministic vs atomic)";
      }
      if (atomic_seconds <= 0)
        throw std::runtime_error("no atomic grid-gradient time to compare with");
      r.goal = Goal{"deterministic grid gradient, × the atomic one's time", "×",
                    r.warm_seconds / atomic_seconds, kDeterministicGoal, true};
    });
  }

  // The device's copy bandwidth, then absorption's against it.
  double copy_bandwidth = 0;
  measure(goal_row("device_copy", "aten_copy_", "copy", 0, kCopyBytes / 4), [&](Row& r) {
    const at::Tensor src = at::rand({kCopyBytes / 4}, opts);
    at::Tensor dst = at::empty_like(src);
    time_on_gpu(
        r, [&] { dst.copy_(src); }, repeats, max_seconds);
    const double bytes = 2.0 * kCopyBytes;  // read + written
    copy_bandwidth = bytes / r.warm_seconds;
    r.fields["bytes_per_call"] = bytes;
    r.fields["copy_bandwidth_bytes_per_second"] = copy_bandwidth;
  });
  measure(goal_row("detector_absorption", "fused", "forward", kGoalSize, kGoalSize * kGoalSize),
          [&](Row& r) {
            const AbsorptionInputs a = make_absorption_inputs(kGoalSize, opts);
            // Copies of the inputs and of the output, used in turn, several times
            // L2's size in all: each call then streams its tensors from memory, as
            // in a simulation where other work runs between two calls.
            const int64_t in_bytes = a.intensity.nbytes() + a.pixel_coords.nbytes();
            const int64_t l2 = at::cuda::getCurrentDeviceProperties()->l2CacheSize;
            const int64_t copies = std::clamp<int64_t>((4 * l2 + in_bytes - 1) / in_bytes, 2, 16);
            std::vector<at::Tensor> I, P, out(static_cast<size_t>(copies));
            for (int64_t i = 0; i < copies; ++i) {
              I.push_back(a.intensity.clone());
              P.push_back(a.pixel_coords.clone());
            }
            size_t next = 0;
            time_on_gpu(
                r,
                [&] {
                  const size_t i = next++ % copies;
                  out[i] = nanobragg_ops::detector_absorption(I[i], P[i], a.odet, a.thickness,
                                                              a.attenuation_length, a.thicksteps,
                                                              a.oversample_thick);
                },
                repeats, max_seconds);
            // intensity and positions read, the output written (odet and the two
            // scalars are 20 bytes).
            const double bytes = static_cast<double>(in_bytes + a.intensity.nbytes());
            const double bandwidth = bytes / r.warm_seconds;
            r.fields["bytes_per_call"] = bytes;
            r.fields["bandwidth_bytes_per_second"] = bandwidth;
            r.fields["input_copies"] = static_cast<double>(copies);
            if (copy_bandwidth <= 0) throw std::runtime_error("no copy bandwidth to compare with");
            r.fields["fraction_of_copy_bandwidth"] = bandwidth / copy_bandwidth;
            r.goal = Goal{"absorption forward bandwidth, fraction of the measured copy bandwidth",
                          "", bandwidth / copy_bandwidth, kBandwidthGoal, false};
          });
  return rows;
}

#endif  // NANOBRAGG_WITH_CUDA

}  // namespace nanobragg_bench
