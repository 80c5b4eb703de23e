// Peak extra memory of one bench case (docs/CONTRACT.md §5's peak_bytes). On
// CPU each case is measured in a child process of its own so that no other
// case's allocations or freed-but-resident pages are charged to it or hide
// it; on CUDA in the bench's own process, from the caching allocator's count
// of the bytes it hands out (which other cases' cached blocks do not change).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace nanobragg_bench {

struct Peak {
  int64_t bytes = 0;
  // How it was measured: "rss_hwm" (CPU: VmHWM after the call minus VmRSS
  // before it, the high-water mark reset just before the call),
  // "rss_hwm_not_reset" (the same where /proc/self/clear_refs refused the
  // reset: an upper bound, since an earlier peak may be counted), or
  // "cuda_allocator" (the caching allocator's peak minus its level before).
  std::string method;
};

// The peak extra memory of one call of `call` on `device` (in the CPU's memory
// child, or in the bench itself on CUDA).
Peak measure_peak(const std::function<void()>& call, const std::string& device);

// In the parent: runs this executable (/proc/self/exe) with `args` plus
// `--peak-out FILE`, waits, and returns what the child wrote there with
// write_peak. posix_spawn, not fork: the parent already runs torch's threads.
// Throws std::runtime_error if the child fails.
Peak peak_in_child(const std::vector<std::string>& args);

void write_peak(const std::string& path, const Peak& peak);

// Physical memory of this machine.
int64_t physical_memory_bytes();

// On CUDA: synchronises and hands the caching allocator's unused blocks back
// to the driver, so that a memory child (another process) can have them; the
// parent would otherwise keep what its largest case left cached. No-op on CPU.
void release_cached_memory(const std::string& device);

// What a case may plan on: on CUDA, device 0's free memory once the cache is
// released (what a memory child can get, less its own context and inputs);
// on CPU, physical memory.
int64_t available_memory_bytes(const std::string& device);

}  // namespace nanobragg_bench
