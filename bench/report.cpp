#include "report.h"

#include "workloads.h"

#include "nanobragg_ops/ops.h"

#include <ATen/Parallel.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/util/Exception.h>
#include <torch/version.h>

#include <nlohmann/json.hpp>

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <numeric>
#include <sstream>

namespace nanobragg_bench {

void set_warm_times(Row& r, const std::vector<double>& seconds) {
  std::vector<double> sorted = seconds;
  std::sort(sorted.begin(), sorted.end());
  const size_t m = sorted.size();
  if (m == 0) return;
  r.warm_seconds = m % 2 ? sorted[m / 2] : 0.5 * (sorted[m / 2 - 1] + sorted[m / 2]);
  const double mean = std::accumulate(seconds.begin(), seconds.end(), 0.0) / m;
  double var = 0;
  for (double w : seconds) var += (w - mean) * (w - mean);
  r.warm_std_seconds = m > 1 ? std::sqrt(var / (m - 1)) : 0.0;
  r.repeats = static_cast<int64_t>(m);
  r.calls_per_second = 1.0 / r.warm_seconds;
  r.points_per_second = r.points / r.warm_seconds;
}

std::string message_of(const std::exception& e) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&e))
    return c10_error->what_without_backtrace();
  return e.what();
}

const std::vector<BackwardVariant>& backward_variants(const std::string& op) {
  static const std::vector<BackwardVariant> tricubic = {{"all", "expanded", 2.0}};
  static const std::vector<BackwardVariant> absorption = {
      {"all", "expanded", 3.0},         {"all", "contiguous", 3.0},
      {"all", "strided", 3.0},          {"intensity", "expanded", 1.5},
      {"intensity", "contiguous", 1.5}, {"intensity", "strided", 1.5}};
  return op == "tricubic_interp" ? tricubic : absorption;
}

std::string backward_field(const std::string& grads, const std::string& layout) {
  const std::string base = "backward_in_forwards_interleaved";
  return grads == "all" && layout == "expanded" ? base : base + "_" + grads + "_" + layout;
}

std::string interleaved_speedup_field(const std::string& impl) {
  return "speedup_vs_" + impl + "_interleaved";
}

void compute_speedups(std::vector<Row>& rows) {
  for (Row& r : rows) {
    for (const Row& o : rows) {
      if (&o != &r && o.op == r.op && o.pass == r.pass && o.device == r.device &&
          o.dtype == r.dtype && o.size == r.size && o.points == r.points && o.scale == r.scale &&
          o.threads == r.threads && o.cuda_goal == r.cuda_goal && r.ran() && o.ran() &&
          r.warm_seconds > 0) {
        r.speedup_vs[o.impl] = o.warm_seconds / r.warm_seconds;
      }
    }
  }
}

namespace {

std::string run_command(const std::string& cmd) {
  std::string out;
  if (FILE* p = popen(cmd.c_str(), "r")) {
    char buf[256];
    while (fgets(buf, sizeof buf, p)) out += buf;
    pclose(p);
  }
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("model name", 0) == 0) {
      return line.substr(line.find(':') + 2);
    }
  }
  return "unknown";
}

std::string fmt(double v, int precision) {
  std::ostringstream s;
  s << std::fixed << std::setprecision(precision) << v;
  return s.str();
}

// Bytes as MiB, two decimals below 10 MiB so that small outputs still show.
std::string mib(int64_t bytes) {
  const double m = bytes / 1048576.0;
  return fmt(m, m < 10 ? 2 : 1);
}

std::string gib(int64_t bytes) {
  return fmt(bytes / 1073741824.0, 1);
}

std::string sci(double v) {
  std::ostringstream s;
  s << std::scientific << std::setprecision(1) << v;
  return s.str();
}

// What the Targets table adds after a figure timed in alternation (main.cpp's
// interleaved measurements): the rounds, read from the row, and the figure
// from the two rows' own medians where there is one to show.
std::string interleaved_note(const Row& r, const std::string& rows_figure) {
  return " (median of " + fmt(r.fields.at("interleaved_rounds"), 0) + " interleaved rounds" +
         (rows_figure.empty() ? "" : "; from the rows' medians " + rows_figure) + ")";
}

// A row of the main tables (not --scale, not a GPU goal).
bool main_row(const Row& r) {
  return !r.scale && !r.cuda_goal;
}

// The check column: the baseline's relative difference from the fused op.
std::string check_cell(const Row& r) {
  if (r.check_rel_err < 0) return "";
  return r.check_failed() ? "**" + sci(r.check_rel_err) + " MISMATCH** (" + r.check_what + ")"
                          : sci(r.check_rel_err);
}

// The row of a case; threads 0: the most threads any row of it ran on.
const Row* find(const std::vector<Row>& rows, const std::string& op, const std::string& impl,
                const std::string& pass, int64_t size, const std::string& dtype,
                const std::string& device, int64_t threads = 0) {
  if (threads == 0) {
    for (const Row& r : rows) {
      if (main_row(r) && r.op == op && r.size == size && r.dtype == dtype && r.device == device)
        threads = std::max(threads, r.threads);
    }
  }
  for (const Row& r : rows) {
    if (main_row(r) && r.ran() && r.op == op && r.impl == impl && r.pass == pass &&
        r.size == size && r.dtype == dtype && r.device == device && r.threads == threads) {
      return &r;
    }
  }
  return nullptr;
}

// The --scale section: its rows, and aten_composite at full scale measured
// or, where it was not run, estimated.
void write_scale_section(std::ostringstream& md, const std::vector<Row>& rows,
                         const ScaleInfo& sc) {
  const int64_t s = sc.element_size;
  md << "\n## Scale: tricubic forward+backward, " << sc.size << "² × " << sc.per_pixel << " = "
     << sc.points << " points\n\n"
     << "Gradients to hkl and to the grid, " << (s == 4 ? "float32" : "float64")
     << ". Both implementations also at 1/64 of the points, where both fit. \"output + "
        "gradients\" is the least any implementation must allocate: the output, the hkl "
        "gradient and the grid gradient, (4 × points + grid) × "
     << s << " bytes.\n\n"
     << "| impl | points | cold s | warm s | repeats | Mpoints/s | peak MiB | bytes/point | "
        "output + gradients MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n";
  auto floor_bytes = [&](int64_t points) { return (4 * points + sc.grid_numel) * s; };
  for (const Row& r : rows) {
    if (!r.scale || !r.ran()) continue;  // aten_composite not run: its estimate below
    md << "| " << r.impl << " | " << r.points << " | " << fmt(r.cold_seconds, 3) << " | "
       << fmt(r.warm_seconds, 3) << " | " << r.repeats << " | " << fmt(r.points_per_second / 1e6, 2)
       << " | " << mib(r.peak_bytes) << " | " << fmt(double(r.peak_bytes) / r.points, 1) << " | "
       << mib(floor_bytes(r.points)) << " |\n";
  }
  const int64_t estimate = std::max(sc.formula_bytes, sc.extrapolated_bytes);
  if (!sc.aten_composite_ran) {
    md << "| aten_composite | " << sc.points << " | not run | | | | **≈ " << mib(estimate) << "** ("
       << gib(estimate) << " GiB, estimated) | " << fmt(double(estimate) / sc.points, 1) << " | "
       << mib(floor_bytes(sc.points)) << " |\n";
  }
  md << "\naten_composite's peak, counted from its code (bench/workloads.cpp, "
        "`tricubic_aten_composite_peak_bytes`), is (350 s + 97) bytes per point for "
        "s-byte floats: a forward graph of 202 s + 97 bytes kept for the backward (the "
        "gathered [4,4,4] neighbourhood 64 s, the einsum's [4,4] and [4,4,4] outer products "
        "80 s, the Lagrange weights and their saved factors 54 s, three [4] int64 index rows "
        "96 B, ...) and, at the backward's peak, 148 s more ([4,4,4]-sized gradients). Here "
     << fmt(double(sc.formula_bytes) / sc.points, 1) << " bytes per point, "
     << gib(sc.formula_bytes) << " GiB at " << sc.points << " points; measured at "
     << sc.probe_points << " points: " << fmt(double(sc.probe_peak_bytes) / sc.probe_points, 1)
     << " bytes per point, i.e. " << gib(sc.extrapolated_bytes) << " GiB at full scale. ";
  if (sc.aten_composite_ran) {
    md << "The larger of the two, " << gib(estimate) << " GiB, was within " << gib(sc.limit_bytes)
       << " GiB (60% of " << gib(sc.memory_bytes)
       << " GiB), so it ran; its row above is measured.\n";
  } else {
    md << "The larger of the two, " << gib(estimate) << " GiB, is over " << gib(sc.limit_bytes)
       << " GiB (60% of the " << gib(sc.memory_bytes)
       << " GiB of memory there is: RAM, or on CUDA the GPU's free memory), so it was not run: its "
          "row "
          "is that estimate.\n";
  }
}

// A named figure of a GPU-goal row, in a unit that reads: bandwidths in
// GB/s, everything else as it is.
std::string field_cell(const std::string& name, double v) {
  const std::string per_s = "bytes_per_second";
  if (name.size() >= per_s.size() &&
      name.compare(name.size() - per_s.size(), per_s.size(), per_s) == 0) {
    return name.substr(0, name.size() - per_s.size()) + "GB/s " + fmt(v / 1e9, 1);
  }
  std::ostringstream o;
  o << name << " " << std::setprecision(4) << v;
  return o.str();
}

// The GPU goals (cuda_goals.h): a line per goal, then the measurements.
void write_cuda_goals_section(std::ostringstream& md, const std::vector<Row>& rows) {
  md << "\n## GPU goals\n\n";
  if (std::none_of(rows.begin(), rows.end(), [](const Row& r) { return r.cuda_goal; })) {
    md << "cuda only (`--device cuda`): not measured in this run.\n";
    return;
  }
  md << "float32 whatever `--dtype` says. Tricubic: 2048² × 9 clustered lookups (detector "
        "pixels in order, the 9 mosaic lookups of a pixel together; a 30 Å cell, so that every "
        "lookup of the 2048² detector is inside the 64³ grid: `in_range_fraction`). The grid "
        "gradient alone is `nanobragg::tricubic_interp_backward` with output_mask [grid], "
        "default (atomic) and under `setDeterministicAlgorithms(true)`. Bandwidth = bytes read "
        "+ written per call / time; the copy is a 1 GiB device-to-device `copy_`, 2 GiB moved. "
        "Time per call: CUDA events around a batch of calls queued behind a sleep kernel "
        "(so the launch rate does not count), the median of `repeats` batches after a warm-up; "
        "absorption rotates over several input copies, so that its inputs are not served from "
        "L2.\n\n"
     << "| goal | measured | target | met |\n|---|---:|---:|:---:|\n";
  for (const Row& r : rows) {
    if (!r.cuda_goal) continue;
    if (r.goal) {
      md << "| " << r.goal->name << " | " << fmt(r.goal->value, 3) << " " << r.goal->unit << " | "
         << (r.goal->at_most ? "≤ " : "≥ ") << fmt(r.goal->target, 2) << " " << r.goal->unit
         << " | " << (r.goal->met() ? "yes" : "**no**") << " |\n";
    } else if (!r.error.empty()) {
      md << "| " << r.op << " " << r.pass << " | failed: " << r.error << " | | **no** |\n";
    }
  }
  md << "\n| op | pass | points | GPU ms per call | ± std ms | calls timed | figures |\n"
        "|---|---|---:|---:|---:|---:|---|\n";
  for (const Row& r : rows) {
    if (!r.cuda_goal || !r.ran()) continue;
    std::string figures;
    for (const auto& [name, value] : r.fields)
      figures += (figures.empty() ? "" : ", ") + field_cell(name, value);
    if (r.check_rel_err >= 0) {
      figures += (figures.empty() ? "" : ", ") + r.check_what + " differ by " +
                 sci(r.check_rel_err) + (r.check_failed() ? " **MISMATCH**" : "");
    }
    md << "| " << r.op << " | " << r.pass << " | " << r.points << " | "
       << fmt(r.warm_seconds * 1e3, 4) << " | " << fmt(r.warm_std_seconds * 1e3, 4) << " | "
       << r.repeats << " | " << figures << " |\n";
  }
}

}  // namespace

EnvInfo collect_env(const std::string& source_dir, const std::string& build_type) {
  nlohmann::json env;
  env["torch_version"] = TORCH_VERSION;
  const auto& cuda = at::detail::getCUDAHooks();
  env["cuda_available"] = cuda.hasCUDA();
  std::vector<std::string> names;
  if (cuda.hasCUDA()) {
    const std::string smi =
        run_command("nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null");
    std::istringstream s(smi);
    for (std::string line; std::getline(s, line);) names.push_back(line);
  }
  env["cuda_devices"] = names;
  env["cpu_model"] = cpu_model();
  env["threads"] = at::get_num_threads();
  // The build of the CPU kernels that ran: chosen by CPU features, or by
  // ATEN_CPU_CAPABILITY.
  env["cpu_capability"] = nanobragg_ops::cpu_capability();
  env["cpu_capability_best"] = nanobragg_ops::best_cpu_capability();
  env["scalar_reference_capability"] = scalar_reference_capability();
  const char* forced = std::getenv("ATEN_CPU_CAPABILITY");
  env["aten_cpu_capability_env"] = forced == nullptr ? "" : forced;
  env["memory_bytes"] = static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGE_SIZE);
  env["parallel_info"] = at::get_parallel_info();
  env["compiler"] = std::string("g++ ") + __VERSION__;
  env["build_type"] = build_type;
  const std::string git = "git -C '" + source_dir + "' ";
  env["git_revision"] = run_command(git + "rev-parse HEAD 2>/dev/null");
  env["git_dirty"] =
      !run_command(git + "status --porcelain --untracked-files=no 2>/dev/null").empty();
  EnvInfo info;
  info.json = env.dump(2);
  info.summary_line =
      "torch " + std::string(TORCH_VERSION) + ", " + env["cpu_model"].get<std::string>() + ", " +
      std::to_string(at::get_num_threads()) + " threads, CPU kernels " +
      env["cpu_capability"].get<std::string>() + (names.empty() ? "" : ", GPU " + names.front()) +
      ", " + build_type + " build, git " + env["git_revision"].get<std::string>().substr(0, 10) +
      (env["git_dirty"].get<bool>() ? " (dirty)" : "");
  return info;
}

void write_report(const std::string& dir, const std::vector<Row>& rows, const EnvInfo& env,
                  const std::string& command_line, const ScaleInfo& scale,
                  const std::string& unfinished) {
  nlohmann::json results = nlohmann::json::array();
  for (const Row& r : rows) {
    nlohmann::ordered_json j;
    j["op"] = r.op;
    j["impl"] = r.impl;
    j["pass"] = r.pass;
    j["device"] = r.device;
    j["dtype"] = r.dtype;
    j["size"] = r.size;
    j["points"] = r.points;
    j["threads"] = r.threads;
    // What was not measured is null, not 0: a case not run or failed has no
    // times, and the GPU-goal rows and failed memory children no peak.
    const bool timed = r.ran();
    const bool peak = !r.peak_method.empty() && r.peak_method != "not_measured" && !r.peak_failed();
    j["cold_seconds"] = timed ? nlohmann::json(r.cold_seconds) : nlohmann::json();
    j["warm_seconds"] = timed ? nlohmann::json(r.warm_seconds) : nlohmann::json();
    j["warm_std_seconds"] = timed ? nlohmann::json(r.warm_std_seconds) : nlohmann::json();
    j["repeats"] = r.repeats;
    j["calls_per_second"] = timed ? nlohmann::json(r.calls_per_second) : nlohmann::json();
    j["points_per_second"] = timed ? nlohmann::json(r.points_per_second) : nlohmann::json();
    j["peak_bytes"] = peak ? nlohmann::json(r.peak_bytes) : nlohmann::json();
    j["peak_method"] = r.peak_method;
    j["scale"] = r.scale;
    if (!r.not_run.empty()) j["not_run"] = r.not_run;
    if (!r.error.empty()) j["error"] = r.error;
    if (r.check_rel_err >= 0) {
      j["check_rel_err"] = r.check_rel_err;
      j["check_tolerance"] = r.check_tolerance;
      j["check_ok"] = !r.check_failed();
      j["check"] = r.check_what;
    }
    for (const auto& [name, value] : r.fields) j[name] = value;
    if (r.cuda_goal) {
      j["cuda_goal"] = true;
      if (r.goal) {
        j["goal"] = {{"name", r.goal->name},
                     {"unit", r.goal->unit},
                     {"value", r.goal->value},
                     {"target", r.goal->target},
                     {"comparison", r.goal->at_most ? "<=" : ">="},
                     {"met", r.goal->met()}};
      }
    }
    for (const auto& [impl, ratio] : r.speedup_vs) j["speedup_vs_" + impl] = ratio;
    results.push_back(nlohmann::json::parse(j.dump()));
  }
  {
    // Seconds keep full double precision (well over 6 decimals).
    std::ofstream(dir + "/perf_results.json") << std::setprecision(12) << results.dump(2) << "\n";
    std::ofstream(dir + "/env.json") << env.json << "\n";
  }

  std::ostringstream md;
  md << "# Performance summary\n\n"
     << env.summary_line << ".\n\nCommand: `" << command_line << "`\n\n"
     << (unfinished.empty() ? "" : "**" + unfinished + "**\n\n")
     << "Warm time is the median of `repeats` calls after one cold (first) call, each "
        "followed by a device synchronise; speedup = the other implementation's warm time / "
        "this one's, from the same run. Peak is the peak extra memory of one call, the output "
        "and the gradients included. A CPU row's is measured in a child process of its own: it "
        "builds the inputs, makes one call on a tiny problem (so that what a process does once, "
        "such as paging code in or starting threads, is not charged), then one call of the "
        "case, and reports the growth of the resident set's high-water mark (VmHWM, reset just "
        "before the call) above the resident set before the call. A CUDA row's is measured in "
        "the bench's own process after the row's timed calls: the caching allocator's peak "
        "over one more call above its level before the call.\n";
  std::string failures;
  for (const Row& r : rows) {
    const std::string what = r.op + " " + r.pass + " " + r.impl + " size " + std::to_string(r.size);
    if (!r.error.empty()) failures += "* " + what + ": " + r.error + "\n";
    if (r.check_failed()) {
      failures += "* " + what + ": its " + r.check_what + " differ from the fused op's by " +
                  sci(r.check_rel_err) + " of their largest magnitude (tolerance " +
                  sci(r.check_tolerance) + ")\n";
    }
  }
  if (!failures.empty()) md << "\n**Failures** (the bench exits with status 1):\n\n" << failures;
  bool hwm_not_reset = false;
  for (const Row& r : rows) hwm_not_reset |= r.peak_method == "rss_hwm_not_reset";
  if (hwm_not_reset) {
    md << "\n**Some peaks are upper bounds**: /proc/self/clear_refs refused to reset the "
          "high-water mark, so an earlier peak (while the inputs were built) may be counted "
          "(`peak_method` `rss_hwm_not_reset` in perf_results.json).\n";
  }
  std::vector<std::string> groups;
  for (const Row& r : rows) {
    if (!main_row(r)) continue;
    const std::string g = r.op + " / " + r.pass + " / " + r.device + " / " + r.dtype + " / size " +
                          std::to_string(r.size) + " (" + std::to_string(r.points) + " points)" +
                          (r.device == "cpu" ? " / " + std::to_string(r.threads) + " threads" : "");
    if (std::find(groups.begin(), groups.end(), g) == groups.end()) {
      groups.push_back(g);
      md << "\n### " << g
         << "\n\n| impl | cold ms | warm ms | ± std ms | repeats | Mpoints/s | peak MiB | speedups "
            "(vs) | check vs fused |\n|---|---:|---:|---:|---:|---:|---:|---|---|\n";
      for (const Row& s : rows) {
        if (!main_row(s) || s.op != r.op || s.pass != r.pass || s.device != r.device ||
            s.dtype != r.dtype || s.size != r.size || s.points != r.points ||
            s.threads != r.threads)
          continue;
        if (!s.not_run.empty()) {
          md << "| " << s.impl << " | not run | | | | | ≈ " << mib(s.peak_bytes)
             << " (estimated) | " << s.not_run << " | |\n";
          continue;
        }
        if (!s.ran()) {
          md << "| " << s.impl << " | failed | | | | | | " << s.error << " | " << check_cell(s)
             << " |\n";
          continue;
        }
        std::string sp;
        for (const auto& [impl, ratio] : s.speedup_vs)
          sp += (sp.empty() ? "" : ", ") + impl + " " + fmt(ratio, 2) + "×";
        md << "| " << s.impl << " | " << fmt(s.cold_seconds * 1e3, 3) << " | "
           << fmt(s.warm_seconds * 1e3, 3) << " | " << fmt(s.warm_std_seconds * 1e3, 3) << " | "
           << s.repeats << " | " << fmt(s.points_per_second / 1e6, 2) << " | "
           << (s.peak_failed() ? std::string("failed") : mib(s.peak_bytes)) << " | " << sp << " | "
           << check_cell(s) << " |\n";
      }
    }
  }

  // The CPU kernels' targets (float32, size 512). CUDA rows have their own
  // goals (write_cuda_goals_section): on a GPU a first call loads the CUDA
  // module and a 512² case measures kernel launches, so these ratios would
  // say little about the kernels there.
  md << "\n## Targets (CPU, float32, size 512)\n\n| target | measured | met |\n"
        "|---|---:|:---:|\n";
  bool any_target = false;
  std::vector<int64_t> cpu_threads;  // the thread counts of the CPU rows
  for (const Row& r : rows) {
    if (main_row(r) && r.device == "cpu" &&
        std::find(cpu_threads.begin(), cpu_threads.end(), r.threads) == cpu_threads.end())
      cpu_threads.push_back(r.threads);
  }
  for (const std::string device : {"cpu"}) {
    for (const int64_t threads : cpu_threads) {
      const std::string where =
          "cpu " + std::to_string(threads) + " thread" + (threads > 1 ? "s" : "");
      auto target = [&](const std::string& what, const std::string& op, const std::string& pass,
                        const std::string& vs, double need, bool at_most_time_ratio) {
        const Row* r = find(rows, op, "fused", pass, 512, "float32", device, threads);
        if (r == nullptr || !r->speedup_vs.count(vs)) return;
        any_target = true;
        // From interleaved timing where the bench has it (main.cpp,
        // add_interleaved_speedups), else from the two rows' medians.
        const double of_rows = r->speedup_vs.at(vs);
        const auto interleaved = r->fields.find(interleaved_speedup_field(vs));
        const bool have = interleaved != r->fields.end();
        const double ratio = have ? interleaved->second : of_rows;
        // "no more than `need` times the time of vs": its time over ours
        const double shown = at_most_time_ratio ? 1.0 / ratio : ratio;
        const std::string unit = at_most_time_ratio ? "× its time" : "×";
        md << "| " << where << ": " << what << " | " << fmt(shown, 2) << unit
           << (have ? interleaved_note(*r,
                                       fmt(at_most_time_ratio ? 1.0 / of_rows : of_rows, 2) + unit)
                    : std::string())
           << " | " << ((at_most_time_ratio ? shown <= need : shown >= need) ? "yes" : "**no**")
           << " |\n";
      };
      target("tricubic forward ≥ 20× aten_composite", "tricubic_interp", "forward",
             "aten_composite", 20, false);
      target("tricubic forward ≥ 5× scalar_reference", "tricubic_interp", "forward",
             "scalar_reference", 5, false);
      target("tricubic forward ≤ 3× the time of grid_sample_trilinear", "tricubic_interp",
             "forward", "grid_sample_trilinear", 3, true);
      target("tricubic forward+backward ≥ 10× aten_composite", "tricubic_interp",
             "forward_backward", "aten_composite", 10, false);
      // Issue 17's goals against ATen's trilinear grid_sample, given one batch
      // entry per thread (grid_sample_split) where it runs on more than one.
      const std::string trilinear = threads > 1 ? "grid_sample_split" : "grid_sample_trilinear";
      target("tricubic forward ≥ 2× " + trilinear, "tricubic_interp", "forward", trilinear, 2,
             false);
      target("tricubic forward ≥ 8× scalar_reference", "tricubic_interp", "forward",
             "scalar_reference", 8, false);
      target("tricubic forward+backward ≥ 1× " + trilinear, "tricubic_interp", "forward_backward",
             trilinear, 1, false);
      if (device == "cpu" && threads > 1) {
        const Row* one =
            find(rows, "tricubic_interp", "fused", "forward", 512, "float32", "cpu", 1);
        const Row* all =
            find(rows, "tricubic_interp", "fused", "forward", 512, "float32", "cpu", threads);
        if (one != nullptr && all != nullptr) {
          // From interleaved timing where the bench has it (main.cpp,
          // add_interleaved_scaling), else from the two rows' medians.
          const double of_rows = one->warm_seconds / all->warm_seconds;
          const auto interleaved = all->fields.find("speedup_over_1_thread_interleaved");
          const bool have = interleaved != all->fields.end();
          const double speedup = have ? interleaved->second : of_rows;
          const double need = threads >= 2 ? 1.7 * threads / 2.0 : 1.0;
          md << "| " << where << ": tricubic forward ≥ " << fmt(need, 2)
             << "× faster than on 1 thread | " << fmt(speedup, 2) << "×"
             << (have ? interleaved_note(*all, fmt(of_rows, 2) + "×") : std::string()) << " | "
             << (speedup >= need ? "yes" : "**no**") << " |\n";
        }
      }
      // The backward alone, in forwards (backward_variants' goals):
      // interleaved with forwards where the bench timed it (main.cpp,
      // add_interleaved_backward), else, for the rows' own variant,
      // forward+backward minus forward from their medians.
      for (const std::string op : {"tricubic_interp", "detector_absorption"}) {
        const Row* f = find(rows, op, "fused", "forward", 512, "float32", device, threads);
        const Row* fb =
            find(rows, op, "fused", "forward_backward", 512, "float32", device, threads);
        if (f == nullptr || fb == nullptr) continue;
        for (const BackwardVariant& g : backward_variants(op)) {
          const bool rows_variant = g.grads == "all" && g.layout == "expanded";
          const double of_rows = (fb->warm_seconds - f->warm_seconds) / f->warm_seconds;
          const auto interleaved = fb->fields.find(backward_field(g.grads, g.layout));
          const bool have = interleaved != fb->fields.end();
          if (!have && !rows_variant) continue;  // not timed in this run (CUDA)
          const double forwards = have ? interleaved->second : of_rows;
          const std::string needing =
              g.grads == "all" ? "every input needs a gradient" : "only intensity needs a gradient";
          const std::string layout = g.layout == "expanded" ? "`.sum().backward()`"
                                     : g.layout == "contiguous"
                                         ? "a contiguous output gradient"
                                         : "a strided (transposed) output gradient";
          md << "| " << where << ": " << op << " backward (" << needing << ", " << layout << ") ≤ "
             << fmt(g.goal, g.goal == std::floor(g.goal) ? 0 : 1) << " forwards | "
             << fmt(forwards, 2) << " forwards"
             << (have ? interleaved_note(*fb, rows_variant ? fmt(of_rows, 2) : std::string())
                      : std::string())
             << " | " << (forwards <= g.goal ? "yes" : "**no**") << " |\n";
        }
      }
      target("absorption forward ≥ 5× aten_composite", "detector_absorption", "forward",
             "aten_composite", 5, false);
      target("absorption forward+backward ≥ 5× aten_composite", "detector_absorption",
             "forward_backward", "aten_composite", 5, false);
      for (const Row& r : rows) {
        if (main_row(r) && r.ran() && r.impl == "fused" && r.size == 512 && r.dtype == "float32" &&
            r.device == device && (device != "cpu" || r.threads == threads)) {
          any_target = true;
          const double ratio = r.cold_seconds / r.warm_seconds;
          md << "| " << where << ": " << r.op << " " << r.pass << " cold ≤ 2× warm | "
             << fmt(ratio, 2) << "× | " << (ratio <= 2.0 ? "yes" : "**no**") << " |\n";
        }
      }
    }
  }
  if (!any_target) md << "| (no size-512 float32 rows in this run) | | |\n";

  write_cuda_goals_section(md, rows);
  if (scale.requested) write_scale_section(md, rows, scale);

  // Where the time goes, from this run's numbers.
  md << "\n## Interpretation\n\n";
  for (const Row& r : rows) {
    if (!main_row(r) || !r.ran() || r.impl != "fused" || r.pass != "forward") continue;
    const double ns = 1e9 / r.points_per_second;
    const std::string where = r.device + " " + r.dtype + " size " + std::to_string(r.size) +
                              (r.device == "cpu" ? ", " + std::to_string(r.threads) +
                                                       (r.threads == 1 ? " thread" : " threads")
                                                 : "");
    if (r.op == "tricubic_interp") {
      // grid_sample on the same threads, given its fair share of them
      const Row* gs =
          find(rows, r.op, "grid_sample_split", "forward", r.size, r.dtype, r.device, r.threads);
      if (gs == nullptr) {
        gs = find(rows, r.op, "grid_sample_trilinear", "forward", r.size, r.dtype, r.device,
                  r.threads);
      }
      md << "* " << where << ": tricubic forward takes " << fmt(ns, 2)
         << " ns per point (64 gathered taps and ~100 flops each, i.e. " << fmt(64 / ns, 2)
         << " taps/ns)";
      if (gs) {
        const double gns = 1e9 / gs->points_per_second;
        md << "; " << gs->impl << " reads 8 taps in " << fmt(gns, 2) << " ns (" << fmt(8 / gns, 2)
           << " taps/ns), so per tap the fused op runs at " << fmt((64 / ns) / (8 / gns), 2)
           << "× its rate";
      }
      md << ".\n";
    } else {
      md << "* " << where << ": absorption forward takes " << fmt(ns, 2)
         << " ns per pixel (one expm1, a norm and a dot product per pixel).\n";
    }
  }
  md << "\nSee reports/README.md for the analysis of these figures.\n";
  std::ofstream(dir + "/perf_summary.md") << md.str();
}

}  // namespace nanobragg_bench
