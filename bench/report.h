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
  std::map<std::string, double> speedup_vs;  // impl -> its warm time / ours
};

// Fills speedup_vs for rows that share op, pass, device, dtype and size.
void compute_speedups(std::vector<Row>& rows);

struct EnvInfo {
  std::string json;  // env.json's content
  std::string summary_line;
};
EnvInfo collect_env(const std::string& source_dir, const std::string& build_type);

void write_report(const std::string& dir, const std::vector<Row>& rows, const EnvInfo& env,
                  const std::string& command_line);

}  // namespace nanobragg_bench
