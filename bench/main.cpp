// nanobragg_bench: times the fused operators against their baselines on the
// same inputs in one run and writes the report of SPEC section 4.
//
//   nanobragg_bench [--ops tricubic_interp detector_absorption] [--sizes 256 512]
//                   [--points-per-pixel 1] [--repeats 200] [--device cpu|cuda]
//                   [--dtype float32|float64] [--outdir reports/perf]
//                   [--max-seconds-per-case 10]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <torch/autograd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#ifdef NANOBRAGG_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

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
};

[[noreturn]] void usage(const std::string& why) {
  std::cerr << "nanobragg_bench: " << why
            << "\nusage: nanobragg_bench [--ops tricubic_interp detector_absorption] "
               "[--sizes 256 512] [--points-per-pixel N] [--repeats N] [--device cpu|cuda] "
               "[--dtype float32|float64] [--outdir DIR] [--max-seconds-per-case S]\n";
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
    } else if (a == "--help" || a == "-h") {
      usage("help");
    } else {
      usage("unknown argument " + a);
    }
  }
  return o;
}

using Clock = std::chrono::steady_clock;

void synchronize(const std::string& device) {
  if (device == "cuda") at::detail::getCUDAHooks().deviceSynchronize(0);
}

int64_t proc_status_kb(const char* field) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind(field, 0) == 0) return std::stoll(line.substr(std::strlen(field)));
  }
  return 0;
}

// Peak extra memory of one call: on CPU the growth of the resident set above
// its level before the call (the kernel's high-water mark is reset first),
// on CUDA the caching allocator's peak above its level before the call.
int64_t peak_bytes_of(const std::function<void()>& fn, const std::string& device) {
#ifdef NANOBRAGG_WITH_CUDA
  if (device == "cuda") {
    using namespace c10::cuda::CUDACachingAllocator;
    synchronize(device);
    resetPeakStats(0);
    const int64_t before = getDeviceStats(0).allocated_bytes[0].current;
    fn();
    synchronize(device);
    return getDeviceStats(0).allocated_bytes[0].peak - before;
  }
#endif
  (void)device;
  std::ofstream("/proc/self/clear_refs") << "5";  // reset VmHWM to VmRSS
  const int64_t before = proc_status_kb("VmRSS:");
  fn();
  return std::max<int64_t>(0, proc_status_kb("VmHWM:") - before) * 1024;
}

nb::Row time_case(const Options& o, const std::string& op, const std::string& impl,
                  const std::string& pass, int64_t size, int64_t points,
                  const std::function<void()>& fn) {
  std::cerr << "  " << op << " " << pass << " " << impl << " size " << size << " ... " << std::flush;
  nb::Row r;
  r.op = op;
  r.impl = impl;
  r.pass = pass;
  r.device = o.device;
  r.dtype = o.dtype;
  r.size = size;
  r.points = points;
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
  r.points_per_second = points / r.warm_seconds;
  r.peak_bytes = peak_bytes_of(fn, o.device);
  std::cerr << std::fixed << r.warm_seconds * 1e3 << " ms (" << m << " repeats)\n";
  return r;
}

// Leaves that get gradients in a forward_backward case, reset every call.
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

void bench_tricubic(const Options& o, int64_t size, const at::TensorOptions& opts,
                    std::vector<nb::Row>& rows) {
  const nb::TricubicInputs in = nb::make_tricubic_inputs(size, o.per_pixel, opts);
  const int64_t n = in.hkl.size(0);
  const auto& imin = in.index_min;
  const std::string op = "tricubic_interp";
  auto fused = [&](const at::Tensor& g, const at::Tensor& h) {
    return nanobragg_ops::tricubic_interp(g, h, imin);
  };
  auto composite = [&](const at::Tensor& g, const at::Tensor& h) {
    return nb::tricubic_aten_composite(g, h, imin);
  };
  rows.push_back(time_case(o, op, "fused", "forward", size, n, [&] { fused(in.grid, in.hkl); }));
  if (o.device == "cpu") {
    rows.push_back(time_case(o, op, "scalar_reference", "forward", size, n,
                             [&] { nb::tricubic_scalar_reference(in); }));
  }
  rows.push_back(time_case(o, op, "aten_composite", "forward", size, n, [&] { composite(in.grid, in.hkl); }));
  rows.push_back(time_case(o, op, "grid_sample_trilinear", "forward", size, n, [&] {
    nb::grid_sample_trilinear(in.grid_sample_input, in.grid_sample_coords);
  }));
  const at::Tensor ones = at::ones({n}, opts);
  for (const std::string impl : {"fused", "aten_composite"}) {
    Leaves leaves;
    const at::Tensor g = leaves.add(in.grid), h = leaves.add(in.hkl);
    rows.push_back(time_case(o, op, impl, "forward_backward", size, n, [&] {
      leaves.clear_grads();
      (impl == "fused" ? fused(g, h) : composite(g, h)).backward(ones);
    }));
  }
  Leaves leaves;
  const at::Tensor gi = leaves.add(in.grid_sample_input), gc = leaves.add(in.grid_sample_coords);
  const at::Tensor ones5 = at::ones({1, 1, n, 1, 1}, opts);
  rows.push_back(time_case(o, op, "grid_sample_trilinear", "forward_backward", size, n, [&] {
    leaves.clear_grads();
    nb::grid_sample_trilinear(gi, gc).backward(ones5);
  }));
}

void bench_absorption(const Options& o, int64_t size, const at::TensorOptions& opts,
                      std::vector<nb::Row>& rows) {
  const nb::AbsorptionInputs in = nb::make_absorption_inputs(size, opts);
  const int64_t n = size * size;
  const std::string op = "detector_absorption";
  auto run = [&](const std::string& impl, const at::Tensor& I, const at::Tensor& P,
                 const at::Tensor& od, const at::Tensor& T, const at::Tensor& A) {
    return impl == "fused"
               ? nanobragg_ops::detector_absorption(I, P, od, T, A, in.thicksteps, in.oversample_thick)
               : nb::absorption_aten_composite(I, P, od, T, A, in.thicksteps, in.oversample_thick);
  };
  for (const std::string impl : {"fused", "scalar_reference", "aten_composite"}) {
    if (impl == "scalar_reference") {
      if (o.device == "cpu") {
        rows.push_back(time_case(o, op, impl, "forward", size, n, [&] { nb::absorption_scalar_reference(in); }));
      }
      continue;
    }
    rows.push_back(time_case(o, op, impl, "forward", size, n, [&] {
      run(impl, in.intensity, in.pixel_coords, in.odet, in.thickness, in.attenuation_length);
    }));
  }
  const at::Tensor ones = at::ones({size, size}, opts);
  for (const std::string impl : {"fused", "aten_composite"}) {
    Leaves l;
    const at::Tensor I = l.add(in.intensity), P = l.add(in.pixel_coords), od = l.add(in.odet),
                     T = l.add(in.thickness), A = l.add(in.attenuation_length);
    rows.push_back(time_case(o, op, impl, "forward_backward", size, n, [&] {
      l.clear_grads();
      run(impl, I, P, od, T, A).backward(ones);
    }));
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
  try {
    for (int64_t size : o.sizes) {
      for (const auto& op : o.ops) {
        std::cerr << op << ", size " << size << " (" << o.device << ", " << o.dtype << ")\n";
        if (op == "tricubic_interp") bench_tricubic(o, size, opts, rows);
        if (op == "detector_absorption") bench_absorption(o, size, opts, rows);
      }
    }
  } catch (const c10::Error& e) {
    std::cerr << "nanobragg_bench: " << e.what_without_backtrace() << "\n";
    return 1;
  }
  nb::compute_speedups(rows);
  const std::string dir = o.outdir + "/" + utc_stamp();
  std::filesystem::create_directories(dir);
  const nb::EnvInfo env = nb::collect_env(NANOBRAGG_SOURCE_DIR, NANOBRAGG_BUILD_TYPE);
  nb::write_report(dir, rows, env, command_line);
  std::cout << dir << "\n";
  return 0;
}
