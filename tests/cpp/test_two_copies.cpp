// A C++ host that loads a second copy of the library (another file, a
// plugin's say) next to the one it links: torch would abort the process on
// the namespace's second definition; the copy registers nothing, warns,
// naming its file, and the linked copy keeps serving the operators.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "nanobragg_ops/ops.h"

namespace nanobragg_test {
namespace {

namespace fs = std::filesystem;

// Every warning raised on this thread while it is alive.
class WarningsSeen : public c10::WarningHandler {
 public:
  void process(const c10::Warning& warning) override { messages.push_back(warning.msg()); }
  std::vector<std::string> messages;
};

using ServingFileFn = const char* (*)();

// Every kernel registered for every nanobragg operator, with where it was
// registered from: a second copy that registered anything changes it.
std::string registrations() {
  std::string all;
  for (const char* op : {"tricubic_interp", "tricubic_interp_backward",
                         "tricubic_interp_double_backward", "detector_absorption",
                         "detector_absorption_backward", "detector_absorption_double_backward"}) {
    const auto handle =
        c10::Dispatcher::singleton().findSchema({std::string("nanobragg::") + op, ""});
    all += handle ? handle->dumpState() : std::string("missing ") + op;
  }
  return all;
}

TEST(TwoCopies, ASecondCopyRegistersNothingAndTheFirstKeepsServing) {
  // The file of the copy this binary links, found from one of its functions.
  Dl_info info{};
  ASSERT_NE(dladdr(reinterpret_cast<void*>(&nanobragg_ops::tricubic_interp), &info), 0);
  const fs::path linked = fs::canonical(info.dli_fname);
  const fs::path copy =
      fs::temp_directory_path() / ("nanobragg_ops_second_copy_" + std::to_string(getpid()) + ".so");
  fs::copy_file(linked, copy, fs::copy_options::overwrite_existing);

  const std::string before = registrations();
  WarningsSeen seen;
  void* handle = nullptr;
  {
    const c10::WarningUtils::WarningHandlerGuard guard(&seen);
    handle = dlopen(copy.c_str(), RTLD_NOW | RTLD_LOCAL);  // its static registrations run here
  }
  fs::remove(copy);  // (the loaded copy stays mapped; it is never closed)
  ASSERT_NE(handle, nullptr) << dlerror();

  EXPECT_EQ(registrations(), before);  // nothing registered again, nothing replaced
  ASSERT_EQ(seen.messages.size(), 1u);
  EXPECT_NE(seen.messages[0].find("registers nothing"), std::string::npos) << seen.messages[0];
  EXPECT_NE(seen.messages[0].find(copy.string()), std::string::npos) << seen.messages[0];

  const auto copy_file =
      reinterpret_cast<ServingFileFn>(dlsym(handle, "nanobragg_ops_serving_file"));
  const auto linked_file =
      reinterpret_cast<ServingFileFn>(dlsym(RTLD_DEFAULT, "nanobragg_ops_serving_file"));
  ASSERT_NE(copy_file, nullptr);
  ASSERT_NE(linked_file, nullptr);
  EXPECT_EQ(copy_file(), nullptr);  // the copy serves nothing
  ASSERT_NE(linked_file(), nullptr);
  EXPECT_EQ(fs::canonical(linked_file()), linked);

  // The operators still answer: a linear grid (36 h + 6 k + l) is
  // interpolated exactly.
  const at::Tensor grid = at::arange(216, at::kDouble).view({6, 6, 6});
  const at::Tensor hkl = at::tensor({2.5, 2.0, 2.25}, at::kDouble).view({1, 3});
  const at::Tensor F = nanobragg_ops::tricubic_interp(grid, hkl, {0, 0, 0});
  EXPECT_NEAR(F.item<double>(), 36 * 2.5 + 6 * 2.0 + 2.25, 1e-12);
}

}  // namespace
}  // namespace nanobragg_test
