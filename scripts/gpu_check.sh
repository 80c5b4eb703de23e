#!/usr/bin/env bash
# The whole GPU check as one prepared command (issue 14), for a GPU machine
# that is lent for minutes and has no internet, no apt, no GoogleTest and no
# nlohmann/json:
#
#   scripts/gpu_check.sh --prepare   (here, with internet) fills gpu_deps/
#       (git-ignored, at most 64 MiB): GoogleTest sources, nlohmann/json
#       headers, the Python wheels the GPU image lacks (expecttest), and
#       gpu_deps/MANIFEST.txt.
#   scripts/gpu_check.sh             (on the GPU machine, from the repository
#       root, gpu_deps/ carried along) in at most 8 minutes, each stage under
#       its own `timeout` and all of them under one deadline, going on after a
#       failed stage: installs the carried wheels into a temporary directory
#       on PYTHONPATH; configures and builds the library, the GoogleTest
#       binary and the bench with CUDA for the local GPU's architecture only
#       in build-gpu/ (Ninja, every core, the vendored dependencies); runs the
#       CUDA GoogleTest cases; the bench on CUDA (both ops, 512² and 2048² × 9);
#       then the CUDA pytest cases (pytest-xdist, 4 workers) while
#       compute-sanitizer memcheck, racecheck and synccheck run a few small
#       CUDA cases; then the CPU pytest cases, and test_tricubic.py at the CPU
#       capabilities below the best (the GPU machine's compiler and CPU are not
#       the development machines').
#       The summary goes to $OUT if set, else to reports/gpu/<UTC stamp>/.
#   scripts/gpu_check.sh --dry-run   (any CPU machine, CI) the same stages with
#       CPU-only settings in build-gpu-dryrun/: the CUDA cases must all skip;
#       the bench runs on CPU at a tiny size; the summary goes to $OUT or
#       reports/gpu/dryrun-<UTC stamp>/.
#
# Output folder (at most 8 files, the device tool's limit): gpu_check_summary.md,
# perf_results.json, perf_summary.md, grid_gradient_profile.md (the grid
# gradient's kernels, atomic and deterministic), logs.tar.gz (every raw log), summary.json;
# while the check runs, stages_so_far.tsv (what comes back if it is stopped).
# Exits non-zero when any stage failed. Environment overrides:
#   GPU_CHECK_BUDGET_S     total wall-clock budget (GPU 455, dry run 1500)
#   GPU_CHECK_PYTEST_WORKERS  pytest-xdist workers on the GPU (default 4 when
#                          xdist is importable; 0 = no xdist)
#   GPU_CHECK_BENCH_ARGS   the bench's arguments after --device/--outdir
#   GPU_CHECK_CPU_PYTEST   0: leave out the CPU pytest stages (a rerun after a
#                          CUDA-only change; default 1)
#   PYTHON                 the interpreter (GPU: python3; dry run: a venv with only
#                          torch, pytest and their requirements, linked from .venv
#                          by scripts/gpu_image_python.py, as the GPU image has)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEPS="$ROOT/gpu_deps"
MAX_DEPS_BYTES=$((64 * 1024 * 1024))

usage() {
  sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

MODE=gpu
case "${1:-}" in
  "") ;;
  --prepare) MODE=prepare ;;
  --dry-run) MODE=dryrun ;;
  -h | --help) usage; exit 0 ;;
  *) echo "gpu_check.sh: unknown argument '$1' (--prepare, --dry-run or none)" >&2; exit 2 ;;
esac
if (($# > 1)); then
  echo "gpu_check.sh: one argument at most" >&2
  exit 2
fi

log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" >&2; }

# The checked-out revision, and " (with uncommitted changes$1)" after it when
# the tree differs from it; fails outside a git repository.
git_revision() {
  git rev-parse HEAD 2>/dev/null || return 1
  git diff --quiet HEAD || echo " (with uncommitted changes$1)"
}

# ---------------------------------------------------------------------------
# --prepare: the vendored dependencies, on a machine with apt and PyPI. All of
# it is made in gpu_deps.tmp/ and takes gpu_deps/'s place only when complete:
# a failed step leaves gpu_deps/ as it was.
prepare() {
  set -e
  local apt_missing=()
  [[ -f /usr/src/googletest/CMakeLists.txt ]] || apt_missing+=(googletest)
  [[ -f /usr/include/nlohmann/json.hpp ]] || apt_missing+=(nlohmann-json3-dev)
  if ((${#apt_missing[@]})); then
    log "installing ${apt_missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${apt_missing[@]}" >/dev/null
  fi

  local tmp="$DEPS.tmp"
  rm -rf "$tmp"
  mkdir -p "$tmp/nlohmann_json/include" "$tmp/wheels"
  # Timestamps kept: a second --prepare must not make builds recompile.
  cp -rL --preserve=timestamps /usr/src/googletest "$tmp/googletest"
  cp -rL --preserve=timestamps /usr/include/nlohmann "$tmp/nlohmann_json/include/nlohmann"

  # The wheels: every pin of requirements.txt that the GPU image lacks. Kept
  # between runs (no download when the file is there already).
  local wheels=(expecttest)
  if compgen -G "$DEPS/wheels/*.whl" >/dev/null; then cp -p "$DEPS"/wheels/*.whl "$tmp/wheels/"; fi
  local pip=(python3 -m pip)
  if [[ -x "$ROOT/.venv/bin/python" ]]; then pip=("$ROOT/.venv/bin/python" -m pip); fi
  local name pin wanted=()
  for name in "${wheels[@]}"; do
    pin="$(grep -E "^${name}==" requirements.txt | tr -d '[:space:]')"
    [[ -n "$pin" ]] || { log "requirements.txt pins no $name"; return 1; }
    wanted+=("${pin%%==*}-${pin##*==}-")
    if ! compgen -G "$tmp/wheels/${pin%%==*}-${pin##*==}-*.whl" >/dev/null; then
      log "downloading $pin (Python 3.12 wheel)"
      "${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 \
        -d "$tmp/wheels" "$pin"
    fi
  done
  # Only the wanted versions stay (an older pin's wheel goes).
  local whl keep w
  for whl in "$tmp"/wheels/*.whl; do
    keep=0
    for w in "${wanted[@]}"; do [[ "$(basename "$whl")" == "$w"* ]] && keep=1; done
    ((keep)) || rm -f "$whl"
  done

  # The GPU machine's copy of the tree has no .git: the revision here, and
  # the checksum of every file git tracks or would add, with which the check
  # there tells whether it runs this tree or a changed one.
  if git_revision " when --prepare ran" | paste -sd '' >"$tmp/SOURCE_REVISION"; then
    git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do if [[ -f $f ]]; then printf '%s\0' "$f"; fi; done |
      xargs -0 -r sha256sum >"$tmp/SOURCE_FILES.sha256"
  else
    echo "unknown (no git repository when --prepare ran)" >"$tmp/SOURCE_REVISION"
    : >"$tmp/SOURCE_FILES.sha256"
  fi

  # The manifest: what is there, which version, how big.
  local gtest_v json_v
  gtest_v="$(dpkg-query -W -f='${Version}' googletest 2>/dev/null || echo unknown)"
  json_v="$(dpkg-query -W -f='${Version}' nlohmann-json3-dev 2>/dev/null || echo unknown)"
  {
    echo "gpu_deps/ for scripts/gpu_check.sh (made by --prepare)"
    echo "made: $(date -u +%Y-%m-%dT%H:%M:%SZ) at git $(cut -c1-10 "$tmp/SOURCE_REVISION")" \
      "($(wc -l <"$tmp/SOURCE_FILES.sha256") source files' checksums in SOURCE_FILES.sha256)"
    echo
    printf '%-44s %-12s %8s  %s\n' path version KiB from
    printf '%-44s %-12s %8s  %s\n' googletest/ "$gtest_v" "$(du -sk "$tmp/googletest" | cut -f1)" \
      "/usr/src/googletest (Debian googletest)"
    printf '%-44s %-12s %8s  %s\n' nlohmann_json/include/nlohmann/ "$json_v" \
      "$(du -sk "$tmp/nlohmann_json" | cut -f1)" "/usr/include/nlohmann (Debian nlohmann-json3-dev)"
    for whl in "$tmp"/wheels/*.whl; do
      printf '%-44s %-12s %8s  %s\n' "wheels/$(basename "$whl")" \
        "$(basename "$whl" | cut -d- -f2)" "$(du -sk "$whl" | cut -f1)" \
        "PyPI, sha256 $(sha256sum "$whl" | cut -c1-16)…"
    done
  } >"$tmp/MANIFEST.txt"
  local bytes
  bytes="$(du -sb "$tmp" | cut -f1)"
  echo "total: $bytes bytes ($(find "$tmp" -type f | wc -l) files), limit $MAX_DEPS_BYTES" >>"$tmp/MANIFEST.txt"
  if ((bytes > MAX_DEPS_BYTES)); then
    log "gpu_deps/ would be $bytes bytes, over the 64 MiB the device tool carries"
    return 1
  fi
  rm -rf "$DEPS"
  mv "$tmp" "$DEPS"
  cat "$DEPS/MANIFEST.txt"
}

if [[ $MODE == prepare ]]; then
  # A subshell whose status is read afterwards: under `if` or `||` bash would
  # switch prepare's `set -e` off, and a failed step would go unnoticed.
  (prepare)
  rc=$?
  rm -rf "$DEPS.tmp"
  if ((rc != 0)); then
    log "--prepare failed (exit $rc); gpu_deps/ is as it was"
    exit 1
  fi
  exit 0
fi

# ---------------------------------------------------------------------------
# The check (GPU or dry run). No `set -e`: every stage runs, each one's
# outcome is recorded in $WORK/stages.tsv, and the exit status says whether
# any failed.
START_EPOCH="$(date +%s)"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
if [[ $MODE == gpu ]]; then
  # 8 minutes less a margin: a stage that ignores its SIGINT gets 10 s more,
  # then SIGKILL; the summary takes a few seconds.
  BUDGET="${GPU_CHECK_BUDGET_S:-455}"
  BUILD_DIR="$ROOT/build-gpu"
  PY="${PYTHON:-python3}"
  DEFAULT_REPORT="$ROOT/reports/gpu/$STAMP"
else
  BUDGET="${GPU_CHECK_BUDGET_S:-1500}"
  BUILD_DIR="$ROOT/build-gpu-dryrun"
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="${PYTHON:-$ROOT/.venv/bin/python}"; else PY="${PYTHON:-python3}"; fi
  DEFAULT_REPORT="$ROOT/reports/gpu/dryrun-$STAMP"
fi
PY="$(command -v "$PY" || echo "$PY")"
DEADLINE=$((START_EPOCH + BUDGET))
if [[ -n "${OUT:-}" ]]; then REPORT="$OUT"; else REPORT="$DEFAULT_REPORT"; fi
mkdir -p "$REPORT"
REPORT="$(cd "$REPORT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
LOGS="$WORK/logs"
mkdir -p "$LOGS"
STAGES="$WORK/stages.tsv"   # name, status, seconds, note
: >"$STAGES"
NPROC="$(nproc 2>/dev/null || echo 2)"
if [[ -d /usr/local/cuda/bin && ":$PATH:" != *":/usr/local/cuda/bin:"* ]]; then
  export PATH="$PATH:/usr/local/cuda/bin"
fi
if [[ $MODE == dryrun && -z ${PYTHON:-} && -x $ROOT/.venv/bin/python ]]; then
  # The GPU image's Python has torch and pytest, not the venv's extras (NumPy,
  # matplotlib, the editable package): run under the same, so that a test
  # module importing one of those fails here first.
  if BARE="$("$ROOT/.venv/bin/python" "$ROOT/scripts/gpu_image_python.py" "$WORK/python" \
    2>"$LOGS/gpu_image_python.log")"; then
    PY="$BARE"
  else
    log "could not make a Python like the GPU image's: $(tail -3 "$LOGS/gpu_image_python.log")"
    exit 1
  fi
fi
log "mode $MODE, budget ${BUDGET}s, build $BUILD_DIR, report $REPORT, python $PY"

# A stage's own limit: on the GPU machine (16 cores), else in the dry run
# (2 shared cores, a cold build).
pick() { if [[ $MODE == gpu ]]; then echo "$1"; else echo "$2"; fi; }

# Seconds a stage may take: its own limit, cut to what is left of the budget
# less 20 s for the summary and less RESERVE seconds kept for the stages
# after it. 0 when nothing is left.
RESERVE=0
stage_limit() {
  local want=$1 left
  left=$((DEADLINE - $(date +%s) - 20 - RESERVE))
  ((left < 0)) && left=0
  echo $((want < left ? want : left))
}

record() {  # name status seconds note
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >>"${RECORD_TO:-$STAGES}"
  log "stage $1: $2 (${3}s) ${4:-}"
  # The stages so far, in the output folder: what comes back if something
  # outside stops the check before its summary (replaced in one rename; the
  # summary removes it).
  # (The name set here: a redirection's $BASHPID would be the child's.)
  local writing="$REPORT/stages_so_far.tsv.$BASHPID"
  cat "$STAGES" "$WORK/stages_sanitizers.tsv" >"$writing" 2>/dev/null
  mv -f "$writing" "$REPORT/stages_so_far.tsv"
}

# run_stage NAME LIMIT LOGFILE CMD...: runs CMD under `timeout`, its output
# into LOGFILE; sets STAGE_RC (124 = timed out) and STAGE_SECS.
run_stage() {
  local name=$1 want=$2 logfile=$3
  shift 3
  local limit t0
  limit="$(stage_limit "$want")"
  t0="$(date +%s)"
  if ((limit < 5)); then
    echo "not run: too little left of the ${BUDGET}s budget" >"$logfile"
    STAGE_RC=125
    STAGE_SECS=0
    return
  fi
  log "stage $name (limit ${limit}s): $(printf '%s ' "$@" | tr '\n' ' ' | cut -c1-240)"
  # SIGINT first: pytest then still writes its summary and junit XML.
  timeout -s INT -k 10 "$limit" "$@" >"$logfile" 2>&1
  STAGE_RC=$?
  STAGE_SECS=$(($(date +%s) - t0))
}

status_of() {  # rc -> PASS / FAIL / TIMEOUT / NOT RUN
  case "$1" in
    0) echo PASS ;;
    124 | 137) echo TIMEOUT ;;
    125) echo "NOT RUN" ;;
    *) echo FAIL ;;
  esac
}

# Whether this tree's files are those --prepare saw (gpu_deps/SOURCE_FILES.sha256),
# for a copy with no .git: a tree changed since then is not that revision.
source_files_check() {
  local sums="$DEPS/SOURCE_FILES.sha256" total bad
  if [[ ! -s $sums ]]; then
    echo "no checksums of its files, so this tree may differ from it"
    return
  fi
  total="$(wc -l <"$sums")"
  bad="$(sha256sum --quiet -c "$sums" 2>/dev/null | sed -n 's/: FAILED.*$//p')"
  if [[ -z $bad ]]; then
    echo "all $total of its files are unchanged here"
  else
    local n
    n="$(echo "$bad" | wc -l)"
    echo "but $n of its $total files differ here ($(echo "$bad" | head -5 | paste -sd' ')$( ((n > 5)) && echo ' ...')): the results are a changed tree's; run --prepare just before the GPU run"
  fi
}

# --- environment ------------------------------------------------------------
{
  echo "mode: $MODE"
  echo "host: $(hostname)"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  # The device tool's copy of the tree can carry a .git of an older commit
  # (the session's first) under newer files: the revision --prepare saw,
  # with every file's checksum matching, says more than that .git does.
  if [[ -s $DEPS/SOURCE_FILES.sha256 ]] && sha256sum --quiet -c "$DEPS/SOURCE_FILES.sha256" >/dev/null 2>&1; then
    echo "git: $(cat "$DEPS/SOURCE_REVISION") [the revision --prepare saw; $(source_files_check)]"
  elif revision="$(git_revision "" | paste -sd '')"; then
    echo "git: $revision"
  else
    echo "git: $(cat "$DEPS/SOURCE_REVISION" 2>/dev/null || echo unknown) [no .git here: the revision --prepare saw; $(source_files_check)]"
  fi
  echo "cpus: $NPROC"
  echo "python: $PY ($("$PY" -V 2>&1))"
  echo "cmake: $(cmake --version 2>/dev/null | head -1)"
  echo "ninja: $(ninja --version 2>/dev/null || echo absent)"
  echo "nvcc: $(command -v nvcc >/dev/null && nvcc --version | tail -1 || echo absent)"
  if command -v nvidia-smi >/dev/null; then
    echo "nvidia-smi:"
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1
  else
    echo "nvidia-smi: absent"
  fi
} >"$LOGS/environment.txt" 2>&1
run_stage environment "$(pick 60 60)" "$LOGS/torch_info.txt" "$PY" -c '
import torch
print("torch:", torch.__version__, "cuda", torch.version.cuda)
print("cuda_available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu:", torch.cuda.get_device_name(0))
    print("capability: %d.%d" % torch.cuda.get_device_capability(0))
    print("gpu_memory_gib: %.1f" % (p.total_memory / 2**30))
    print("gpu_count:", torch.cuda.device_count())
'
ARCH=""
if ((STAGE_RC == 0)); then
  ARCH="$(sed -n 's/^capability: //p' "$LOGS/torch_info.txt")"
fi
if [[ $MODE == gpu ]]; then
  if [[ -n $ARCH ]]; then
    record environment PASS "$STAGE_SECS" "$(sed -n 's/^gpu: //p' "$LOGS/torch_info.txt"), sm_${ARCH/./}"
  else
    record environment FAIL "$STAGE_SECS" "torch sees no CUDA GPU (see torch_info.txt); building for 8.0;9.0+PTX"
  fi
else
  record environment "$(status_of "$STAGE_RC")" "$STAGE_SECS" "dry run: CPU only"
fi

# --- the carried wheels -----------------------------------------------------
SITE="$WORK/site"
if compgen -G "$DEPS/wheels/*.whl" >/dev/null; then
  run_stage wheels "$(pick 60 60)" "$LOGS/wheels.log" "$PY" -m pip install -q --no-index --no-deps \
    --target "$SITE" "$DEPS"/wheels/*.whl
  if ((STAGE_RC != 0 && STAGE_RC != 124)); then
    # No pip: a pure-Python wheel is a zip of what goes into site-packages.
    echo "pip failed ($STAGE_RC); unpacking the wheels instead" >>"$LOGS/wheels.log"
    "$PY" -c 'import sys, zipfile
for w in sys.argv[2:]: zipfile.ZipFile(w).extractall(sys.argv[1])' "$SITE" "$DEPS"/wheels/*.whl \
      >>"$LOGS/wheels.log" 2>&1
    STAGE_RC=$?
  fi
  record wheels "$(status_of "$STAGE_RC")" "$STAGE_SECS" "$(find "$DEPS/wheels" -name "*.whl" -printf "%f ")"
else
  echo "no $DEPS/wheels/*.whl" >"$LOGS/wheels.log"
  record wheels FAIL 0 "gpu_deps/wheels is empty: run scripts/gpu_check.sh --prepare first"
fi
export PYTHONPATH="$SITE:$ROOT/torch_extension${PYTHONPATH:+:$PYTHONPATH}"

# --- configure --------------------------------------------------------------
GEN=(-G Ninja)
KEEP_GOING=(-k 0)   # build what can be built: a broken bench leaves the tests
if ! command -v ninja >/dev/null; then GEN=(-G "Unix Makefiles"); KEEP_GOING=(-k); fi
CMAKE_ARGS=(-S "$ROOT" -B "$BUILD_DIR" "${GEN[@]}"
  -DPython3_EXECUTABLE="$PY" -DNANOBRAGG_DEPS_DIR="$DEPS"
  -DNANOBRAGG_BUILD_TESTS=ON -DNANOBRAGG_BUILD_BENCH=ON -DNANOBRAGG_BUILD_FUZZ=OFF
  -DNANOBRAGG_PYTHON_PACKAGE=OFF -DNANOBRAGG_WERROR=OFF)
# CMake 4 refuses projects that ask for a minimum below 3.5 and warns below
# 3.10 (GoogleTest 1.12 asks for 3.5).
if [[ "$(cmake --version 2>/dev/null | sed -n 's/^cmake version \([0-9]*\).*/\1/p')" -ge 4 ]]; then
  CMAKE_ARGS+=(-DCMAKE_POLICY_VERSION_MINIMUM=3.10 -Wno-deprecated)
fi
# --- the C++ runtime ------------------------------------------------------------
# The GPU image's `c++` (/opt/gcc/bin/g++, a wrapper of g++ 13.3) links
# libstdc++ into shared libraries statically, and a library holding its own
# copy of the C++ runtime beside the system one torch runs on crashed every
# operator error message in Python there. The build puts torch's libstdc++
# first on its link lines (cmake/NanoBraggTorch.cmake) whatever the compiler;
# here, where the compiler CMake would pick links statically, a system g++
# that links dynamically is taken instead. links_cxx_runtime_dynamically CXX:
# whether a shared library built by CXX passes scripts/check_cxx_runtime.sh.
links_cxx_runtime_dynamically() {
  local dir ok=1
  dir="$(mktemp -d "$WORK/cxx_probe.XXXXXX")"
  printf '#include <sstream>\nstd::string probe(long v) { std::ostringstream s; s << v; return s.str(); }\n' \
    >"$dir/probe.cpp"
  if "$1" -shared -fPIC -o "$dir/probe.so" "$dir/probe.cpp" >>"$LOGS/cxx_runtime.log" 2>&1 &&
    bash "$ROOT/scripts/check_cxx_runtime.sh" "$dir/probe.so" >>"$LOGS/cxx_runtime.log" 2>&1; then
    ok=0
  fi
  rm -rf "$dir"
  return $ok
}
CXX_RUNTIME_NOTE=""
if [[ $MODE == gpu ]]; then
  cxx="$(command -v "${CXX:-c++}" || command -v g++ || true)"
  echo "compiler CMake picks: ${cxx:-none} ($("${cxx:-false}" --version 2>/dev/null | head -1))" \
    >"$LOGS/cxx_runtime.log"
  if [[ -n $cxx ]] && ! links_cxx_runtime_dynamically "$cxx"; then
    fixed=""
    for other in /usr/bin/g++ /usr/bin/c++ /usr/bin/g++-14 /usr/bin/g++-13 /usr/bin/g++-12; do
      if [[ -x $other && $(readlink -f "$other") != $(readlink -f "$cxx") ]] &&
        links_cxx_runtime_dynamically "$other"; then
        CMAKE_ARGS+=(-DCMAKE_CXX_COMPILER="$other" -DCMAKE_CUDA_HOST_COMPILER="$other")
        fixed="built with $other"
        break
      fi
    done
    CXX_RUNTIME_NOTE="$cxx links libstdc++ statically; ${fixed:-no other g++ found}"
    echo "$CXX_RUNTIME_NOTE" >>"$LOGS/cxx_runtime.log"
    log "C++ runtime: $CXX_RUNTIME_NOTE"
  fi
fi

if [[ $MODE == gpu ]]; then
  CMAKE_ARGS+=(-DCMAKE_BUILD_TYPE=Release -DNANOBRAGG_CUDA=ON)
  # torch's CMake takes the architectures from the environment.
  export TORCH_CUDA_ARCH_LIST="${ARCH:-8.0;9.0+PTX}"
else
  # Unoptimised, no debug info: a third less compile time, and nothing in the
  # dry run runs long enough for -O3 to matter (the CUDA cases skip).
  CMAKE_ARGS+=(-DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG=-O0 -DNANOBRAGG_CUDA=OFF)
fi
if [[ ! -f "$DEPS/googletest/CMakeLists.txt" || ! -f "$DEPS/nlohmann_json/include/nlohmann/json.hpp" ]]; then
  echo "gpu_deps/ lacks googletest/ or nlohmann_json/: run scripts/gpu_check.sh --prepare first" >"$LOGS/configure.log"
  STAGE_RC=1 STAGE_SECS=0
else
  run_stage configure "$(pick 120 300)" "$LOGS/configure.log" cmake "${CMAKE_ARGS[@]}"
fi
CONFIGURED=$STAGE_RC
record configure "$(status_of "$STAGE_RC")" "$STAGE_SECS" \
  "$(sed -n 's/^-- nanobragg_ops: \(CUDA kernels .*\)/\1/p' "$LOGS/configure.log" | head -1)${CXX_RUNTIME_NOTE:+; $CXX_RUNTIME_NOTE}"

# --- build ------------------------------------------------------------------
TARGETS=(nanobragg_ops nanobragg_tests nanobragg_bench)
if ((CONFIGURED == 0)); then
  # Relinked every run, so that a failed build leaves no stale binary behind
  # for the stages below (the objects stay: a second run compiles nothing).
  rm -f "$BUILD_DIR"/lib/libnanobragg_ops.so* "$BUILD_DIR/tests/cpp/nanobragg_tests" \
    "$BUILD_DIR/bench/nanobragg_bench"
  run_stage build "$(pick 240 1200)" "$LOGS/build.log" cmake --build "$BUILD_DIR" --parallel "$NPROC" \
    --target "${TARGETS[@]}" -- "${KEEP_GOING[@]}"
  built=()
  for f in lib/libnanobragg_ops.so tests/cpp/nanobragg_tests bench/nanobragg_bench; do
    [[ -e "$BUILD_DIR/$f" ]] && built+=("${f##*/}")
  done
  # The library must share torch's C++ runtime (see "the C++ runtime").
  runtime_note=""
  lib_so="$BUILD_DIR/lib/libnanobragg_ops.so"
  if [[ -e $lib_so ]]; then
    {
      echo "== link command"
      (cd "$BUILD_DIR" && ninja -t commands "lib/$(basename "$(readlink -f "$lib_so")")" 2>/dev/null | tail -1)
      echo "== NEEDED"
      readelf -d "$lib_so" 2>&1 | grep NEEDED
    } >"$LOGS/library_runtime.log" 2>&1
    if ! bash "$ROOT/scripts/check_cxx_runtime.sh" "$lib_so" >>"$LOGS/library_runtime.log" 2>&1; then
      runtime_note="; $(tail -1 "$LOGS/library_runtime.log" | sed 's/^check_cxx_runtime: //')"
      # Last resort: keep the copy private (its symbols local), so that it
      # at least never mixes with torch's; the stage still fails.
      flags="$(sed -n 's/^CMAKE_SHARED_LINKER_FLAGS:STRING=//p' "$BUILD_DIR/CMakeCache.txt")"
      if cmake "$BUILD_DIR" -DCMAKE_SHARED_LINKER_FLAGS="$flags -Wl,--exclude-libs,ALL" \
        >>"$LOGS/library_runtime.log" 2>&1 &&
        cmake --build "$BUILD_DIR" --target nanobragg_ops >>"$LOGS/library_runtime.log" 2>&1; then
        runtime_note+="; relinked with -Wl,--exclude-libs,ALL"
      fi
      runtime_note+=" (library_runtime.log)"
      ((STAGE_RC == 0)) && STAGE_RC=1
    fi
  fi
  record build "$(status_of "$STAGE_RC")" "$STAGE_SECS" "$NPROC jobs; built: ${built[*]:-nothing}$( \
    ((STAGE_RC)) && grep -m1 -E '^FAILED: ' "$LOGS/build.log" | cut -c1-100 | sed 's/^/; /')$runtime_note"
else
  record build "NOT RUN" 0 "configure failed"
fi
TESTS_BIN="$BUILD_DIR/tests/cpp/nanobragg_tests"
BENCH_BIN="$BUILD_DIR/bench/nanobragg_bench"
LIB="$BUILD_DIR/lib/libnanobragg_ops.so"

# --- GoogleTest: the CUDA cases ----------------------------------------------
# Device-parametrised tests are instantiated as Devices/<Suite>.<Test>/cuda;
# CUDA-only suites and tests have Cuda or CUDA in their names.
GTEST_FILTER='*cuda*:*Cuda*:*CUDA*'
if [[ -x $TESTS_BIN ]]; then
  run_stage gtest "$(pick 120 300)" "$LOGS/gtest_cuda.log" "$TESTS_BIN" --gtest_filter="$GTEST_FILTER" \
    --gtest_output="xml:$LOGS/gtest_cuda.xml"
  record gtest "$(status_of "$STAGE_RC")" "$STAGE_SECS" "--gtest_filter=$GTEST_FILTER"
else
  record gtest "NOT RUN" 0 "no $TESTS_BIN"
fi

# --- bench ---------------------------------------------------------------------
# Before pytest: its timings want the GPU to itself. A bench cut short by the
# budget keeps the rows of the groups of cases it finished (it writes its
# report after each; the summary then says "Unfinished"), a stage TIMEOUT.
if [[ $MODE == gpu ]]; then
  # Both ops at 512² and 2048² (tricubic: × 9 lookups per pixel, 37.7 M points
  # at 2048², aten_composite included: about 60 GB, which the GPU has).
  read -r -a BENCH_ARGS <<<"${GPU_CHECK_BENCH_ARGS:---sizes 512 2048 --points-per-pixel 9 --repeats 30 --max-seconds-per-case 2 --no-scale}"
  BENCH_DEVICE=cuda
else
  read -r -a BENCH_ARGS <<<"${GPU_CHECK_BENCH_ARGS:---sizes 64 --points-per-pixel 9 --repeats 3 --max-seconds-per-case 0.5 --no-scale}"
  BENCH_DEVICE=cpu
fi
if [[ -x $BENCH_BIN ]]; then
  # Two minutes stay for pytest and the sanitizers whatever the
  # build took; a bench that would get under a minute does not start.
  RESERVE="$(pick 120 0)"
  if (($(stage_limit 180) < 60)); then RESERVE=100000; fi
  run_stage bench "$(pick 180 300)" "$LOGS/bench.log" "$BENCH_BIN" --device "$BENCH_DEVICE" "${BENCH_ARGS[@]}" \
    --outdir "$WORK/bench"
  RESERVE=0
  bench_dir="$(find "$WORK/bench" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | sort | tail -1)"
  if [[ -f "$bench_dir/perf_results.json" ]]; then
    cp "$bench_dir/perf_results.json" "$bench_dir/perf_summary.md" "$REPORT/"
    # Whatever else the bench wrote (env.json, ...) goes with the logs.
    for f in "$bench_dir"/*; do
      case "${f##*/}" in perf_results.json | perf_summary.md) ;; *) cp -r "$f" "$LOGS/bench_${f##*/}" ;; esac
    done
  elif ((STAGE_RC == 0)); then
    STAGE_RC=1
  fi
  record bench "$(status_of "$STAGE_RC")" "$STAGE_SECS" "--device $BENCH_DEVICE ${BENCH_ARGS[*]}"
else
  record bench "NOT RUN" 0 "no $BENCH_BIN"
fi

# --- grid gradient profile ---------------------------------------------------------
# Where the grid gradient's time goes, kernel by kernel (torch.profiler),
# atomic and deterministic, at the GPU goals' size: what the next change to
# the deterministic path needs to know. The dry run takes the same steps on
# the CPU kernels at a tiny size, so that the script keeps working.
if [[ -f $LIB ]]; then
  export NANOBRAGG_OPS_LIBRARY="$LIB"
  PROFILE_ARGS=(--device cuda)
  [[ $MODE == gpu ]] || PROFILE_ARGS=(--device cpu --size 64)
  run_stage profile "$(pick 90 60)" "$LOGS/profile.log" "$PY" \
    "$ROOT/scripts/gpu_profile_grid_gradient.py" "${PROFILE_ARGS[@]}" \
    --out "$REPORT/grid_gradient_profile.md"
  record profile "$(status_of "$STAGE_RC")" "$STAGE_SECS" \
    "scripts/gpu_profile_grid_gradient.py ${PROFILE_ARGS[*]}"
else
  record profile "NOT RUN" 0 "no $LIB"
fi

# --- compute-sanitizer (beside pytest) -----------------------------------------
# A few small CUDA cases: each op's forward against its reference, tricubic's
# backward (grid and hkl gradients, strided inputs; empty launches), the
# deterministic grid gradient (sort, run table, gather; first and second
# order), both double backwards, and absorption's gradients (per_layer and
# oversample_thick both ways). memcheck runs them all: out-of-bounds and
# misaligned accesses (failed CUDA API calls fail their case). racecheck (shared-memory
# hazards) runs the cases whose kernels use shared memory: absorption's
# backward and double backward, whose block sums do. synccheck (barriers and
# warp-synchronous calls with lanes missing) runs the deterministic grid
# gradient (its warps' xor shuffles) and absorption's block sums
# (__syncthreads). The three tools run at the same time.
SANITIZE_CASES=(
  Devices/TricubicForward.MatchesPolin3Float32/cuda
  Devices/TricubicBackward.StridedInputsAndExpandedGradient/cuda
  Devices/TricubicBackward.EmptyPoints/cuda
  CudaSmall.DeterministicGridGradient
  CudaSmall.DoubleBackward
  CudaSmall.IndexMinNearInt64LimitsNeverReadsOutOfBounds
  Devices/Absorption.MatchesPortFormulation/cuda
  CudaSmall.AbsorptionForwardBackward
)
RACECHECK_CASES=(CudaSmall.AbsorptionForwardBackward CudaSmall.DoubleBackward)
SYNCCHECK_CASES=(CudaSmall.DeterministicGridGradient CudaSmall.AbsorptionForwardBackward)
SANITIZER=""
for c in compute-sanitizer /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  if command -v "$c" >/dev/null 2>&1; then SANITIZER="$(command -v "$c")"; break; fi
done
# How many tests a filter names (the names can change: each list must still
# name existing tests).
tests_matched() {
  [[ -x $TESTS_BIN ]] || { echo 0; return; }
  timeout 20 "$TESTS_BIN" --gtest_list_tests --gtest_filter="$1" 2>/dev/null | grep -c '^  '
}
# sanitize TOOL CASES...: one tool over its cases, recorded as stage TOOL.
# memcheck sees out-of-bounds accesses only at allocation boundaries: torch's
# caching allocator is off for these runs, every tensor its own cudaMalloc.
sanitize() {
  local tool=$1 log_ errors hazards ran skipped what filter matched passed unsupported
  shift
  log_="$LOGS/sanitizer_$tool.log"
  filter="$(IFS=:; echo "$*")"
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  if [[ ! -x $TESTS_BIN ]]; then
    record "$tool" "NOT RUN" 0 "no $TESTS_BIN"
    return
  fi
  matched="$(tests_matched "$filter")"
  if ((matched != $#)); then
    echo "the filter $filter matches $matched tests, not $#" >"$log_"
    record "$tool" FAIL 0 "the $tool cases in gpu_check.sh name $matched existing tests of $#"
    return
  fi
  if [[ -z $SANITIZER ]]; then
    echo "compute-sanitizer: not found" >"$log_"
    record "$tool" "NOT AVAILABLE" 0 "compute-sanitizer not found ($# cases would run)"
    return
  fi
  # memcheck's --report-api-errors no: a CUDA API call of ours that fails
  # raises (every launch is followed by C10_CUDA_KERNEL_LAUNCH_CHECK, torch's
  # own calls by C10_CUDA_CHECK), so the case fails and the stage with it;
  # what the tool would add are the errors the CUDA runtime and torch get and
  # ignore when they probe the device, which would fail the stage with no
  # fault of our kernels.
  local options=(--tool "$tool" --print-limit 50)
  [[ $tool == memcheck ]] && options+=(--report-api-errors no)
  run_stage "$tool" "$(pick 120 120)" "$log_" "$SANITIZER" "${options[@]}" \
    "$TESTS_BIN" --gtest_filter="$filter"
  # "ERROR SUMMARY: N errors"; racecheck also (older: only) "RACECHECK
  # SUMMARY: H hazards displayed (E errors, W warnings)".
  errors="$(sed -n 's/^=* *ERROR SUMMARY: \([0-9]*\) error.*/\1/p' "$log_" | tail -1)"
  hazards="$(sed -n 's/^=* *RACECHECK SUMMARY: \([0-9]*\) hazard.*/\1/p' "$log_" | tail -1)"
  if [[ -z $errors ]]; then
    errors="$(sed -n 's/^=* *RACECHECK SUMMARY: .*(\([0-9]*\) error.*/\1/p' "$log_" | tail -1)"
  fi
  passed="$(grep -c -E '^\[       OK \]' "$log_")"
  ran=$((passed + $(grep -c -E '^\[  FAILED  \] .*\([0-9]+ ms\)$' "$log_")))
  skipped="$(grep -c -E '^\[  SKIPPED \] .*\([0-9]+ ms\)$' "$log_")"
  what="$ran cases ran, $skipped skipped, ${errors:-no} errors reported${hazards:+, $hazards hazards}"
  unsupported="$(grep -i -m1 -E '^=+ .*(not supported|unsupported)' "$log_" | cut -c1-140)"
  if [[ -n $unsupported ]] && ((passed == 0)); then
    # (A tool that refuses the device passes no case; where cases passed
    # under it, it ran, and its summary counts, whatever else it printed.)
    record "$tool" "NOT SUPPORTED" "$STAGE_SECS" "$unsupported"
  elif [[ -z $errors && -z $hazards ]] && grep -q -E '^=+ (Error|Internal)' "$log_" &&
    ((STAGE_RC != 124 && STAGE_RC != 137)); then
    # The tool itself could not run here (no summary at all): not our code.
    record "$tool" "NOT SUPPORTED" "$STAGE_SECS" "$(grep -m1 -E '^=+ (Error|Internal)' "$log_" | cut -c1-140)"
  elif ((STAGE_RC == 124 || STAGE_RC == 137 || STAGE_RC == 125)); then
    record "$tool" "$(status_of "$STAGE_RC")" "$STAGE_SECS" "$what"
  elif [[ -n $errors && $errors != 0 ]]; then
    record "$tool" FAIL "$STAGE_SECS" "$what"
  elif ((STAGE_RC != 0)); then
    record "$tool" FAIL "$STAGE_SECS" "exit $STAGE_RC; $what"
  elif [[ $MODE == gpu && $ran -eq 0 ]]; then
    record "$tool" FAIL "$STAGE_SECS" "no case ran under the sanitizer; $what"
  else
    record "$tool" PASS "$STAGE_SECS" "$what"
  fi
}
run_sanitizers() {
  sanitize memcheck "${SANITIZE_CASES[@]}" &
  sanitize racecheck "${RACECHECK_CASES[@]}" &
  sanitize synccheck "${SYNCCHECK_CASES[@]}" &
  wait
}

# --- pytest: the CUDA cases ---------------------------------------------------
# Device-dependent tests take the `device`/`absorption_device` fixture
# (params cpu, cuda), so their CUDA cases have "cuda" in their ids; the
# CUDA-only tests live in test_cuda.py. `-k cuda` selects exactly those.
PYTEST_ARGS=(-m pytest tests/python -q -rfEs -k cuda -p no:cacheprovider
  --junitxml="$LOGS/pytest_cuda.xml" -o junit_family=xunit2)
if [[ $MODE == gpu ]]; then
  WORKERS="${GPU_CHECK_PYTEST_WORKERS:-4}"
  if ((WORKERS > 0)) && "$PY" -c 'import xdist' 2>/dev/null; then
    # Tests go to workers one at a time (--dist load), which balances the
    # long test_cuda.py; each worker is a process of its own (CUDA context,
    # caching allocator, sync-debug mode), so per-process checks still hold.
    PYTEST_ARGS+=(-p xdist -n "$WORKERS" --dist load)
  fi
fi
# The sanitizer runs go on at the same time: the GPU and 16 cores have room
# for both, and it saves their minute or two of the 8.
RECORD_TO="$WORK/stages_sanitizers.tsv" run_sanitizers &
SANITIZERS_PID=$!
if [[ -f $LIB ]]; then
  export NANOBRAGG_OPS_LIBRARY="$LIB"   # the package loads this build
  run_stage pytest "$(pick 180 600)" "$LOGS/pytest_cuda.log" "$PY" "${PYTEST_ARGS[@]}"
  record pytest "$(status_of "$STAGE_RC")" "$STAGE_SECS" "-k cuda$(
    [[ " ${PYTEST_ARGS[*]} " == *" -n "* ]] && echo ", xdist -n $WORKERS --dist load")"
else
  record pytest "NOT RUN" 0 "no $LIB"
fi
# The CPU cases too, on the GPU machine only (the test command runs them
# everywhere else): its compiler and CPU differ from the development
# machines', and a CPU test failed there once that passed here (with the
# image's g++ 13.3, reports/gpu/20261204T122607Z/NOTES.md). Not the two
# modules that build the examples (minutes).
if [[ $MODE == gpu && -f $LIB && ${GPU_CHECK_CPU_PYTEST:-1} != 0 ]]; then
  CPU_ARGS=(-m pytest tests/python -q -rfEs -k "not cuda" -p no:cacheprovider
    --ignore=tests/python/test_consumers.py --ignore=tests/python/test_export.py
    --junitxml="$LOGS/pytest_cpu.xml" -o junit_family=xunit2)
  if "$PY" -c 'import xdist' 2>/dev/null; then CPU_ARGS+=(-p xdist -n 8 --dist load); fi
  run_stage pytest_cpu 150 "$LOGS/pytest_cpu.log" "$PY" "${CPU_ARGS[@]}"
  record pytest_cpu "$(status_of "$STAGE_RC")" "$STAGE_SECS" "-k 'not cuda', without test_consumers and test_export"
  # ... and the tricubic CPU tests at the vector capabilities below the CPU's
  # own (the suite above runs the best one): a point's bits must not depend
  # on which vector path took it, which a compiler may build differently
  # (this image's g++ 13.3 did, at AVX2 in float32 and at AVX-512,
  # reports/gpu/20261204T174631Z/NOTES.md). Not the torch.compile cases
  # (inductor's own C++ fails under a forced capability).
  run_stage cpu_capabilities 90 "$LOGS/cpu_capabilities.log" bash -c '
    rc=0
    for cap in default avx2; do
      echo "== ATEN_CPU_CAPABILITY=$cap"
      ATEN_CPU_CAPABILITY=$cap "$0" -m pytest tests/python/test_tricubic.py -q -rfE \
        -k "not cuda and not compile" -p no:cacheprovider || rc=1
    done
    exit $rc' "$PY"
  record cpu_capabilities "$(status_of "$STAGE_RC")" "$STAGE_SECS" \
    "test_tricubic.py at ATEN_CPU_CAPABILITY default and avx2 ($(grep -hE ' (passed|failed)' "$LOGS/cpu_capabilities.log" | sed 's/ in [0-9.]*s.*//' | paste -sd';'))"
fi
wait "$SANITIZERS_PID"
cat "$WORK/stages_sanitizers.tsv" >>"$STAGES" 2>/dev/null

# --- summary -------------------------------------------------------------------
TOTAL=$(($(date +%s) - START_EPOCH))
# The end of each failed stage's log, before the table (which stays last).
while IFS=$'\t' read -r name status _; do
  [[ $status == FAIL || $status == TIMEOUT ]] || continue
  case $name in
    environment) f=torch_info.txt ;;
    wheels) f=wheels.log ;;
    configure) f=configure.log ;;
    build) f=build.log ;;
    gtest) f=gtest_cuda.log ;;
    bench) f=bench.log ;;
    profile) f=profile.log ;;
    pytest) f=pytest_cuda.log ;;
    pytest_cpu) f=pytest_cpu.log ;;
    memcheck | racecheck | synccheck) f="sanitizer_$name.log" ;;
    *) continue ;;
  esac
  echo "---- $name ($status): the end of $f ----"
  if [[ $name == build ]]; then
    grep -E -m 30 'FAILED:|error|Error' "$LOGS/$f" | cut -c1-300
  else
    grep -v -E '^SKIPPED \[|^\[  SKIPPED \]|^\[ RUN      \]|^\[       OK \]' "$LOGS/$f" | tail -25 | cut -c1-300
  fi
done <"$STAGES"
cp "$STAGES" "$LOGS/stages.tsv"
[[ -f "$BUILD_DIR/CMakeCache.txt" ]] && cp "$BUILD_DIR/CMakeCache.txt" "$LOGS/CMakeCache.txt"
tar -czf "$REPORT/logs.tar.gz" -C "$WORK" logs
rm -f "$REPORT/stages_so_far.tsv"
timeout 60 "$PY" "$ROOT/scripts/gpu_check_summary.py" --mode "$MODE" --stages "$STAGES" \
  --logs "$LOGS" --report "$REPORT" --total-seconds "$TOTAL" --budget "$BUDGET"
SUMMARY_RC=$?
echo "summary: $REPORT/gpu_check_summary.md"
if ((SUMMARY_RC != 0)); then
  echo "gpu_check: the check failed (see the table above and $REPORT)"
  exit 1
fi
exit 0
