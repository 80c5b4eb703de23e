// The bench report of SPEC section 4: perf_results.json, env.json and
// perf_summary.md in one folder per run.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace nanobragg_bench {

struct Row {
  std::string op, impl, pass, device, dtype;
  int64_t size = 0, points = 0;
  double cold_seconds = 0, warm_seconds = 0, warm_std_seconds = 0;
  int64_t repeats = 0;
  double calls_per_second = 0, points_per_second = 0;
  int64_t peak_bytes = 0;   // peak extra memory of one call (memory.h)
  std::string peak_method;  // how peak_bytes was measured (memory.h)
  bool scale = false;       // a row of the --scale section
  std::map<std::string, double> speedup_vs;  // impl -> its warm time / ours
};

// The --scale section: tricubic forward+backward at size² × per_pixel
// points, where aten_composite runs only if its estimated peak fits.
struct ScaleInfo {
  bool requested = false;
  int64_t size = 0, per_pixel = 0, points = 0, element_size = 0;
  int64_t grid_numel = 0;                      // structure-factor grid
  int64_t formula_bytes = 0;                   // tricubic_aten_composite_peak_bytes
  int64_t probe_points = 0, probe_peak_bytes = 0;  // aten_composite measured at fewer points
  int64_t extrapolated_bytes = 0;              // the probe's bytes per point × points
  int64_t memory_bytes = 0, limit_bytes = 0;   // RAM (or GPU memory) and the share allowed
  bool aten_composite_ran = false;
};

// Fills speedup_vs for rows that share op, pass, device, dtype and size.
void compute_speedups(std::vector<Row>& rows);

struct EnvInfo {
  std::string json;  // env.json's content
  std::string summary_line;
};
EnvInfo collect_env(const std::string& source_dir, const std::string& build_type);

void write_report(const std::string& dir, const std::vector<Row>& rows, const EnvInfo& env,
                  const std::string& command_line, const ScaleInfo& scale);

}  // namespace nanobragg_bench
