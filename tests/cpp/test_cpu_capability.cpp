// The cpu_baseline_isa_<capability> CTest entries (tests/cpp/CMakeLists.txt)
// run the CPU parity and gradient tests with ATEN_CPU_CAPABILITY set. On a
// CPU that lacks the capability asked for, a lower build runs instead (as
// ATen caps it); this test then prints the line the entry's
// SKIP_REGULAR_EXPRESSION matches, so that the entry is reported skipped,
// with the reason, not passed as if that build had run. On a CPU that has
// it, the build asked for must be the one that runs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <iostream>
#include <string>

#include "nanobragg_ops/ops.h"

namespace nanobragg_test {
namespace {

// A capability's place in ATen's order; -1 for a name this library does
// not build.
int rank_of(const std::string& name) {
  if (name == "default") return 0;
  if (name == "avx2") return 1;
  if (name == "avx512") return 2;
  return -1;
}

TEST(CpuCapability, TheBuildAskedForRuns) {
  const char* asked_env = std::getenv("ATEN_CPU_CAPABILITY");
  if (asked_env == nullptr) {
    GTEST_SKIP() << "ATEN_CPU_CAPABILITY is not set: nothing was asked for";
  }
  std::string asked = asked_env;
  std::transform(asked.begin(), asked.end(), asked.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (rank_of(asked) < 0) {
    GTEST_SKIP() << "ATEN_CPU_CAPABILITY=" << asked << " is not a capability this library builds";
  }
  const std::string runs = nanobragg_ops::cpu_capability();
  const std::string best = nanobragg_ops::best_cpu_capability();
  if (rank_of(asked) > rank_of(best)) {
    std::cout << "NANOBRAGG_CAPABILITY_UNAVAILABLE: ATEN_CPU_CAPABILITY=" << asked
              << " asked for, this CPU runs the " << runs << " build (its best: " << best << ")"
              << std::endl;
    GTEST_SKIP() << "the " << asked << " build cannot run on this CPU";
  }
  // The CTest entries ask only for capabilities that were built: one the
  // CPU has must run.
  EXPECT_EQ(runs, asked) << "best: " << best;
}

}  // namespace
}  // namespace nanobragg_test
