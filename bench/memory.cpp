#include "memory.h"

#include <ATen/detail/CUDAHooksInterface.h>

#include <malloc.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>

#ifdef NANOBRAGG_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>
#endif

extern char** environ;

namespace nanobragg_bench {
namespace {

int64_t proc_status_kb(const char* field) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind(field, 0) == 0) return std::stoll(line.substr(std::strlen(field)));
  }
  throw std::runtime_error(std::string("no ") + field + " in /proc/self/status");
}

// Writing 5 to clear_refs resets VmHWM to the current VmRSS (Linux >= 4.0).
bool reset_hwm() {
  std::ofstream f("/proc/self/clear_refs");
  f << "5";
  f.flush();
  return f.good();
}

}  // namespace

Peak measure_peak(const std::function<void()>& call, const std::string& device) {
  Peak p;
#ifdef NANOBRAGG_WITH_CUDA
  if (device == "cuda") {
    using namespace c10::cuda::CUDACachingAllocator;
    at::detail::getCUDAHooks().deviceSynchronize(0);
    resetPeakStats(0);
    const int64_t before = getDeviceStats(0).allocated_bytes[0].current;  // [0]: all pools
    call();
    at::detail::getCUDAHooks().deviceSynchronize(0);
    p.bytes = getDeviceStats(0).allocated_bytes[0].peak - before;
    p.method = "cuda_allocator";
    return p;
  }
#endif
  (void)device;
  // Hand freed heap pages back to the kernel first: pages freed while the
  // inputs were built but still resident would otherwise absorb part of the
  // call's allocations and hide them from the resident-set growth.
  malloc_trim(0);
  p.method = reset_hwm() ? "rss_hwm" : "rss_hwm_not_reset";
  const int64_t before = proc_status_kb("VmRSS:");
  call();
  p.bytes = std::max<int64_t>(0, proc_status_kb("VmHWM:") - before) * 1024;
  return p;
}

void write_peak(const std::string& path, const Peak& peak) {
  nlohmann::json j;
  j["peak_bytes"] = peak.bytes;
  j["method"] = peak.method;
  std::ofstream(path) << j.dump() << "\n";
}

Peak peak_in_child(const std::vector<std::string>& args) {
  const std::filesystem::path out = std::filesystem::temp_directory_path() /
                                    ("nanobragg_bench_peak_" + std::to_string(getpid()) + ".json");
  std::filesystem::remove(out);
  std::vector<std::string> argv_s = {"/proc/self/exe"};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  argv_s.push_back("--peak-out");
  argv_s.push_back(out.string());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);

  std::string what;
  for (const auto& a : args) what += " " + a;
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, "/proc/self/exe", nullptr, nullptr, argv.data(), environ);
  if (rc != 0)
    throw std::runtime_error("cannot start the memory child:" + what + ": " + std::strerror(rc));
  int status = 0;
  while (waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) throw std::runtime_error("waitpid failed for the memory child:" + what);
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    throw std::runtime_error("the memory child failed (" +
                             (WIFSIGNALED(status) ? "signal " + std::to_string(WTERMSIG(status))
                                                  : "exit " + std::to_string(WEXITSTATUS(status))) +
                             "):" + what);
  }
  std::ifstream f(out);
  if (!f) throw std::runtime_error("the memory child wrote no result:" + what);
  const nlohmann::json j = nlohmann::json::parse(f);
  std::filesystem::remove(out);
  return Peak{j.at("peak_bytes").get<int64_t>(), j.at("method").get<std::string>()};
}

int64_t physical_memory_bytes() {
  return static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGE_SIZE);
}

void release_cached_memory(const std::string& device) {
#ifdef NANOBRAGG_WITH_CUDA
  if (device == "cuda") {
    at::detail::getCUDAHooks().deviceSynchronize(0);
    c10::cuda::CUDACachingAllocator::emptyCache();
  }
#endif
  (void)device;
}

int64_t available_memory_bytes(const std::string& device) {
#ifdef NANOBRAGG_WITH_CUDA
  if (device == "cuda") {
    release_cached_memory(device);
    size_t free_bytes = 0, total_bytes = 0;
    C10_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
    return static_cast<int64_t>(free_bytes);
  }
#endif
  (void)device;
  return physical_memory_bytes();
}

}  // namespace nanobragg_bench
