// nanobragg_bench: times the fused operators against their baselines on the
// same inputs in one run and writes the report of SPEC section 4.
//
//   nanobragg_bench [--ops tricubic_interp detector_absorption] [--sizes 256 512]
//                   [--points-per-pixel 1] [--repeats 200] [--device cpu|cuda]
//                   [--dtype float32|float64] [--outdir reports/perf]
//                   [--max-seconds-per-case 10] [--scale | --no-scale]
//
// Times run in this process. Each case's peak_bytes is measured in a child
// process of its own: this executable again, with the hidden arguments
// --single-case OP IMPL PASS SIZE --peak-out FILE (see memory.h).
// --scale adds a section at scale: tricubic forward+backward over 2048² × 9
// lookups (run_scale below).
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
#include <iostream>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "memory.h"
#include "nanobragg_ops/ops.h"
#include "report.h"
#include "workloads.h"

namespace nb = nanobragg_bench;

namespace {

struct Options {
  std::vector<std::string> ops = {"tricubic_interp", "detector_absorption"};
  std::vector<int64_t> sizes = {256, 512};
  int64_t per_pixel = 1;
  int64_t repeats = 200;
  std::string device = "cpu";
  std::string dtype = "float32";
  std::string outdir = "reports/perf";
  double max_seconds = 10.0;  // per case: fewer repeats for slow baselines
  bool scale = false;
  // The memory child's side: the case to measure and where to write its peak.
  std::vector<std::string> single_case;  // op impl pass size
  std::string peak_out;
};

[[noreturn]] void usage(const std::string& why) {
  std::cerr << "nanobragg_bench: " << why
            << "\nusage: nanobragg_bench [--ops tricubic_interp detector_absorption] "
               "[--sizes 256 512] [--points-per-pixel N] [--repeats N] [--device cpu|cuda] "
               "[--dtype float32|float64] [--outdir DIR] [--max-seconds-per-case S] [--scale | --no-scale]\n";
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
    } else if (a == "--sizes") {
      o.sizes.clear();
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
      o.max_seconds = std::stod(values().at(0));
    } else if (a == "--scale" || a == "--no-scale") {  // the last one counts
      o.scale = a == "--scale";
    } else if (a == "--single-case") {
      o.single_case = values();
      if (o.single_case.size() != 4) usage("--single-case needs OP IMPL PASS SIZE");
    } else if (a == "--peak-out") {
      o.peak_out = values().at(0);
    } else if (a == "--help" || a == "-h") {
      usage("help");
    } else {
      usage("unknown argument " + a);
    }
  }
  return o;
}

using Clock = std::chrono::steady_clock;
using Call = std::function<void()>;

void synchronize(const std::string& device) {
  if (device == "cuda") at::detail::getCUDAHooks().deviceSynchronize(0);
}

// One row of the report: which implementation of which op, on which inputs.
struct Case {
  std::string op, impl, pass;
  int64_t size = 0, per_pixel = 1;
  bool scale = false;  // the --scale section's rows
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
    w.tricubic = std::make_shared<const nb::TricubicInputs>(nb::make_tricubic_inputs(size, per_pixel, opts));
  } else {
    w.absorption = std::make_shared<const nb::AbsorptionInputs>(nb::make_absorption_inputs(size, opts));
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
};

// The call that a case times, owning what it needs (inputs, leaves, the
// output gradient); backward gives gradients to every differentiable input.
Call make_call(const Case& c, const Workload& w, const at::TensorOptions& opts) {
  const bool fb = c.pass == "forward_backward";
  auto leaves = std::make_shared<Leaves>();
  if (c.op == "tricubic_interp") {
    const auto in = w.tricubic;
    const int64_t n = in->hkl.size(0);
    if (c.impl == "scalar_reference") return [in] { nb::tricubic_scalar_reference(*in); };
    if (c.impl == "grid_sample_trilinear") {
      if (!fb) return [in] { nb::grid_sample_trilinear(in->grid_sample_input, in->grid_sample_coords); };
      const at::Tensor gi = leaves->add(in->grid_sample_input), gc = leaves->add(in->grid_sample_coords);
      const at::Tensor ones = at::ones({1, 1, n, 1, 1}, opts);
      return [leaves, gi, gc, ones] {
        leaves->clear_grads();
        nb::grid_sample_trilinear(gi, gc).backward(ones);
      };
    }
    const bool fused = c.impl == "fused";
    const std::array<int64_t, 3> imin = in->index_min;
    auto f = [fused, imin](const at::Tensor& g, const at::Tensor& h) {
      return fused ? nanobragg_ops::tricubic_interp(g, h, imin) : nb::tricubic_aten_composite(g, h, imin);
    };
    if (!fb) return [in, f] { f(in->grid, in->hkl); };
    const at::Tensor g = leaves->add(in->grid), h = leaves->add(in->hkl);
    const at::Tensor ones = at::ones({n}, opts);
    return [leaves, g, h, ones, f] {
      leaves->clear_grads();
      f(g, h).backward(ones);
    };
  }
  const auto in = w.absorption;
  if (c.impl == "scalar_reference") return [in] { nb::absorption_scalar_reference(*in); };
  const bool fused = c.impl == "fused";
  auto f = [fused, steps = in->thicksteps, over = in->oversample_thick](
               const at::Tensor& I, const at::Tensor& P, const at::Tensor& od, const at::Tensor& T,
               const at::Tensor& A) {
    return fused ? nanobragg_ops::detector_absorption(I, P, od, T, A, steps, over)
                 : nb::absorption_aten_composite(I, P, od, T, A, steps, over);
  };
  if (!fb) {
    return [in, f] { f(in->intensity, in->pixel_coords, in->odet, in->thickness, in->attenuation_length); };
  }
  const at::Tensor I = leaves->add(in->intensity), P = leaves->add(in->pixel_coords),
                   od = leaves->add(in->odet), T = leaves->add(in->thickness),
                   A = leaves->add(in->attenuation_length);
  const at::Tensor ones = at::ones_like(in->intensity);
  return [leaves, I, P, od, T, A, ones, f] {
    leaves->clear_grads();
    f(I, P, od, T, A).backward(ones);
  };
}

// The cases of one op at one size, in report order.
std::vector<Case> cases_of(const Options& o, const std::string& op, int64_t size) {
  std::vector<std::pair<std::string, std::string>> impl_pass = {
      {"fused", "forward"}, {"scalar_reference", "forward"}, {"aten_composite", "forward"}};
  if (op == "tricubic_interp") impl_pass.emplace_back("grid_sample_trilinear", "forward");
  impl_pass.emplace_back("fused", "forward_backward");
  impl_pass.emplace_back("aten_composite", "forward_backward");
  if (op == "tricubic_interp") impl_pass.emplace_back("grid_sample_trilinear", "forward_backward");
  std::vector<Case> cases;
  for (const auto& [impl, pass] : impl_pass) {
    if (impl == "scalar_reference" && o.device != "cpu") continue;  // a CPU loop
    cases.push_back(Case{op, impl, pass, size, o.per_pixel});
  }
  return cases;
}

// Cold time (the first call), then the median of warm calls, each followed by
// a device synchronise.
nb::Row time_call(const Options& o, const Case& c, const Call& fn) {
  std::cerr << "  " << c.op << " " << c.pass << " " << c.impl << " size " << c.size << " ("
            << points_of(c) << " points) ... " << std::flush;
  nb::Row r;
  r.op = c.op;
  r.impl = c.impl;
  r.pass = c.pass;
  r.device = o.device;
  r.dtype = o.dtype;
  r.size = c.size;
  r.points = points_of(c);
  r.scale = c.scale;
  synchronize(o.device);
  auto t0 = Clock::now();
  fn();
  synchronize(o.device);
  r.cold_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  std::vector<double> warm;
  const auto start = Clock::now();
  while (static_cast<int64_t>(warm.size()) < o.repeats &&
         (warm.size() < 3 || std::chrono::duration<double>(Clock::now() - start).count() < o.max_seconds)) {
    t0 = Clock::now();
    fn();
    synchronize(o.device);
    warm.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  std::vector<double> sorted = warm;
  std::sort(sorted.begin(), sorted.end());
  const size_t m = sorted.size();
  r.warm_seconds = m % 2 ? sorted[m / 2] : 0.5 * (sorted[m / 2 - 1] + sorted[m / 2]);
  const double mean = std::accumulate(warm.begin(), warm.end(), 0.0) / m;
  double var = 0;
  for (double w : warm) var += (w - mean) * (w - mean);
  r.warm_std_seconds = m > 1 ? std::sqrt(var / (m - 1)) : 0.0;
  r.repeats = static_cast<int64_t>(m);
  r.calls_per_second = 1.0 / r.warm_seconds;
  r.points_per_second = r.points / r.warm_seconds;
  std::cerr << std::fixed << std::setprecision(3) << r.warm_seconds * 1e3 << " ms (" << m << " repeats)";
  return r;
}

// The arguments that make this executable measure one case's memory.
std::vector<std::string> single_case_args(const Options& o, const Case& c) {
  return {"--single-case", c.op,           c.impl,   c.pass,    std::to_string(c.size),
          "--points-per-pixel", std::to_string(c.per_pixel), "--device", o.device, "--dtype", o.dtype};
}

// Times a case here, then measures its peak memory in a child process.
nb::Row run_case(const Options& o, const Case& c, const Workload& w, const at::TensorOptions& opts) {
  nb::Row r;
  {
    const Call call = make_call(c, w, opts);
    r = time_call(o, c, call);
  }  // the call's leaves and gradients go before the child starts
  const nb::Peak peak = nb::peak_in_child(single_case_args(o, c));
  r.peak_bytes = peak.bytes;
  r.peak_method = peak.method;
  std::cerr << ", peak " << std::setprecision(1) << peak.bytes / 1048576.0 << " MiB\n";
  return r;
}

// The child's side (--single-case): one call of one case, and its peak extra
// memory above the level reached once its inputs exist.
void run_single_case(const Options& o, const Case& c, const at::TensorOptions& opts) {
  {
    // One call on a tiny problem first, so that what a process does once
    // (code paged in, thread pools, lazy initialisation, cuBLAS workspaces)
    // is not charged to the case.
    const Workload w = make_workload(c.op, 16, c.per_pixel, opts);
    make_call(c, w, opts)();
    synchronize(o.device);
  }
  const Workload w = make_workload(c.op, c.size, c.per_pixel, opts);
  const Call call = make_call(c, w, opts);
  synchronize(o.device);
  nb::write_peak(o.peak_out, nb::measure_peak(call, o.device));
}

// --scale: tricubic forward+backward over 2048² detector pixels × 9 lookups
// (37.7 M points). Both implementations run first at 1/64 of the points
// (256² × 9), where both fit; then the fused op at full scale, and
// aten_composite only if its memory, estimated before running it, is at most
// 60% of the memory there is.
constexpr int64_t kScaleSize = 2048, kScalePerPixel = 9, kScaleProbeSize = 256;
constexpr double kScaleMemoryFraction = 0.6;

void run_scale(const Options& o, const at::TensorOptions& opts, std::vector<nb::Row>& rows,
               nb::ScaleInfo& info) {
  const std::string op = "tricubic_interp", pass = "forward_backward";
  std::cerr << "scale: " << op << " " << pass << ", " << kScaleSize << "² × " << kScalePerPixel
            << " points (" << o.device << ", " << o.dtype << ")\n";
  const Case probe{op, "aten_composite", pass, kScaleProbeSize, kScalePerPixel, true};
  {
    const Workload w = make_workload(op, kScaleProbeSize, kScalePerPixel, opts);
    rows.push_back(run_case(o, Case{op, "fused", pass, kScaleProbeSize, kScalePerPixel, true}, w, opts));
    rows.push_back(run_case(o, probe, w, opts));
  }
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
  info.extrapolated_bytes = static_cast<int64_t>(
      static_cast<double>(measured.peak_bytes) / measured.points * info.points);
  info.memory_bytes = o.device == "cuda" ? nb::cuda_memory_bytes() : nb::physical_memory_bytes();
  info.limit_bytes = static_cast<int64_t>(kScaleMemoryFraction * info.memory_bytes);
  const int64_t estimate = std::max(info.formula_bytes, info.extrapolated_bytes);

  const Workload w = make_workload(op, kScaleSize, kScalePerPixel, opts);
  info.grid_numel = w.tricubic->grid.numel();
  rows.push_back(run_case(o, Case{op, "fused", pass, kScaleSize, kScalePerPixel, true}, w, opts));
  if (estimate <= info.limit_bytes) {
    rows.push_back(run_case(o, full, w, opts));
    info.aten_composite_ran = true;
  } else {
    std::cerr << "  " << op << " " << pass << " aten_composite size " << kScaleSize
              << ": not run, it would need about " << std::setprecision(1) << estimate / 1073741824.0
              << " GiB, over " << kScaleMemoryFraction * 100 << "% of " << info.memory_bytes / 1073741824.0
              << " GiB\n";
  }
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
  if (o.device == "cuda" && !at::detail::getCUDAHooks().hasCUDA()) {
    std::cerr << "nanobragg_bench: --device cuda, but no CUDA device is available\n";
    return 2;
  }
  std::string command_line = "nanobragg_bench";
  for (int i = 1; i < argc; ++i) command_line += std::string(" ") + argv[i];
  const auto opts = at::TensorOptions()
                        .dtype(o.dtype == "float32" ? at::kFloat : at::kDouble)
                        .device(o.device == "cuda" ? at::kCUDA : at::kCPU);
  std::vector<nb::Row> rows;
  nb::ScaleInfo scale;
  try {
    if (!o.single_case.empty()) {
      if (o.peak_out.empty()) usage("--single-case needs --peak-out");
      const auto& sc = o.single_case;
      run_single_case(o, Case{sc[0], sc[1], sc[2], std::stoll(sc[3]), o.per_pixel}, opts);
      return 0;
    }
    for (int64_t size : o.sizes) {
      for (const auto& op : o.ops) {
        std::cerr << op << ", size " << size << " (" << o.device << ", " << o.dtype << ")\n";
        const Workload w = make_workload(op, size, o.per_pixel, opts);
        for (const Case& c : cases_of(o, op, size)) rows.push_back(run_case(o, c, w, opts));
      }
    }
    if (o.scale) run_scale(o, opts, rows, scale);
  } catch (const c10::Error& e) {
    std::cerr << "nanobragg_bench: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "nanobragg_bench: " << e.what() << "\n";
    return 1;
  }
  nb::compute_speedups(rows);
  const std::string dir = o.outdir + "/" + utc_stamp();
  std::filesystem::create_directories(dir);
  const nb::EnvInfo env = nb::collect_env(NANOBRAGG_SOURCE_DIR, NANOBRAGG_BUILD_TYPE);
  nb::write_report(dir, rows, env, command_line, scale);
  std::cout << dir << "\n";
  return 0;
}
