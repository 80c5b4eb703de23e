# Locates LibTorch and decides whether the CUDA kernels are built.
#
# Defines:
#   NANOBRAGG_WITH_CUDA   ON when the CUDA kernels are compiled
#   nanobragg::torch      an INTERFACE target to link against
#   nanobragg::parallel   OpenMP when torch's at::parallel_for is OpenMP-based
#
# LibTorch is found the way LibTorch's own guides say, first:
#   1. Torch_DIR (CMake variable or environment variable): the folder of
#      TorchConfig.cmake;
#   2. Torch_ROOT, then CMAKE_PREFIX_PATH (CMake variable, then environment
#      variable): a prefix holding share/cmake/Torch/TorchConfig.cmake (an
#      unpacked LibTorch download) or Torch/TorchConfig.cmake (the torch
#      wheel's torch.utils.cmake_prefix_path);
# and only when none of them is given, from the torch Python wheel: its cmake
# prefix is asked from the Python interpreter (Python3_EXECUTABLE, e.g.
# .venv/bin/python). Torch's config file is located here, not run: a
# CPU-only build against a CUDA build of torch must not run it (below).

# The share/cmake-style prefix above a folder holding TorchConfig.cmake.
function(_nanobragg_prefix_of_torch_dir dir out_var)
  get_filename_component(_prefix "${dir}/.." ABSOLUTE)
  set(${out_var} "${_prefix}" PARENT_SCOPE)
endfunction()

function(_nanobragg_torch_prefix out_var)
  foreach(_dir IN ITEMS "${Torch_DIR}" "$ENV{Torch_DIR}")
    if(_dir)
      if(NOT EXISTS "${_dir}/TorchConfig.cmake")
        message(FATAL_ERROR "nanobragg_ops: Torch_DIR=${_dir} holds no TorchConfig.cmake")
      endif()
      _nanobragg_prefix_of_torch_dir("${_dir}" _prefix)
      set(${out_var} "${_prefix}" PARENT_SCOPE)
      return()
    endif()
  endforeach()
  file(TO_CMAKE_PATH "$ENV{Torch_ROOT}" _env_root)
  file(TO_CMAKE_PATH "$ENV{CMAKE_PREFIX_PATH}" _env_prefixes)
  set(_given ${Torch_ROOT} ${_env_root} ${CMAKE_PREFIX_PATH} ${_env_prefixes})
  foreach(_p IN LISTS _given)
    foreach(_sub IN ITEMS "share/cmake/Torch" "Torch" "lib/cmake/Torch" ".")
      if(EXISTS "${_p}/${_sub}/TorchConfig.cmake")
        get_filename_component(_dir "${_p}/${_sub}" ABSOLUTE)
        _nanobragg_prefix_of_torch_dir("${_dir}" _prefix)
        message(STATUS "nanobragg_ops: LibTorch from ${_dir} (given prefix ${_p})")
        set(${out_var} "${_prefix}" PARENT_SCOPE)
        return()
      endif()
    endforeach()
  endforeach()
  if(_given)
    message(STATUS "nanobragg_ops: no TorchConfig.cmake under the given prefixes "
                   "(${_given}); asking Python for torch")
  endif()
  find_package(Python3 COMPONENTS Interpreter REQUIRED)
  execute_process(
    COMMAND "${Python3_EXECUTABLE}" -c
            "import torch.utils; print(torch.utils.cmake_prefix_path)"
    OUTPUT_VARIABLE _prefix OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "nanobragg_ops: cannot import torch with "
            "${Python3_EXECUTABLE}; install the pinned torch (requirements.txt), "
            "or point CMAKE_PREFIX_PATH at LibTorch (an unpacked LibTorch, or "
            "python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)'), "
            "or pass -DTorch_DIR=<torch>/share/cmake/Torch")
  endif()
  set(${out_var} "${_prefix}" PARENT_SCOPE)
endfunction()

macro(nanobragg_find_torch)
  _nanobragg_torch_prefix(_torch_cmake_prefix)
  set(_torch_root "${_torch_cmake_prefix}/../..")
  get_filename_component(_torch_root "${_torch_root}" ABSOLUTE)

  # Was this torch built with CUDA? Its Caffe2Config then insists on a CUDA
  # toolkit in find_package(Torch).
  file(STRINGS "${_torch_cmake_prefix}/Caffe2/Caffe2Config.cmake" _cuda_line
       REGEX "set\\(CAFFE2_USE_CUDA ON\\)")
  set(_torch_has_cuda OFF)
  if(_cuda_line)
    set(_torch_has_cuda ON)
  endif()

  include(CheckLanguage)
  check_language(CUDA)
  string(TOUPPER "${NANOBRAGG_CUDA}" _want)
  if(_want STREQUAL "ON")
    if(NOT _torch_has_cuda OR NOT CMAKE_CUDA_COMPILER)
      message(FATAL_ERROR "nanobragg_ops: NANOBRAGG_CUDA=ON needs a CUDA build "
              "of torch (found: ${_torch_has_cuda}) and nvcc (found: "
              "'${CMAKE_CUDA_COMPILER}')")
    endif()
    set(NANOBRAGG_WITH_CUDA ON)
  elseif(_want STREQUAL "OFF")
    set(NANOBRAGG_WITH_CUDA OFF)
  elseif(_want STREQUAL "AUTO")
    if(_torch_has_cuda AND CMAKE_CUDA_COMPILER)
      set(NANOBRAGG_WITH_CUDA ON)
    else()
      set(NANOBRAGG_WITH_CUDA OFF)
    endif()
  else()
    message(FATAL_ERROR "NANOBRAGG_CUDA must be AUTO, ON or OFF, got '${NANOBRAGG_CUDA}'")
  endif()

  add_library(nanobragg_torch INTERFACE)
  add_library(nanobragg::torch ALIAS nanobragg_torch)
  if(NANOBRAGG_WITH_CUDA OR NOT _torch_has_cuda)
    if(NANOBRAGG_WITH_CUDA)
      # torch's CMake ignores CMAKE_CUDA_ARCHITECTURES and, with no GPU to
      # detect, would pick an arch list that nvcc 13 rejects (compute_50).
      if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
        set(ENV{TORCH_CUDA_ARCH_LIST} "8.0;9.0+PTX")
      endif()
      set(TORCH_CUDA_ARCH_LIST "$ENV{TORCH_CUDA_ARCH_LIST}")
      set(CMAKE_CUDA_ARCHITECTURES OFF)  # torch adds -gencode itself
      enable_language(CUDA)
      set(CMAKE_CUDA_STANDARD 17)
      set(CMAKE_CUDA_STANDARD_REQUIRED ON)
    endif()
    list(APPEND CMAKE_PREFIX_PATH "${_torch_cmake_prefix}")
    find_package(Torch REQUIRED)
    target_link_libraries(nanobragg_torch INTERFACE ${TORCH_LIBRARIES})
  else()
    # A CPU-only build against a CUDA build of torch, without nvcc: torch's
    # own package would fail looking for the toolkit, and none of it is
    # needed, so import just the CPU libraries and headers.
    # (Not cached: a build directory reconfigured against another torch, as
    # gpu_check.sh --dry-run does with a new temporary Python each run, must
    # not keep the first one's paths.)
    unset(_torch_cpu_lib CACHE)
    unset(_c10_lib CACHE)
    find_library(_torch_cpu_lib torch_cpu PATHS "${_torch_root}/lib" NO_DEFAULT_PATH REQUIRED)
    find_library(_c10_lib c10 PATHS "${_torch_root}/lib" NO_DEFAULT_PATH REQUIRED)
    target_include_directories(nanobragg_torch SYSTEM INTERFACE
      "${_torch_root}/include"
      "${_torch_root}/include/torch/csrc/api/include")
    target_link_libraries(nanobragg_torch INTERFACE "${_torch_cpu_lib}" "${_c10_lib}")
    message(STATUS "nanobragg_ops: CPU-only import of torch from ${_torch_root}")
  endif()
  set(NANOBRAGG_TORCH_ROOT "${_torch_root}")

  # The C++ runtime: the shared libstdc++ that torch loads, first on our link
  # lines. Where a static-only libstdc++.a comes first among the link
  # directories (seen on a GPU image: nvcc reported a g++ tree holding only
  # the archive among CUDA's implicit link directories), the library got a
  # private copy of the runtime beside torch's, and every operator error
  # message crashed Python. A shared library ahead of the objects defines the
  # runtime's symbols for all that follows, so no member of an archive is
  # pulled in; elsewhere it is the library the link takes anyway. The test
  # cxx_runtime_is_shared checks the result.
  if(CMAKE_SYSTEM_NAME STREQUAL "Linux" AND CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang"
     AND NOT CMAKE_CXX_FLAGS MATCHES "stdlib=libc\\+\\+")
    # The one the loader gives torch (ldd of libc10.so), else the system's.
    set(_stdcxx "")
    execute_process(COMMAND ldd "${_torch_root}/lib/libc10.so" OUTPUT_VARIABLE _ldd
                    ERROR_QUIET RESULT_VARIABLE _ldd_rc)
    if(_ldd_rc EQUAL 0 AND _ldd MATCHES "libstdc\\+\\+\\.so\\.6 => ([^ \t\n]+)")
      set(_stdcxx "${CMAKE_MATCH_1}")
    endif()
    if(NOT IS_ABSOLUTE "${_stdcxx}" OR NOT EXISTS "${_stdcxx}")
      unset(_stdcxx_found CACHE)
      find_library(_stdcxx_found NAMES libstdc++.so.6 NO_CMAKE_ENVIRONMENT_PATH
                   NO_SYSTEM_ENVIRONMENT_PATH)
      set(_stdcxx "${_stdcxx_found}")
    endif()
    if(IS_ABSOLUTE "${_stdcxx}" AND EXISTS "${_stdcxx}")
      # (--push-state: GNU ld, gold and lld.)
      target_link_options(nanobragg_torch INTERFACE
        "SHELL:-Wl,--push-state,--no-as-needed \"${_stdcxx}\" -Wl,--pop-state")
      set(NANOBRAGG_SHARED_CXX_RUNTIME "${_stdcxx}")
      message(STATUS "nanobragg_ops: C++ runtime ${_stdcxx}")
    endif()
  endif()

  # at::parallel_for is inline: with torch's OpenMP backend (the pip wheels')
  # it is an `omp parallel` region compiled into our own code, so without
  # OpenMP here every CPU kernel would run on one thread. At run time
  # libgomp.so.1 is the copy torch loaded (one thread pool, and
  # torch.set_num_threads applies).
  add_library(nanobragg_parallel INTERFACE)
  add_library(nanobragg::parallel ALIAS nanobragg_parallel)
  file(STRINGS "${_torch_root}/include/ATen/Config.h" _at_openmp
       REGEX "^#define AT_PARALLEL_OPENMP 1")
  if(_at_openmp AND CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    find_package(OpenMP REQUIRED COMPONENTS CXX)
    target_link_libraries(nanobragg_parallel INTERFACE OpenMP::OpenMP_CXX)
  elseif(_at_openmp)
    # Another compiler's OpenMP runtime (clang's libomp) would be a second
    # thread pool beside torch's libgomp; such builds (the fuzzer's) run
    # the CPU kernels serially instead.
    message(STATUS "nanobragg_ops: ${CMAKE_CXX_COMPILER_ID} build: CPU kernels run on one thread")
  endif()
  if(NOT Torch_VERSION)  # the CPU-only import did not run torch's package
    file(STRINGS "${_torch_cmake_prefix}/Torch/TorchConfigVersion.cmake" _v
         REGEX "set\\(PACKAGE_VERSION \"[^\"]+\"\\)")
    string(REGEX REPLACE ".*\"([^\"]+)\".*" "\\1" Torch_VERSION "${_v}")
  endif()
endmacro()
