#include "common/library_init.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>

#include <string>

namespace nanobragg {
namespace {

// The file this copy of the library was loaded from ("" if unknown).
const std::string& this_copy_file() {
  static const std::string file = [] {
    Dl_info info{};
    return dladdr(reinterpret_cast<void*>(&this_copy_registers), &info) != 0 && info.dli_fname
               ? std::string(info.dli_fname)
               : std::string();
  }();
  return file;
}

}  // namespace

bool this_copy_registers() {
  static const bool registers = [] {
    const bool defined =
        c10::Dispatcher::singleton().findSchema({"nanobragg::tricubic_interp", ""}).has_value();
    if (defined) {
      const std::string& file = this_copy_file();
      // (Whatever the earlier copy's version and build: where they differ,
      // for instance in CUDA kernels, load only the copy wanted.)
      TORCH_WARN("nanobragg_ops: the nanobragg operators are already registered by a copy of ",
                 "the library loaded earlier; ", file.empty() ? "this copy" : file,
                 " registers nothing, and the earlier copy's operators stay in use");
    }
    return !defined;
  }();
  return registers;
}

}  // namespace nanobragg

// For the Python package, which asks the copies in the process which file
// serves the operators (torch_extension/nanobragg_ops/__init__.py): this
// copy's file if it registered them, else null. (A lookup through a library
// that links this one finds this function too; the answer names this copy's
// file, not the library it was found through.)
extern "C" __attribute__((visibility("default"))) const char* nanobragg_ops_serving_file() {
  return nanobragg::this_copy_registers() ? nanobragg::this_copy_file().c_str() : nullptr;
}
