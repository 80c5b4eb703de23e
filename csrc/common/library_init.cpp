#include "common/library_init.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>

#include <string>

namespace nanobragg {

bool this_copy_registers() {
  static const bool registers = [] {
    const bool defined =
        c10::Dispatcher::singleton().findSchema({"nanobragg::tricubic_interp", ""}).has_value();
    if (defined) {
      Dl_info info{};
      const std::string file =
          dladdr(reinterpret_cast<void*>(&this_copy_registers), &info) != 0 && info.dli_fname
              ? info.dli_fname
              : "this copy";
      TORCH_WARN("nanobragg_ops: the nanobragg operators are already registered by a copy of ",
                 "the library loaded earlier; ", file,
                 " registers nothing, and the earlier copy's operators stay in use");
    }
    return !defined;
  }();
  return registers;
}

}  // namespace nanobragg

// For the Python package, which asks each copy in the process which one
// serves the operators (torch_extension/nanobragg_ops/__init__.py).
extern "C" __attribute__((visibility("default"))) int nanobragg_ops_serves_operators() {
  return nanobragg::this_copy_registers() ? 1 : 0;
}
