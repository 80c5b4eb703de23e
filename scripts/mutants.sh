#!/usr/bin/env bash
# Mutation smoke run: plants one known fault at a time in the per-element
# math headers and the CPU kernels, rebuilds the library and the GoogleTest
# suite CPU-only, runs the suite (with the machine's best CPU capability and
# with the baseline one), and counts the faults it catches. Every
# one must be caught; a survivor means a missing test (add the test, do not
# weaken the mutant). Not part of CI; its last result is in
# docs/RELIABILITY.md.
#
#   scripts/mutants.sh            # all mutants
#   scripts/mutants.sh --check    # only check that every mutant still applies
#   MUTANTS=3,7 scripts/mutants.sh        # a subset (1-based numbers)
#   MUTANTS_PYTEST="tests/python/test_tricubic.py" scripts/mutants.sh
#                                 # also run these pytest files per mutant
#
# It works on a private copy of the working tree (build-mutants/src, the
# tracked and untracked-but-not-ignored files, refreshed each run), builds in
# build-mutants/build (objects are reused between mutants and runs), and
# never touches the working tree itself. Each mutated file is restored from
# a copy (cp, in a trap) before the next mutant. Exit status: 0 when every
# mutant was caught, 1 when one survived, 2 when a mutant no longer applies
# (its text is not found exactly once) or the unmutated build fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${MUTANTS_DIR:-$ROOT/build-mutants}"
SRC="$WORK/src"
BUILD="$WORK/build"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
JOBS="${JOBS:-2}"
# -O1: the mutants build in about half the time of -O3 and the suite's
# tolerances do not depend on the optimisation level.
OPT_FLAGS="${MUTANTS_OPT_FLAGS:--O1 -DNDEBUG}"

# One mutant per line: file|original text|mutated text|description. The
# original text (\n for a line break) must occur exactly once in the file.
MUTANT_LIST=$(cat <<'EOF'
csrc/tricubic/tricubic_math.h|w[0] = -u * um1 * um2 * T(1.0 / 6.0);|w[0] = u * um1 * um2 * T(1.0 / 6.0);|a Lagrange weight's sign
csrc/tricubic/tricubic_math.h|if (!offset_in_range(node - 1, lo, size - 4, first)) {|if (!offset_in_range(node - 2, lo, size - 4, first)) {|the stencil start off by one
csrc/tricubic/tricubic_math.h|    const T* p = g + a * stride[0];\n    plane[a] = Taps::zero();\n    NANOBRAGG_UNROLL\n    for (int b = 0; b < 4; ++b) {\n      plane[a].add_scaled(wk[b], Taps::template load<kUnitL>(p + b * stride[1], stride));|    const T* p = g + a * stride[1];\n    plane[a] = Taps::zero();\n    NANOBRAGG_UNROLL\n    for (int b = 0; b < 4; ++b) {\n      plane[a].add_scaled(wk[b], Taps::template load<kUnitL>(p + b * stride[0], stride));|h and k axes swapped in the forward contraction
csrc/tricubic/tricubic_math.h|const int64_t first = lo + 1, end = lo + (size - 2);|const int64_t first = lo + 1, end = lo + (size - 1);|the vector lanes' range test one node too far
csrc/tricubic/tricubic_math.h|sw.kl[a][c] = wk[a] * wl[c];|sw.kl[a][c] = wk[3 - a] * wl[c];|the grid gradient's k weights in the wrong order
csrc/tricubic/tricubic_cpu.cpp|Vec::blendv(Vec(T(0)), n - lower, axis_in)|Vec::blendv(Vec(T(0)), n - lower + Vec(T(1)), axis_in)|the vector lanes' stencil start off by one
csrc/tricubic/tricubic_math.h|dw[3] = (T(3) * u * u - T(1)) * T(1.0 / 6.0);|dw[3] = (T(3) * u * u + T(1)) * T(1.0 / 6.0);|a wrong derivative of the weights
csrc/tricubic/tricubic_math.h|d2w[3] = u;|d2w[3] = T(1) - u;|a wrong second derivative of the weights
csrc/tricubic/tricubic_math.h|if (mode == OutOfRange::Nearest) {|if (mode != OutOfRange::Nearest) {|the wrong out-of-range branch
csrc/tricubic/tricubic_math.h|j.hess[4] = dot(acc[1], wl.dw);|j.hess[4] = dot(acc[2], wl.dw);|a wrong Hessian entry (hl for kl)
csrc/tricubic/tricubic_math.h|return (grad * pick(wh, a)) * (pick(wk, b) * pick(wl, c));|return (grad * pick(wh, a)) * (pick(wk, c) * pick(wl, b));|the deterministic gather's tap (k and l taps swapped)
csrc/tricubic/tricubic_cpu.cpp|const scalar_t fill = static_cast<scalar_t>(default_value);|const scalar_t fill = static_cast<scalar_t>(0);|the CPU kernel ignores default_value
csrc/absorption/absorption_math.h|for (int64_t t = 0; t < L; ++t) {\n    const T a = value_exponent(prm.step / pixel_parallax(prm.odet, px, t));|for (int64_t t = 0; t < L - 1; ++t) {\n    const T a = value_exponent(prm.step / pixel_parallax(prm.odet, px, t));|a dropped absorption layer (per-layer pixel positions)
csrc/absorption/absorption_math.h|expm1_(T(-static_cast<double>(layers)) * a)|expm1_(T(-static_cast<double>(layers - 1)) * a)|the telescoped sum's exponent
csrc/absorption/absorption_math.h|grad_p[0] = g * (ox - r * px);|grad_p[0] = g * ox;|a missing gradient term (pixel x)
csrc/absorption/absorption_math.h|const T clamped = select_(rho < T(0), T(-kMinParallax), T(kMinParallax));|const T clamped = select_(rho < T(0), T(kMinParallax), T(-kMinParallax));|the parallax clamp's sign
csrc/absorption/absorption_math.h|step * select_(dot < T(0), T(-1.0 / kMinParallax), T(1.0 / kMinParallax));|step * select_(dot < T(0), T(1.0 / kMinParallax), T(-1.0 / kMinParallax));|the shared-position parallax clamp's sign
csrc/absorption/absorption_scalars.h|out[3] = D / (L * att);|out[3] = D / L;|the thickness chain rule (d step / d thickness)
csrc/absorption/absorption_scalars.h|out[3] = (dD - zero_stays_zero(D, att_ratio)) / (L * att);|out[3] = dD / (L * att);|a missing term of the thickness second derivative
csrc/absorption/absorption_cpu.cpp|shared_pixel_value(prm.odet[0], prm.odet[1], prm.odet[2],|shared_pixel_value(prm.odet[1], prm.odet[0], prm.odet[2],|odet x/y swapped in the CPU kernel (baseline ISA)
csrc/absorption/absorption_cpu_vec.h|const V ox(prm.odet[0]), oy(prm.odet[1]), oz(prm.odet[2]), step(prm.step);\n  V acc[4]|const V ox(prm.odet[1]), oy(prm.odet[0]), oz(prm.odet[2]), step(prm.step);\n  V acc[4]|odet x/y swapped in the vector backward kernel
csrc/tricubic/tricubic_cpu.cpp|s += load_points(w1) * tap<1>(v);|s += load_points(w1) * tap<2>(v);|the 4-point register's dot takes the wrong tap
csrc/tricubic/tricubic_cpu.cpp|      const __m512i index = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);|      const __m512i index = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 3, 3, 3, 3, 2, 2, 2, 2);|the 4-point register's weights spread to the wrong points
csrc/tricubic/tricubic_cpu.cpp|add_row<2>(g + 2 * s1, p);|add_row<3>(g + 2 * s1, p);|the pending block's plane written back with a row swapped
csrc/tricubic/tricubic_cpu.cpp|coordinate_of<1, kLanes>(a, b, c, out, lanes);|coordinate_of<2, kLanes>(a, b, c, out, lanes);|the batch's coordinates read with k for l
csrc/tricubic/tricubic_cpu.cpp|first_first_second(load_low(w[c]), load_low(dw[c]), Lanes{})|first_first_second(load_low(w[c]), load_low(w[c]), Lanes{})|the 4-point hkl gradient's l derivative takes the weights for their derivatives
csrc/tricubic/tricubic_cpu.cpp|for (int a = 0; a < 4; ++a) block.planes[a] += planes[a];|for (int a = 0; a < 4; ++a) block.planes[a] = planes[a];|a block's record keeps only its last run (`BlockSums`)
csrc/tricubic/tricubic_cpu.cpp|(m * N / 4 + E / 4 + (E % 4 == 1 ? N : 0))|(m * N / 4 + E / 4 + (E % 4 == 0 ? N : 0))|the scatter's weights transposed with node 0 for node 1
csrc/tricubic/tricubic_cpu.cpp|int64_t(b.first[1][j]) * bounds.node_stride[1]|int64_t(b.first[1][j]) * bounds.node_stride[0]|a lane's block offset with the h stride for k
csrc/tricubic/tricubic_cpu.cpp|_mm512_broadcast_f32x4(_mm_loadu_ps(block + offset))|_mm512_broadcast_f32x4(_mm_loadu_ps(block + offset + 1))|the shared block's rows read one tap along (4 points in one block)
csrc/tricubic/tricubic_cpu.cpp|same &= block[i] == block[0];|same &= block[1] == block[0];|a group taken as one block when its first two points share one
csrc/tricubic/tricubic_cpu.cpp|for (int i = 0; i < kParts; ++i) part[i] += o.part[i];|for (int i = 0; i < kParts; ++i) part[i] += o.part[0];|a plane's parts summed with the first part's values (records of 2+ registers)
csrc/tricubic/tricubic_cpu.cpp|  if (G::shared_block(block)) {\n    rows(std::true_type{}, block);|  if (true) {\n    rows(std::true_type{}, block);|every group (values and hkl gradient) read as if its points shared the first one's block
csrc/absorption/absorption_cpu_vec.h|second[d][j] = e < 2 * W ? j : W + e - 2 * W;|second[d][j] = e < 2 * W ? j : W + e - 2 * W - 1;|AVX-512 absorption: the lanes loaded from the third register one element early
csrc/absorption/absorption_cpu_vec.h|to_second[r][i] = d < 2 ? i : W + j;|to_second[r][i] = d < 2 ? i : j;|AVX-512 absorption: the z gradients stored from the wrong register
csrc/absorption/absorption_scalars.h|        return static_cast<double>(static_cast<float>(*static_cast<const c10::Half*>(device)));|        return static_cast<double>(static_cast<float>(*static_cast<const c10::BFloat16*>(device)));|a float16 scalar in device memory read as bfloat16 (`ScalarArg`)
csrc/absorption/absorption_cpu.cpp|const int64_t rows = end_row - first_row;|const int64_t rows = end_row - first_row - 1;|a transposed incoming gradient gathered without a block's last whole row
csrc/common/library_init.h|class __attribute__((visibility("hidden"))) LibraryInit {|class LibraryInit {|the registration guard's class exported: a second copy dlopen'ed beside a linked one runs the linked copy's constructor and registers again
csrc/common/library_init.cpp|    return !defined;|    return true;|the registration guard never skips: a second copy defines the namespace again (torch aborts the process)
csrc/tricubic/tricubic_math.h|for (int64_t k = 0; k < pieces; k += (pieces > 1 ? pieces - 1 : 1)) {|for (int64_t k = 0; k < 1; ++k) {|the deterministic gather leaves out a run's short last piece
csrc/tricubic/tricubic_math.h|return piece_from(k == 0 ? begin : (begin / kPieceSpan + k) * kPieceSpan, end);|return piece_from(k == 0 ? begin : (begin / kPieceSpan + k) * kPieceSpan, end + kPieceSpan);|the deterministic gather's pieces run past their run's end
csrc/tricubic/tricubic_math.h|for (int l = 0; l < 32; ++l) next[l] = v[l] + v[l ^ offset];|for (int l = 0; l < 32; ++l) next[l] = v[l] + v[l ^ (offset / 2)];|the host's lane tree pairs the wrong lanes
csrc/tricubic/tricubic_cpu.cpp|const unsigned keep = static_cast<unsigned>(b.inside >> j) & kGroupMask;|const unsigned keep = static_cast<unsigned>(b.inside >> (j + 1)) & kGroupMask;|a window of lanes stores the results of the lanes one along from those inside
csrc/tricubic/tricubic_math.h|return last < n && last / kPieceSpan == i / kPieceSpan && sorted_keys[last] == key;|return last < n && sorted_keys[last] == key;|the deterministic gather marks a piece long by its run alone, though the span cuts it short
csrc/absorption/absorption_math.h|  return capped_exponent(step / rho);|  return step / rho;|the layers' optical depth uncapped (an infinite one gives NaN)
csrc/absorption/absorption_scalars.h|  return gradient == 0.0 && factor == factor ? 0.0 : gradient * factor;|  return gradient * factor;|a zero gradient times an overflowed chain-rule factor (NaN)
csrc/absorption/absorption_math.h|  return select_(a > T(kMaxExponent), T(kMaxExponent), a);|  return select_(a < T(kMaxExponent), a, T(kMaxExponent));|the optical depth's cap sends NaN to 1e4
csrc/absorption/absorption_math.h|  if (t == 0) return T(0) - expm1_(T(0) - a);|  if (t < 0) return T(0) - expm1_(T(0) - a);|layer 0's capture without its own branch (exp(-0 a) is NaN at an infinite a)
EOF
)

check_only=0
[[ "${1:-}" == "--check" ]] && check_only=1

mapfile -t LINES < <(printf '%s\n' "$MUTANT_LIST")
TOTAL=${#LINES[@]}

field() {  # field LINE N
  printf '%s' "$1" | awk -F'|' -v n="$2" '{print $n}'
}

# Applies mutant text to FILE in place; fails unless ORIG occurs exactly once.
apply_mutant() {  # FILE ORIG NEW [--dry]
  python3 - "$@" <<'PY'
import sys
path, orig, new = sys.argv[1], sys.argv[2].replace("\\n", "\n"), sys.argv[3].replace("\\n", "\n")
dry = len(sys.argv) > 4
text = open(path).read()
count = text.count(orig)
if count != 1:
    sys.exit(f"mutant text found {count} times (must be once) in {path}: {sys.argv[2]!r}")
if not dry:
    open(path, "w").write(text.replace(orig, new))
PY
}

# Every mutant must still apply, to the working tree as it is now.
bad=0
for i in "${!LINES[@]}"; do
  line="${LINES[$i]}"
  if [[ $(awk -F'|' '{print NF}' <<<"$line") -ne 4 ]]; then
    echo "mutant $((i + 1)): not file|original|mutated|description: $line" >&2
    bad=1
    continue
  fi
  if ! apply_mutant "$ROOT/$(field "$line" 1)" "$(field "$line" 2)" "$(field "$line" 3)" --dry; then
    echo "mutant $((i + 1)) ($(field "$line" 4)) no longer applies" >&2
    bad=1
  fi
done
if [[ $bad -ne 0 ]]; then
  echo "mutants.sh: update the mutant list above to the current sources" >&2
  exit 2
fi
echo "mutants.sh: all $TOTAL mutants apply"
[[ $check_only -eq 1 ]] && exit 0

# A private copy of the working tree (mtimes kept, so that unchanged files
# do not rebuild).
rm -rf "$SRC"
mkdir -p "$SRC" "$BUILD"
(
  cd "$ROOT"
  git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [[ -e "$f" ]] && printf '%s\0' "$f"
  done | xargs -0 cp --parents -p -t "$SRC"
)
# The files the mutants change get a fresh mtime, so the unmutated build
# recompiles them: this copy gives them the working tree's (older) mtime,
# and the objects of an earlier run's last build still hold its last mutant
# (found when a run's baseline failed on mutant 21's swapped odet).
for line in "${LINES[@]}"; do touch "$SRC/$(field "$line" 1)"; done

if [[ ! -f "$BUILD/build.ninja" ]]; then
  cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    "-DCMAKE_CXX_FLAGS_RELEASE=$OPT_FLAGS" -DPython3_EXECUTABLE="$PYTHON" \
    -DNANOBRAGG_CUDA=OFF -DNANOBRAGG_WERROR=OFF -DNANOBRAGG_BUILD_BENCH=OFF \
    -DNANOBRAGG_BUILD_TESTS=ON >"$WORK/cmake.log" 2>&1 ||
    { tail -30 "$WORK/cmake.log"; echo "mutants.sh: cmake failed" >&2; exit 2; }
fi

build() { ninja -C "$BUILD" -j "$JOBS" nanobragg_tests >"$WORK/build.log" 2>&1; }

TESTS="$BUILD/tests/cpp/nanobragg_tests"
FILTER="*"
# The CPU kernels are built once per capability and one is chosen per
# process (ATEN_CPU_CAPABILITY): the suite runs with the best this machine
# has (native) and with the baseline loops (default), as CTest's
# cpu_baseline_isa_* entries do.
CAPABILITIES="${MUTANTS_CPU_CAPABILITIES:-native default}"
# Runs the suite; prints the failing tests' names; status 1 when one failed.
run_tests() {
  local log="$WORK/test.log" failed=0 cap status
  for cap in $CAPABILITIES; do
    status=0
    if [[ $cap == native ]]; then
      "$TESTS" --gtest_brief=1 "--gtest_filter=$FILTER" >"$log" 2>&1 || status=$?
    else
      ATEN_CPU_CAPABILITY=$cap "$TESTS" --gtest_brief=1 "--gtest_filter=$FILTER" >"$log" 2>&1 ||
        status=$?
    fi
    [[ $status -eq 0 ]] || failed=1
    # A run that stopped without GoogleTest's summary crashed (a signal, an
    # abort): no test names to list, so it is reported as CRASH.
    if [[ $status -ne 0 ]] && ! grep -q -E '^\[==========\] [0-9]+ tests? from .* ran' "$log"; then
      echo "CRASH(status $status)@$cap"
      continue
    fi
    grep -E '^\[  FAILED  \] [^ ]+' "$log" | grep -v ' listed below' | awk '{print $4}' |
      sort -u | tr -d ',' | sed "s/\$/@$cap/" || true
  done
  if [[ -n "${MUTANTS_PYTEST:-}" ]]; then
    # shellcheck disable=SC2086
    (cd "$SRC" && NANOBRAGG_OPS_LIBRARY="$BUILD/lib/libnanobragg_ops.so" \
      "$PYTHON" -m pytest -q -x -p no:cacheprovider $MUTANTS_PYTEST >"$WORK/pytest.log" 2>&1) ||
      { failed=1; echo "pytest: $(grep -m1 -E '^FAILED' "$WORK/pytest.log" || echo failed)"; }
  fi
  return $failed
}

# The unmutated tree: it must build, and the tests that fail without any
# mutant (someone's work in progress) are left out, loudly, so that they
# cannot count as catches.
echo "mutants.sh: building the unmutated tree in $BUILD"
build || { tail -30 "$WORK/build.log"; echo "mutants.sh: the unmutated tree does not build" >&2; exit 2; }
if ! baseline_failures=$(run_tests); then
  if grep -q CRASH <<<"$baseline_failures"; then
    # Every mutant would "fail" by the same crash and count as caught.
    echo "mutants.sh: the unmutated suite crashes (${baseline_failures//$'\n'/ }); see $WORK/test.log" >&2
    exit 2
  fi
  echo "mutants.sh: WARNING: these tests fail without any mutant and are left out:" >&2
  printf '  %s\n' $baseline_failures >&2
  if [[ -n "${MUTANTS_PYTEST:-}" ]] && grep -q -E '^FAILED|error' "$WORK/pytest.log"; then
    echo "mutants.sh: pytest fails without any mutant ($WORK/pytest.log)" >&2
    exit 2
  fi
  FILTER="*-$(printf '%s:' $baseline_failures | sed 's/@[a-z0-9]*:/:/g')"
fi

BACKUP="$(mktemp -d)"
current=""
restore() {
  if [[ -n "$current" ]]; then
    cp "$BACKUP/file" "$SRC/$current"  # a fresh mtime: the next build recompiles it
    current=""
  fi
}
trap 'restore; rm -rf "$BACKUP"' EXIT
trap 'exit 130' INT TERM

selected=()
if [[ -n "${MUTANTS:-}" ]]; then
  IFS=',' read -r -a selected <<<"$MUTANTS"
else
  for ((i = 1; i <= TOTAL; ++i)); do selected+=("$i"); done
fi

caught=0
ran=0
summary=()
for n in "${selected[@]}"; do
  line="${LINES[$((n - 1))]}"
  file="$(field "$line" 1)"
  desc="$(field "$line" 4)"
  cp -p "$SRC/$file" "$BACKUP/file"
  current="$file"
  apply_mutant "$SRC/$file" "$(field "$line" 2)" "$(field "$line" 3)" || exit 2
  ran=$((ran + 1))
  if ! build; then
    tail -20 "$WORK/build.log"
    echo "mutants.sh: mutant $n ($desc) does not compile; fix the mutant" >&2
    exit 2
  fi
  if failures=$(run_tests); then
    status="SURVIVED"
  else
    status="caught"
    caught=$((caught + 1))
  fi
  first="$(printf '%s\n' "$failures" | head -1)"
  nfail="$(printf '%s\n' "$failures" | grep -c . || true)"
  summary+=("$(printf '%2d  %-8s  %-58s  %s' "$n" "$status" "$desc" "${first:+by $first}${nfail:+ ($nfail failing)}")")
  echo "${summary[-1]}"
  restore
done

echo
echo "mutants.sh: $caught/$ran mutants caught ($(date -u +%Y-%m-%d), $(git -C "$ROOT" rev-parse --short HEAD))"
printf '%s\n' "${summary[@]}"
[[ $caught -eq $ran ]]
