// nanobragg_bench: times the fused operators against their baselines on the
// same inputs in one run and writes the report of docs/CONTRACT.md §5.
//
//   nanobragg_bench [--ops tricubic_interp detector_absorption] [--sizes 256 512]
//                   [--points-per-pixel 1] [--repeats 200] [--device cpu|cuda]
//                   [--dtype float32|float64] [--outdir reports/perf]
//                   [--max-seconds-per-case 10 (CPU), 2 (CUDA)] [--scale | --no-scale]
//
// Times run in this process. Each case's peak_bytes is measured in a child
// process of its own: this executable again, with the hidden arguments
// --single-case OP IMPL PASS SIZE --peak-out FILE (see memory.h).
// --scale adds a section at scale: tricubic forward+backward over 2048² × 9
// lookups (run_scale below). Before a baseline is timed, its result is
// checked against the fused op's (check_against_fused); a case whose
// estimated memory does not fit is reported with the estimate, not run.
// The exit status is 1 if a case failed or a check found a mismatch (the
// report is written all the same).
//
//   nanobragg_bench --gather-work [--sizes S ... [--points-per-pixel N]]
//                   [--outdir reports/gather_work]
//
// only counts how the CUDA grid gradient's work spreads over the grid's
// nodes (gather_work.h), on the CPU, and writes <outdir>/<UTC stamp>.md.
//
// On a GPU, the command of the one-shot GPU check (scripts/gpu_check.sh):
//
//   build-gpu/bench/nanobragg_bench --device cuda --sizes 512 2048 --points-per-pixel 9
//       --repeats 30 --max-seconds-per-case 2 --no-scale --outdir DIR     (one line)
//
// Both ops at 512² and 2048² (tricubic × 9 lookups per pixel: 2.4 M and
// 37.7 M points) against aten_composite and grid_sample_trilinear
// (scalar_reference is a CPU loop: CPU only), then the GPU goals of
// cuda_goals.h; on CUDA each row's peak memory is measured in this process
// (no memory child: no second CUDA start-up or copy of the inputs per row).
// aten_composite's tricubic forward+backward at 2048² × 9 needs ~60 GB by
// the count of its code, and on CUDA perhaps more (estimated_peak also
// scales what it measured at 512² × 9): it runs where 60% of the free GPU
// memory holds the estimate, else its row is that estimate.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <torch/autograd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <filesystem>
#include <functional>
#include <iomanip>
#include <limits>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_goals.h"
#include "gather_work.h"
#include "memory.h"
#include "nanobragg_ops/ops.h"
#include "report.h"
#include "workloads.h"

namespace nb = nanobragg_bench;

namespace {

struct Options {
  std::vector<std::string> ops = {"tricubic_interp", "detector_absorption"};
  std::vector<int64_t> sizes = {256, 512};
  bool sizes_given = false;
  // CPU thread counts of the main section's cases; 0 is all the threads ATen
  // has (OMP_NUM_THREADS or the cores). Default: 1 and all.
  std::vector<int64_t> threads = {1, 0};
  int64_t per_pixel = 1;
  int64_t repeats = 200;
  std::string device = "cpu";
  std::string dtype = "float32";
  std::string outdir;  // default: reports/perf, or reports/gather_work (--gather-work)
  // Per case: fewer repeats for slow baselines. Unset (< 0): 10 s on CPU;
  // 2 s on CUDA, hundreds of repeats of any fused case, and what keeps a
  // GPU run within its minutes (aten_composite at 2048² × 9 takes ~1 s).
  double max_seconds = -1;
  bool scale = false;
  bool gather_work = false;  // only the grid gradient's work per node (gather_work.h)
  // The memory child's side: the case to measure and where to write its peak.
  std::vector<std::string> single_case;  // op impl pass size
  std::string peak_out;
};

[[noreturn]] void usage(const std::string& why) {
  std::cerr << "nanobragg_bench: " << why
            << "\nusage: nanobragg_bench [--ops tricubic_interp detector_absorption] "
               "[--sizes 256 512] [--threads 1 0 (0: all)] [--points-per-pixel N] [--repeats N] "
               "[--device cpu|cuda] "
               "[--dtype float32|float64] [--outdir DIR] [--max-seconds-per-case S (default 10 on "
               "cpu, 2 on cuda)] "
               "[--scale | --no-scale]\n"
               "       nanobragg_bench --gather-work [--sizes S ... [--points-per-pixel N]] "
               "[--outdir DIR (default reports/gather_work)]\n";
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto values = [&] {
      std::vector<std::string> v;
      while (i + 1 < argc && std::string(argv[i + 1]).rfind("--", 0) != 0) v.push_back(argv[++i]);
      if (v.empty()) usage(a + " needs a value");
      return v;
    };
    auto integer = [&](const std::string& s) {
      try {
        const int64_t v = std::stoll(s);
        if (v < 1) usage(a + " must be >= 1");
        return v;
      } catch (const std::exception&) {
        usage(a + ": not an integer: " + s);
      }
    };
    if (a == "--ops") {
      o.ops = values();
      for (auto& op : o.ops) {
        if (op == "tricubic") op = "tricubic_interp";
        if (op == "absorption") op = "detector_absorption";
        if (op != "tricubic_interp" && op != "detector_absorption") usage("unknown op " + op);
      }
    } else if (a == "--threads") {
      o.threads.clear();
      for (const auto& v : values()) o.threads.push_back(std::stoll(v));
    } else if (a == "--sizes") {
      o.sizes.clear();
      o.sizes_given = true;
      for (const auto& s : values()) o.sizes.push_back(integer(s));
    } else if (a == "--points-per-pixel") {
      o.per_pixel = integer(values().at(0));
    } else if (a == "--repeats") {
      o.repeats = integer(values().at(0));
    } else if (a == "--device") {
      o.device = values().at(0);
      if (o.device != "cpu" && o.device != "cuda") usage("--device must be cpu or cuda");
    } else if (a == "--dtype") {
      o.dtype = values().at(0);
      if (o.dtype != "float32" && o.dtype != "float64") usage("--dtype must be float32 or float64");
    } else if (a == "--outdir") {
      o.outdir = values().at(0);
    } else if (a == "--max-seconds-per-case") {
      try {
        o.max_seconds = std::stod(values().at(0));
      } catch (const std::exception&) {
        usage(a + ": not a number");
      }
      if (!(o.max_seconds > 0)) usage(a + " must be > 0");
    } else if (a == "--scale" || a == "--no-scale") {  // the last one counts
      o.scale = a == "--scale";
    } else if (a == "--single-case") {
      o.single_case = values();
      if (o.single_case.size() != 4) usage("--single-case needs OP IMPL PASS SIZE");
    } else if (a == "--peak-out") {
      o.peak_out = values().at(0);
    } else if (a == "--gather-work") {
      o.gather_work = true;
    } else if (a == "--help" || a == "-h") {
      usage("help");
    } else {
      usage("unknown argument " + a);
    }
  }
  if (o.max_seconds < 0) o.max_seconds = o.device == "cuda" ? 2.0 : 10.0;
  if (o.outdir.empty()) o.outdir = o.gather_work ? "reports/gather_work" : "reports/perf";
  if (o.gather_work && o.per_pixel != 1 && !o.sizes_given)
    usage("--gather-work: --points-per-pixel applies to the workloads of --sizes");
  return o;
}

using Clock = std::chrono::steady_clock;
// A call returns what it computed: the output, and in a forward_backward
// case the gradients of its inputs after it (for the checks; timing
// discards them).
using Call = std::function<std::vector<at::Tensor>()>;

void synchronize(const std::string& device) {
  if (device == "cuda") at::detail::getCUDAHooks().deviceSynchronize(0);
}

// One row of the report: which implementation of which op, on which inputs.
struct Case {
  std::string op, impl, pass;
  int64_t size = 0, per_pixel = 1;
  bool scale = false;   // the --scale section's rows
  int64_t threads = 0;  // CPU threads it runs on; 0: all (at::get_num_threads at start)
  // A fused absorption forward_backward's variant (the interleaved backward
  // measurements only; every row is {all, expanded}): which inputs need a
  // gradient ("all" or "intensity"), and the layout of the output gradient
  // the backward gets: "expanded" (stride 0, from `out.sum().backward()`),
  // "contiguous", or "strided" (a transposed view of a contiguous tensor,
  // passed to `out.backward(g)`).
  std::string grads = "all", grad_layout = "expanded";
};

int64_t points_of(const Case& c) {
  return c.op == "tricubic_interp" ? c.size * c.size * c.per_pixel : c.size * c.size;
}

// The inputs of one op at one size, shared by the calls made from them.
struct Workload {
  std::shared_ptr<const nb::TricubicInputs> tricubic;
  std::shared_ptr<const nb::AbsorptionInputs> absorption;
};

Workload make_workload(const std::string& op, int64_t size, int64_t per_pixel,
                       const at::TensorOptions& opts) {
  Workload w;
  if (op == "tricubic_interp") {
    w.tricubic =
        std::make_shared<const nb::TricubicInputs>(nb::make_tricubic_inputs(size, per_pixel, opts));
  } else {
    w.absorption =
        std::make_shared<const nb::AbsorptionInputs>(nb::make_absorption_inputs(size, opts));
  }
  return w;
}

// Leaves that get gradients in a forward_backward case: copies of the
// inputs, made when the call is made, their gradients reset every call.
struct Leaves {
  std::vector<at::Tensor> tensors;
  at::Tensor add(const at::Tensor& t) {
    tensors.push_back(t.detach().clone().requires_grad_(true));
    return tensors.back();
  }
  void clear_grads() {
    for (auto& t : tensors) t.mutable_grad().reset();
  }
  // The output, then every leaf's gradient, in the order they were added.
  std::vector<at::Tensor> results(const at::Tensor& out) const {
    std::vector<at::Tensor> r = {out};
    for (const auto& t : tensors) r.push_back(t.grad());
    return r;
  }
};

// The call that a case times, owning what it needs (inputs, leaves, the
// output gradient); backward gives gradients to every differentiable input.
// The fused and aten_composite calls of a case take the same leaves in the
// same order, so that their results compare element by element.
Call make_call(const Case& c, const Workload& w) {
  const bool fb = c.pass == "forward_backward";
  auto leaves = std::make_shared<Leaves>();
  if (c.op == "tricubic_interp") {
    const auto in = w.tricubic;
    const int64_t n = in->hkl.size(0);
    if (c.impl == "scalar_reference")
      return [in]() -> std::vector<at::Tensor> { return {nb::tricubic_scalar_reference(*in)}; };
    if (c.impl == "grid_sample_trilinear" || c.impl == "grid_sample_split") {
      // ATen's CPU grid_sampler parallelises over the batch only: the split
      // variant gives it one batch entry per thread (the grid expanded, the
      // points cut into that many equal parts), its fair share of threads.
      const int64_t parts =
          c.impl == "grid_sample_split" ? nb::grid_sample_parts(n, at::get_num_threads()) : 1;
      const at::Tensor input = in->grid_sample_input.expand({parts, -1, -1, -1, -1});
      const at::Tensor coords = in->grid_sample_coords.view({parts, n / parts, 1, 1, 3});
      if (!fb) {
        return [input, coords]() -> std::vector<at::Tensor> {
          return {nb::grid_sample_trilinear(input, coords).reshape({-1})};
        };
      }
      const at::Tensor gi = leaves->add(in->grid_sample_input), gc = leaves->add(coords);
      return [leaves, gi, gc, parts] {
        leaves->clear_grads();
        const at::Tensor out =
            nb::grid_sample_trilinear(gi.expand({parts, -1, -1, -1, -1}), gc).reshape({-1});
        out.sum().backward();  // the common pattern: an expanded output gradient
        return leaves->results(out);
      };
    }
    const bool fused = c.impl == "fused";
    const std::array<int64_t, 3> imin = in->index_min;
    auto f = [fused, imin](const at::Tensor& g, const at::Tensor& h) {
      return fused ? nanobragg_ops::tricubic_interp(g, h, imin)
                   : nb::tricubic_aten_composite(g, h, imin);
    };
    if (!fb) return [in, f]() -> std::vector<at::Tensor> { return {f(in->grid, in->hkl)}; };
    const at::Tensor g = leaves->add(in->grid), h = leaves->add(in->hkl);
    return [leaves, g, h, f] {
      leaves->clear_grads();
      const at::Tensor out = f(g, h);
      out.sum().backward();
      return leaves->results(out);
    };
  }
  const auto in = w.absorption;
  if (c.impl == "scalar_reference")
    return [in]() -> std::vector<at::Tensor> { return {nb::absorption_scalar_reference(*in)}; };
  const bool fused = c.impl == "fused";
  auto f = [fused, steps = in->thicksteps, over = in->oversample_thick](
               const at::Tensor& I, const at::Tensor& P, const at::Tensor& od, const at::Tensor& T,
               const at::Tensor& A) {
    return fused ? nanobragg_ops::detector_absorption(I, P, od, T, A, steps, over)
                 : nb::absorption_aten_composite(I, P, od, T, A, steps, over);
  };
  if (!fb) {
    return [in, f]() -> std::vector<at::Tensor> {
      return {f(in->intensity, in->pixel_coords, in->odet, in->thickness, in->attenuation_length)};
    };
  }
  const bool all = c.grads == "all";
  const at::Tensor I = leaves->add(in->intensity);
  const at::Tensor P = all ? leaves->add(in->pixel_coords) : in->pixel_coords,
                   od = all ? leaves->add(in->odet) : in->odet,
                   T = all ? leaves->add(in->thickness) : in->thickness,
                   A = all ? leaves->add(in->attenuation_length) : in->attenuation_length;
  // The output gradient, for the layouts other than "expanded" (the output
  // has intensity's shape, [size, size]).
  at::Tensor grad;
  if (c.grad_layout == "contiguous") {
    grad = at::rand_like(in->intensity);
  } else if (c.grad_layout == "strided") {
    grad = at::rand_like(in->intensity.t().contiguous()).t();
  } else if (c.grad_layout != "expanded") {
    throw std::invalid_argument("unknown output gradient layout " + c.grad_layout);
  }
  return [leaves, I, P, od, T, A, f, grad] {
    leaves->clear_grads();
    const at::Tensor out = f(I, P, od, T, A);
    if (grad.defined()) {
      out.backward(grad);
    } else {
      out.sum().backward();
    }
    return leaves->results(out);
  };
}

// The cases of one op at one size, in report order.
std::vector<Case> cases_of(const Options& o, const std::string& op, int64_t size) {
  std::vector<std::pair<std::string, std::string>> impl_pass = {
      {"fused", "forward"}, {"scalar_reference", "forward"}, {"aten_composite", "forward"}};
  if (op == "tricubic_interp") impl_pass.emplace_back("grid_sample_trilinear", "forward");
  if (op == "tricubic_interp" && o.device == "cpu")
    impl_pass.emplace_back("grid_sample_split", "forward");
  impl_pass.emplace_back("fused", "forward_backward");
  impl_pass.emplace_back("aten_composite", "forward_backward");
  if (op == "tricubic_interp") impl_pass.emplace_back("grid_sample_trilinear", "forward_backward");
  if (op == "tricubic_interp" && o.device == "cpu")
    impl_pass.emplace_back("grid_sample_split", "forward_backward");
  // Thread counts (CPU only), all threads last, duplicates dropped.
  std::vector<int64_t> thread_counts;
  for (int64_t t : o.device == "cpu" ? o.threads : std::vector<int64_t>{0}) {
    const int64_t n = t <= 0 ? static_cast<int64_t>(at::get_num_threads()) : t;
    if (std::find(thread_counts.begin(), thread_counts.end(), n) == thread_counts.end())
      thread_counts.push_back(n);
  }
  std::vector<Case> cases;
  for (int64_t threads : thread_counts) {
    for (const auto& [impl, pass] : impl_pass) {
      if (impl == "scalar_reference" && o.device != "cpu") continue;  // a CPU loop
      if (impl == "grid_sample_split" && threads == 1) continue;      // = grid_sample_trilinear
      Case c{op, impl, pass, size, o.per_pixel};
      c.threads = o.device == "cpu" ? threads : 0;
      cases.push_back(c);
    }
  }
  return cases;
}

// A row for a case, before anything is measured.
nb::Row row_of(const Options& o, const Case& c) {
  nb::Row r;
  r.op = c.op;
  r.impl = c.impl;
  r.pass = c.pass;
  r.device = o.device;
  r.dtype = o.dtype;
  r.size = c.size;
  r.points = points_of(c);
  r.scale = c.scale;
  r.threads = c.threads > 0 ? c.threads : at::get_num_threads();
  return r;
}

// Cold time (the first call), then the median of warm calls. Every timed
// region starts and ends with a device synchronise, so that on CUDA the
// time is the call's from its launch to its last kernel's end.
void time_call(const Options& o, const Call& fn, nb::Row& r) {
  synchronize(o.device);
  auto t0 = Clock::now();
  fn();
  synchronize(o.device);
  r.cold_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  std::vector<double> warm;
  const auto start = Clock::now();
  while (static_cast<int64_t>(warm.size()) < o.repeats &&
         (warm.size() < 3 ||
          std::chrono::duration<double>(Clock::now() - start).count() < o.max_seconds)) {
    t0 = Clock::now();
    fn();
    synchronize(o.device);
    warm.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  nb::set_warm_times(r, warm);
  std::cerr << std::fixed << std::setprecision(3) << r.warm_seconds * 1e3 << " ms (" << r.repeats
            << " repeats)";
}

// Before a baseline is timed, its result is compared with the fused op's on
// the same inputs (nb::relative_difference: in float64, on the device), and
// every tensor it returns must be on the bench's device: a baseline that
// computed elsewhere, or wrongly, would time something else. Compared: the
// output, and in aten_composite's forward_backward every input gradient.
// grid_sample_trilinear interpolates otherwise, so it is compared at the
// grid's nodes (hkl rounded), where trilinear and tricubic interpolation both
// give the grid's value: that checks that it reads the same grid at the same
// points. Nodes whose stencil leaves the grid (the fused op gives 0 there;
// the grid itself is positive) are left out.
void check_against_fused(const Case& c, const Workload& w, const at::TensorOptions& opts,
                         nb::Row& r) {
  std::vector<at::Tensor> got, ref;
  if (c.impl == "grid_sample_trilinear" || c.impl == "grid_sample_split") {
    const nb::TricubicInputs& in = *w.tricubic;
    const at::Tensor nodes = in.hkl.round();
    const at::Tensor fused = nanobragg_ops::tricubic_interp(in.grid, nodes, in.index_min);
    const at::Tensor coords = nb::grid_sample_coords(nodes, in.index_min, in.grid.sizes()).to(opts);
    const at::Tensor inside = fused != 0;
    const int64_t n = coords.size(1);
    const int64_t parts =
        c.impl == "grid_sample_split" ? nb::grid_sample_parts(n, at::get_num_threads()) : 1;
    got = {nb::grid_sample_trilinear(in.grid_sample_input.expand({parts, -1, -1, -1, -1}),
                                     coords.view({parts, n / parts, 1, 1, 3}))
               .reshape({-1})
               .masked_select(inside)};
    ref = {fused.masked_select(inside)};
    r.check_what = "outputs at the grid's nodes";
  } else {
    Case fused = c;
    fused.impl = "fused";
    ref = make_call(fused, w)();
    got = make_call(c, w)();
    r.check_what = got.size() > 1 ? "outputs and input gradients" : "outputs";
  }
  TORCH_CHECK(got.size() == ref.size(), c.impl, " returned ", got.size(), " tensors, the fused op ",
              ref.size());
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    // (opts says "cuda", the tensors "cuda:0": the index counts only if given.)
    const at::Device want = opts.device();
    TORCH_CHECK(got[i].device().type() == want.type() &&
                    (!want.has_index() || got[i].device().index() == want.index()),
                c.impl, " computed on ", got[i].device(), ", not on ", want);
    const double d = nb::relative_difference(got[i], ref[i]);
    worst = std::isnan(worst) || std::isnan(d) ? d + worst : std::max(worst, d);  // NaN sticks
  }
  r.check_rel_err = worst;
  r.check_tolerance = nb::check_tolerance(opts.dtype().toScalarType());
}

// Cases over this share of the memory there is are not run (on CUDA the
// free memory: the parent's check and timing need the case's peak, and so,
// after the parent has released it, does the memory child).
constexpr double kMemoryFraction = 0.6;

// What one call of a case will need, estimated before it runs; 0 where
// nothing is to be feared. Only aten_composite grows large ([N, 4, 4, 4] or
// [L, S, F] intermediates): its bytes per point measured at the most points
// below this case's in this run (the same op, impl and pass) and, for
// tricubic, those counted from its code; the larger counts. (The fused ops
// and grid_sample hold their outputs and gradients, and a small case's fixed
// costs would overstate their bytes per point.)
int64_t estimated_peak(const Case& c, const std::string& dtype, const std::vector<nb::Row>& done) {
  if (c.impl != "aten_composite") return 0;
  const int64_t n = points_of(c);
  int64_t estimate = c.op == "tricubic_interp"
                         ? nb::tricubic_aten_composite_peak_bytes(n, dtype == "float32" ? 4 : 8,
                                                                  c.pass == "forward_backward")
                         : 0;
  const nb::Row* probe = nullptr;
  for (const nb::Row& r : done) {
    if (r.ran() && r.peak_bytes > 0 && r.op == c.op && r.impl == c.impl && r.pass == c.pass &&
        r.dtype == dtype && r.points < n && (probe == nullptr || r.points > probe->points)) {
      probe = &r;
    }
  }
  if (probe != nullptr) {
    estimate = std::max(
        estimate, static_cast<int64_t>(static_cast<double>(probe->peak_bytes) / probe->points * n));
  }
  return estimate;
}

// The arguments that make this executable measure one case's memory.
std::vector<std::string> single_case_args(const Options& o, const Case& c) {
  return {"--single-case",
          c.op,
          c.impl,
          c.pass,
          std::to_string(c.size),
          "--points-per-pixel",
          std::to_string(c.per_pixel),
          "--device",
          o.device,
          "--dtype",
          o.dtype,
          "--threads",
          std::to_string(c.threads > 0 ? c.threads : at::get_num_threads())};
}

// One case: not run if its estimated memory does not fit; else a baseline's
// check against the fused op, the times here, then the peak memory in a
// child process. A failure (out of memory, a failed child) goes into the
// row, and the bench goes on with the next case.
nb::Row run_case(const Options& o, const Case& c, const Workload& w, const at::TensorOptions& opts,
                 const std::vector<nb::Row>& done) {
  nb::Row r = row_of(o, c);
  std::cerr << "  " << c.op << " " << c.pass << " " << c.impl << " size " << c.size << " ("
            << r.points << " points, " << r.threads << " threads) ... " << std::flush;
  // The composite's backward adds its [N, 4, 4, 4] gradient into the grid
  // with index_put_(accumulate), which on CUDA sorts the indices with cub,
  // and cub sorts at most INT_MAX elements: a limit of PyTorch's, not a
  // failure of the run.
  if (o.device == "cuda" && c.op == "tricubic_interp" && c.impl == "aten_composite" &&
      c.pass == "forward_backward" && 64 * r.points > std::numeric_limits<int32_t>::max()) {
    r.not_run = "its index_put_ backward sorts 64 × " + std::to_string(r.points) +
                " indices on the GPU, over the 2^31 - 1 that cub sorts";
    std::cerr << "not run: " << r.not_run << "\n";
    return r;
  }
  const int64_t estimate = estimated_peak(c, o.dtype, done);
  if (estimate > 0) {
    const int64_t memory = nb::available_memory_bytes(o.device);
    if (estimate > kMemoryFraction * memory) {
      std::ostringstream why;
      why << std::fixed << std::setprecision(1) << "needs ≈ " << estimate / 1073741824.0
          << " GiB (estimated), over " << kMemoryFraction * 100 << "% of the "
          << memory / 1073741824.0 << " GiB of "
          << (o.device == "cuda" ? "free GPU memory" : "RAM");
      r.not_run = why.str();
      r.peak_bytes = estimate;
      r.peak_method = "estimated";
      std::cerr << "not run: " << r.not_run << "\n";
      return r;
    }
  }
  const int threads_before = at::get_num_threads();
  at::set_num_threads(static_cast<int>(r.threads));
  try {
    if (c.impl != "fused") check_against_fused(c, w, opts, r);
    const Call call = make_call(c, w);
    time_call(o, call, r);
  } catch (const c10::OutOfMemoryError& e) {
    // A baseline that does not fit is a finding about the baseline, as one
    // whose estimate does not fit is (not run); the fused op's is a failure.
    if (c.impl == "fused") {
      r.error = nb::message_of(e);
    } else {
      r = row_of(o, c);  // (no times from a call that did not finish)
      r.not_run = "out of memory" + std::string(o.device == "cuda" ? " on the GPU" : "") +
                  " when run (estimated " + std::to_string(estimate >> 20) + " MiB)";
      r.peak_bytes = estimate;
      r.peak_method = "estimated";
      std::cerr << "not run: " << r.not_run;
    }
  } catch (const std::exception& e) {
    r.error = nb::message_of(e);
  }
  at::set_num_threads(threads_before);
  // The call's leaves and gradients are gone; what they left cached goes
  // back to the device too, since the peak's call (a child's, on CPU) needs
  // as much again.
  nb::release_cached_memory(o.device);
  if (r.error.empty() && r.not_run.empty()) {
    try {
      // On CUDA in this process: the allocator counts the bytes it hands
      // out, whatever other cases left cached, and a child would need the
      // GPU memory of a second copy of the inputs and a CUDA start-up (a
      // few seconds) per row. On CPU in a child, where the resident set
      // would also count this process's freed but resident pages.
      const nb::Peak peak = o.device == "cuda" ? nb::measure_peak(make_call(c, w), o.device)
                                               : nb::peak_in_child(single_case_args(o, c));
      nb::release_cached_memory(o.device);
      r.peak_bytes = peak.bytes;
      r.peak_method = peak.method;
      std::cerr << ", peak " << std::setprecision(1) << peak.bytes / 1048576.0 << " MiB";
    } catch (const std::exception& e) {
      r.error = nb::message_of(e);
      r.peak_method = o.device == "cuda" ? "measure_failed" : "child_failed";
    }
  }
  if (!r.error.empty()) std::cerr << (r.ran() ? ", " : "") << "FAILED: " << r.error;
  if (r.check_failed()) {
    std::cerr << ", CHECK FAILED: " << r.check_what << " differ from the fused op's by "
              << std::scientific << r.check_rel_err << std::fixed;
  }
  std::cerr << "\n";
  return r;
}

// The fused backward in forwards, (forward+backward − forward) / forward,
// from the two calls timed in alternation: kInterleavedRounds rounds of
// kCallsPerRound forwards then as many forwards+backwards, the ratio of each
// round's medians, and the median over the rounds. The two rows' own medians
// come from windows seconds apart, and on a shared machine the speed drifts
// between windows by more than the goal's margin (the absorption backward of
// one revision measured 1.76 and 3.41 forwards in two runs); rounds a few
// milliseconds long see the same machine. Kept in the forward+backward
// row's fields (backward_in_forwards_interleaved), which the report's
// targets use.
constexpr int kInterleavedRounds = 31, kCallsPerRound = 5;

double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

// One round's time of fn: the median of kCallsPerRound calls.
double median_of_round(const Options& o, const Call& fn) {
  std::vector<double> t;
  for (int k = 0; k < kCallsPerRound; ++k) {
    synchronize(o.device);
    const auto t0 = Clock::now();
    fn();
    synchronize(o.device);
    t.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return median(t);
}

// ratio(ta, tb) of each of kInterleavedRounds rounds, ta and tb the round's
// times (median_of_round) of a then b, and the median over the rounds; a and
// b are called once each first, to warm them.
template <typename Ratio>
double interleaved_ratio(const Options& o, const Call& a, const Call& b, const Ratio& ratio) {
  a(), b();
  std::vector<double> ratios;
  for (int round = 0; round < kInterleavedRounds; ++round) {
    const double ta = median_of_round(o, a), tb = median_of_round(o, b);
    ratios.push_back(ratio(ta, tb));
  }
  return median(ratios);
}

// Runs measure() with ATen on `threads` threads, reporting a failure as
// "<op> <what>: FAILED", then puts the thread count back and hands cached
// memory back: what the interleaved measurements below share.
template <typename Measure>
void interleaved_measurement(const Options& o, const nb::Row& row, int64_t threads,
                             const char* what, const Measure& measure) {
  const int threads_before = at::get_num_threads();
  at::set_num_threads(static_cast<int>(threads));
  try {
    measure();
  } catch (const std::exception& e) {
    std::cerr << "  " << row.op << " " << what << ": FAILED: " << nb::message_of(e) << "\n";
  }
  at::set_num_threads(threads_before);
  nb::release_cached_memory(o.device);
}

void add_interleaved_backward(const Options& o, const Workload& w, std::vector<nb::Row>& rows,
                              size_t first_row) {
  // CPU only: the GPU check's minutes are few, and a GPU's timing, from
  // events around synchronised calls, does not drift that way.
  if (o.device != "cpu") return;
  for (size_t i = first_row; i < rows.size(); ++i) {
    nb::Row& fb = rows[i];
    if (fb.impl != "fused" || fb.pass != "forward_backward" || !fb.ran() || fb.scale) continue;
    const auto f = std::find_if(rows.begin() + first_row, rows.end(), [&](const nb::Row& r) {
      return r.impl == "fused" && r.pass == "forward" && r.threads == fb.threads && r.ran();
    });
    if (f == rows.end()) continue;
    const Case cf{fb.op, "fused", "forward", fb.size, o.per_pixel};
    // Which inputs need a gradient, and the output gradient's layout
    // (Case::grads, Case::grad_layout): nb::backward_variants.
    for (const nb::BackwardVariant& v : nb::backward_variants(fb.op)) {
      const std::string &grads = v.grads, &layout = v.layout;
      Case cfb{fb.op, "fused", "forward_backward", fb.size, o.per_pixel};
      cfb.grads = grads, cfb.grad_layout = layout;
      interleaved_measurement(o, fb, fb.threads, "interleaved backward", [&] {
        const double backward =
            interleaved_ratio(o, make_call(cf, w), make_call(cfb, w),
                              [](double tf, double tfb) { return (tfb - tf) / tf; });
        fb.fields[nb::backward_field(grads, layout)] = backward;
        fb.fields["interleaved_rounds"] = kInterleavedRounds;
        std::cerr << "  " << fb.op << " backward in forwards, interleaved (" << fb.threads
                  << " threads, gradients to " << grads << ", " << layout
                  << " output gradient): " << std::setprecision(2) << backward << "\n";
      });
    }
  }
}

// The fused forward's speed-up from 1 thread to a row's threads, timed in
// alternation for the same reason: kInterleavedRounds rounds of
// kCallsPerRound calls on 1 thread then as many on all, the ratio of each
// round's medians, and the median over the rounds (from the rows of two
// runs hours apart, the same tricubic forward scaled 1.89 and 1.50 times from
// 1 to 2 threads). Kept in the many-thread forward row's fields
// (speedup_over_1_thread_interleaved), which the report's target uses.
void add_interleaved_scaling(const Options& o, const Workload& w, std::vector<nb::Row>& rows,
                             size_t first_row) {
  if (o.device != "cpu") return;
  for (size_t i = first_row; i < rows.size(); ++i) {
    nb::Row& many = rows[i];
    if (many.impl != "fused" || many.pass != "forward" || !many.ran() || many.scale ||
        many.threads <= 1)
      continue;
    const Case c{many.op, "fused", "forward", many.size, o.per_pixel};
    interleaved_measurement(o, many, many.threads, "interleaved scaling", [&] {
      const Call forward = make_call(c, w);
      std::vector<double> ratios;
      for (int round = -1; round < kInterleavedRounds; ++round) {  // round -1 warms
        at::set_num_threads(1);
        const double one = median_of_round(o, forward);
        at::set_num_threads(static_cast<int>(many.threads));
        const double all = median_of_round(o, forward);
        if (round >= 0) ratios.push_back(one / all);
      }
      const double speedup = median(ratios);
      many.fields["speedup_over_1_thread_interleaved"] = speedup;
      many.fields["interleaved_rounds"] = kInterleavedRounds;
      std::cerr << "  " << many.op << " forward, 1 to " << many.threads
                << " threads, interleaved: " << std::setprecision(2) << speedup << "x\n";
    });
  }
}

// The tricubic forward's and forward+backward's speed-ups over the
// baselines the report's targets name (scalar_reference, trilinear
// grid_sample, and on more than one thread grid_sample_split), each that has
// a row of the same pass and threads in this run, timed in
// alternation for the same reason as the backward above: kInterleavedRounds
// rounds of kCallsPerRound baseline calls then as many fused ones, the ratio
// of each round's medians, and the median over the rounds. (From the rows'
// own medians, the same forward against the same scalar loop measured 7.2×
// and 9.3× in two runs on one machine.) Kept in the fused row's fields
// (nb::interleaved_speedup_field), which the report's targets use. A
// baseline whose check against the fused op failed is not timed again.
void add_interleaved_speedups(const Options& o, const Workload& w, std::vector<nb::Row>& rows,
                              size_t first_row) {
  if (o.device != "cpu") return;
  for (size_t i = first_row; i < rows.size(); ++i) {
    nb::Row& fused = rows[i];
    if (fused.op != "tricubic_interp" || fused.impl != "fused" || !fused.ran() || fused.scale)
      continue;
    for (const char* impl : {"scalar_reference", "grid_sample_trilinear", "grid_sample_split"}) {
      const auto baseline =
          std::find_if(rows.begin() + first_row, rows.end(), [&](const nb::Row& r) {
            return r.impl == impl && r.pass == fused.pass && r.threads == fused.threads &&
                   r.ran() && !r.check_failed();
          });
      if (baseline == rows.end()) continue;
      const Case cf{fused.op, "fused", fused.pass, fused.size, o.per_pixel};
      const Case cb{fused.op, impl, fused.pass, fused.size, o.per_pixel};
      interleaved_measurement(o, fused, fused.threads, "interleaved speed-up", [&] {
        const double speedup =
            interleaved_ratio(o, make_call(cb, w), make_call(cf, w),
                              [](double theirs, double ours) { return theirs / ours; });
        fused.fields[nb::interleaved_speedup_field(impl)] = speedup;
        fused.fields["interleaved_rounds"] = kInterleavedRounds;
        std::cerr << "  " << fused.op << " " << fused.pass << ", " << fused.threads
                  << " threads, fused over " << impl << ", interleaved: " << std::setprecision(2)
                  << speedup << "x\n";
      });
    }
  }
}

// Cases of one op at one size (and points per pixel), on the inputs they
// share.
void run_cases(const Options& o, const std::vector<Case>& cases, const at::TensorOptions& opts,
               std::vector<nb::Row>& rows) {
  const Case& first = cases.front();
  std::unique_ptr<Workload> w;
  try {
    w = std::make_unique<Workload>(make_workload(first.op, first.size, first.per_pixel, opts));
  } catch (const std::exception& e) {
    // Every case of these inputs fails alike; the other sizes still run.
    for (const Case& c : cases) {
      nb::Row r = row_of(o, c);
      r.error = "building the inputs: " + nb::message_of(e);
      std::cerr << "  " << c.op << " " << c.pass << " " << c.impl << " size " << c.size
                << ": FAILED: " << r.error << "\n";
      rows.push_back(r);
    }
    nb::release_cached_memory(o.device);
    return;
  }
  const size_t first_row = rows.size();
  for (const Case& c : cases) rows.push_back(run_case(o, c, *w, opts, rows));
  add_interleaved_backward(o, *w, rows, first_row);
  add_interleaved_scaling(o, *w, rows, first_row);
  add_interleaved_speedups(o, *w, rows, first_row);
}

// The child's side (--single-case): one call of one case, and its peak extra
// memory above the level reached once its inputs exist.
void run_single_case(const Options& o, const Case& c, const at::TensorOptions& opts) {
  {
    // One call on a tiny problem first, so that what a process does once
    // (code paged in, thread pools, lazy initialisation, cuBLAS workspaces)
    // is not charged to the case.
    const Workload w = make_workload(c.op, 16, c.per_pixel, opts);
    make_call(c, w)();
    synchronize(o.device);
  }
  const Workload w = make_workload(c.op, c.size, c.per_pixel, opts);
  const Call call = make_call(c, w);
  synchronize(o.device);
  nb::write_peak(o.peak_out, nb::measure_peak(call, o.device));
}

// --scale: tricubic forward+backward over 2048² detector pixels × 9 lookups
// (37.7 M points). Both implementations run first at 1/64 of the points
// (256² × 9), where both fit; then the fused op at full scale, and
// aten_composite only if its memory, estimated before running it, is at most
// 60% of the memory there is (kMemoryFraction, as for every case).
constexpr int64_t kScaleSize = 2048, kScalePerPixel = 9, kScaleProbeSize = 256;

void run_scale(const Options& o, const at::TensorOptions& opts, std::vector<nb::Row>& rows,
               nb::ScaleInfo& info) {
  const std::string op = "tricubic_interp", pass = "forward_backward";
  std::cerr << "scale: " << op << " " << pass << ", " << kScaleSize << "² × " << kScalePerPixel
            << " points (" << o.device << ", " << o.dtype << ")\n";
  const Case probe{op, "aten_composite", pass, kScaleProbeSize, kScalePerPixel, true};
  run_cases(o, {Case{op, "fused", pass, kScaleProbeSize, kScalePerPixel, true}, probe}, opts, rows);
  const nb::Row measured = rows.back();
  const Case full{op, "aten_composite", pass, kScaleSize, kScalePerPixel, true};
  info.requested = true;
  info.size = kScaleSize;
  info.per_pixel = kScalePerPixel;
  info.points = points_of(full);
  info.element_size = o.dtype == "float32" ? 4 : 8;
  info.formula_bytes = nb::tricubic_aten_composite_peak_bytes(info.points, info.element_size);
  info.probe_points = measured.points;
  info.probe_peak_bytes = measured.peak_bytes;
  info.extrapolated_bytes = static_cast<int64_t>(static_cast<double>(measured.peak_bytes) /
                                                 measured.points * info.points);
  info.memory_bytes = nb::available_memory_bytes(o.device);
  info.limit_bytes = static_cast<int64_t>(kMemoryFraction * info.memory_bytes);
  info.grid_numel = nb::kGridNodes;
  // run_case decides from the same estimate (estimated_peak): aten_composite
  // at full scale is then a row with that estimate, or a measured one.
  run_cases(o, {Case{op, "fused", pass, kScaleSize, kScalePerPixel, true}, full}, opts, rows);
  info.aten_composite_ran = rows.back().ran();
}

std::string utc_stamp() {
  const std::time_t now = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y%m%dT%H%M%SZ", std::gmtime(&now));
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  if (o.device == "cuda") {
#ifndef NANOBRAGG_WITH_CUDA
    std::cerr << "nanobragg_bench: --device cuda, but this bench was built without CUDA "
                 "(configure with -DNANOBRAGG_CUDA=ON)\n";
    return 2;
#endif
    if (!at::detail::getCUDAHooks().hasCUDA()) {
      std::cerr << "nanobragg_bench: --device cuda, but no CUDA device is available "
                   "(torch finds no GPU or no driver here)\n";
      return 2;
    }
  }
  std::string command_line = "nanobragg_bench";
  for (int i = 1; i < argc; ++i) command_line += std::string(" ") + argv[i];
  const auto opts = at::TensorOptions()
                        .dtype(o.dtype == "float32" ? at::kFloat : at::kDouble)
                        .device(o.device == "cuda" ? at::kCUDA : at::kCPU);
  std::vector<nb::Row> rows;
  nb::ScaleInfo scale;
  // The report's folder; the rows so far are written there after each group
  // of cases (write_rows), so that a run stopped by a time limit (the GPU
  // check gives the bench a few minutes) leaves what it measured.
  const std::string dir = o.outdir + "/" + utc_stamp();
  std::optional<nb::EnvInfo> env;
  auto write_rows = [&](bool complete) {
    if (!env) env = nb::collect_env(NANOBRAGG_SOURCE_DIR, NANOBRAGG_BUILD_TYPE);
    std::vector<nb::Row> so_far = rows;
    nb::compute_speedups(so_far);
    // Written into dir/.writing, then renamed into dir: a run killed while
    // writing leaves the previous files whole.
    const std::filesystem::path writing = std::filesystem::path(dir) / ".writing";
    std::filesystem::create_directories(writing);
    nb::write_report(writing.string(), so_far, *env, command_line, scale,
                     complete ? ""
                              : "Unfinished: the rows measured when this was written; the "
                                "run did not reach its end.");
    for (const auto& f : std::filesystem::directory_iterator(writing)) {
      std::filesystem::rename(f.path(), std::filesystem::path(dir) / f.path().filename());
    }
    std::filesystem::remove(writing);
  };
  try {
    if (o.gather_work) {
      std::filesystem::create_directories(o.outdir);
      const std::string path = o.outdir + "/" + utc_stamp() + ".md";
      nb::write_gather_work(
          path, nb::collect_env(NANOBRAGG_SOURCE_DIR, NANOBRAGG_BUILD_TYPE).summary_line,
          o.sizes_given ? o.sizes : std::vector<int64_t>{}, o.per_pixel);
      std::cout << path << "\n";
      return 0;
    }
    if (!o.single_case.empty()) {
      if (o.peak_out.empty()) usage("--single-case needs --peak-out");
      const auto& sc = o.single_case;
      if (!o.threads.empty() && o.threads.front() > 0)
        at::set_num_threads(static_cast<int>(o.threads.front()));
      run_single_case(o, Case{sc[0], sc[1], sc[2], std::stoll(sc[3]), o.per_pixel}, opts);
      return 0;
    }
    for (int64_t size : o.sizes) {
      for (const auto& op : o.ops) {
        std::cerr << op << ", size " << size << " (" << o.device << ", " << o.dtype << ")\n";
        run_cases(o, cases_of(o, op, size), opts, rows);
        write_rows(false);
      }
    }
    if (o.device == "cuda") {
      const std::vector<nb::Row> goals = nb::run_cuda_goals(o.repeats, o.max_seconds);
      rows.insert(rows.end(), goals.begin(), goals.end());
      if (o.scale) write_rows(false);
    }
    if (o.scale) run_scale(o, opts, rows, scale);
  } catch (const c10::Error& e) {
    std::cerr << "nanobragg_bench: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "nanobragg_bench: " << e.what() << "\n";
    return 1;
  }
  write_rows(true);
  std::cout << dir << "\n";
  // A goal missed is a finding; a case that failed or a mismatch is not.
  const bool failed = std::any_of(rows.begin(), rows.end(), [](const nb::Row& r) {
    return !r.error.empty() || r.check_failed();
  });
  if (failed)
    std::cerr << "nanobragg_bench: some cases failed; see Failures in " << dir
              << "/perf_summary.md\n";
  return failed ? 1 : 0;
}
