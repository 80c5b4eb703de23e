// Registration that survives a second copy of the library in one process.
//
// torch aborts the process (an exception thrown during dlopen) when a second
// TORCH_LIBRARY(nanobragg, ...) runs, which is what loading two files of this
// library does: a wheel's copy and a build directory's, say, or
// torch.ops.load_library of a copy after `import nanobragg_ops`. With these
// macros in place of TORCH_LIBRARY / TORCH_LIBRARY_IMPL, a copy that finds
// the operators already defined when it is loaded registers nothing and
// warns once; the copy loaded first keeps serving every call.
#pragma once

#include <torch/library.h>

#include <optional>

namespace nanobragg {

// False when the nanobragg operators were already defined before this copy
// of the library registered anything: decided once, at the first call
// (the first registration of this copy), and warned about then. Hidden, so
// that one copy never calls another's.
__attribute__((visibility("hidden"))) bool this_copy_registers();

// torch::detail::TorchLibraryInit, skipped when !this_copy_registers().
// Hidden too: its inline members would otherwise be exported, and a copy
// loaded after one that the host links would run the host's copy's
// constructor, which asks the host's copy whether to register.
class __attribute__((visibility("hidden"))) LibraryInit {
 public:
  LibraryInit(torch::Library::Kind kind, void (*init)(torch::Library&),
              std::optional<c10::DispatchKey> key, const char* file, uint32_t line) {
    if (!this_copy_registers()) return;
    library_.emplace(kind, "nanobragg", key, file, line);
    init(*library_);
  }

 private:
  std::optional<torch::Library> library_;  // alive as long as the registrations
};

}  // namespace nanobragg

// TORCH_LIBRARY(nanobragg, m): the one definition of the namespace.
#define NANOBRAGG_LIBRARY(m)                                                           \
  static void nanobragg_library_init(torch::Library&);                                 \
  static const nanobragg::LibraryInit nanobragg_library_static_init(                   \
      torch::Library::DEF, &nanobragg_library_init, std::nullopt, __FILE__, __LINE__); \
  void nanobragg_library_init(torch::Library& m)

// TORCH_LIBRARY_IMPL(nanobragg, key, m). (C10_UID is __COUNTER__: expanded
// once, as an argument, so that the three names below share it.)
#define NANOBRAGG_LIBRARY_IMPL(key, m) NANOBRAGG_LIBRARY_IMPL_UID(key, m, C10_UID)
#define NANOBRAGG_LIBRARY_IMPL_UID(key, m, uid)                                                   \
  static void C10_CONCATENATE(nanobragg_library_impl_##key##_, uid)(torch::Library&);             \
  static const nanobragg::LibraryInit C10_CONCATENATE(nanobragg_library_impl_init_##key##_, uid)( \
      torch::Library::IMPL, &C10_CONCATENATE(nanobragg_library_impl_##key##_, uid),               \
      std::make_optional(c10::DispatchKey::key), __FILE__, __LINE__);                             \
  void C10_CONCATENATE(nanobragg_library_impl_##key##_, uid)(torch::Library & m)
