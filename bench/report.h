// The bench report of docs/CONTRACT.md §5: perf_results.json, env.json and
// perf_summary.md in one folder per run.
#pragma once

#include <cstdint>
#include <exception>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace nanobragg_bench {

// A goal of the GPU issue (cuda_goals.h), with what was measured for it.
struct Goal {
  std::string name;  // e.g. "tricubic forward throughput"
  std::string unit;  // of value and target, e.g. "G lookups/s"
  double value = 0, target = 0;
  bool at_most = false;  // met when value <= target; else when value >= target
  bool met() const { return at_most ? value <= target : value >= target; }
};

struct Row {
  std::string op, impl, pass, device, dtype;
  int64_t size = 0, points = 0;
  int64_t threads = 1;  // CPU threads the case ran on (at::set_num_threads)
  double cold_seconds = 0, warm_seconds = 0, warm_std_seconds = 0;
  int64_t repeats = 0;
  double calls_per_second = 0, points_per_second = 0;
  int64_t peak_bytes = 0;   // peak extra memory of one call (memory.h)
  std::string peak_method;  // how peak_bytes was measured (memory.h), or "estimated"
  bool scale = false;       // a row of the --scale section
  std::map<std::string, double> speedup_vs;  // impl -> its warm time / ours
  // A case not run: why (its estimated memory did not fit); peak_bytes is
  // then that estimate, and there are no times.
  std::string not_run;
  // A case that failed while it was checked, timed or measured (an
  // out-of-memory error, a failed memory child): what failed.
  std::string error;
  // A baseline's result against the fused op's, checked before it was
  // timed (main.cpp, check_against_fused): the largest |difference| over
  // the largest |fused value|, in float64, the worst of the compared
  // tensors; negative where nothing was checked (the fused rows).
  double check_rel_err = -1, check_tolerance = 0;
  std::string check_what;  // what was compared
  bool check_failed() const { return check_rel_err >= 0 && !(check_rel_err <= check_tolerance); }
  bool ran() const { return not_run.empty() && repeats > 0; }  // has times
  // Its peak memory could not be measured (a failed memory child, or on CUDA
  // a failed measuring call).
  bool peak_failed() const {
    return peak_method == "child_failed" || peak_method == "measure_failed";
  }
  // The rows of the GPU goals (cuda_goals.h): the goal a row measures, if
  // any, and named figures of its own (bandwidths, the in-range fraction).
  bool cuda_goal = false;
  std::optional<Goal> goal;
  std::map<std::string, double> fields;
};

// The --scale section: tricubic forward+backward at size² × per_pixel
// points, where aten_composite runs only if its estimated peak fits.
struct ScaleInfo {
  bool requested = false;
  int64_t size = 0, per_pixel = 0, points = 0, element_size = 0;
  int64_t grid_numel = 0;                          // structure-factor grid
  int64_t formula_bytes = 0;                       // tricubic_aten_composite_peak_bytes
  int64_t probe_points = 0, probe_peak_bytes = 0;  // aten_composite measured at fewer points
  int64_t extrapolated_bytes = 0;                  // the probe's bytes per point × points
  int64_t memory_bytes = 0, limit_bytes = 0;  // RAM (on CUDA free GPU memory) and the share allowed
  bool aten_composite_ran = false;
};

// Fills a row's warm figures from the seconds of its timed calls: the
// median, the standard deviation, repeats, calls and points per second.
void set_warm_times(Row& r, const std::vector<double>& seconds);

// An exception's message, without c10's backtrace: for rows' errors.
std::string message_of(const std::exception& e);

// The backward variants the bench times interleaved with forwards, and
// their goals in forwards (issue 17): tricubic with every input needing a
// gradient and `.sum().backward()` (≤ 2); absorption with every input (≤ 3)
// or the intensity alone (≤ 1.5) needing one, for each layout of the output
// gradient ("expanded" from `.sum()`, "contiguous", "strided": transposed).
struct BackwardVariant {
  std::string grads, layout;
  double goal;
};
const std::vector<BackwardVariant>& backward_variants(const std::string& op);

// The forward_backward row's field that holds the backward's cost in
// forwards, timed interleaved with forwards, for the inputs needing a
// gradient ("all", "intensity") and the output gradient's layout
// ("expanded", "contiguous", "strided"): backward_in_forwards_interleaved
// for {all, expanded}, else that name with _<grads>_<layout> appended.
std::string backward_field(const std::string& grads, const std::string& layout);

// The fused row's field that holds its speed-up over a baseline `impl`
// timed interleaved with it: speedup_vs_<impl>_interleaved.
std::string interleaved_speedup_field(const std::string& impl);

// Fills speedup_vs for rows that ran and share op, pass, device, dtype,
// size and section (main, --scale, GPU goals).
void compute_speedups(std::vector<Row>& rows);

struct EnvInfo {
  std::string json;  // env.json's content
  std::string summary_line;
};
EnvInfo collect_env(const std::string& source_dir, const std::string& build_type);

// perf_results.json, env.json and perf_summary.md into dir. `unfinished`: a
// note for a report written before the run ended (empty: the run's own).
void write_report(const std::string& dir, const std::vector<Row>& rows, const EnvInfo& env,
                  const std::string& command_line, const ScaleInfo& scale,
                  const std::string& unfinished = "");

}  // namespace nanobragg_bench
