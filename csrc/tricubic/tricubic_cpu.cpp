// CPU kernels of nanobragg::tricubic_interp and its backward. The per-point
// math is tricubic_math.h, the same code the CUDA kernels run.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_kernels.h"
#include "common/cpu_capability.h"
#include "common/point_offsets.h"
#include "tricubic/tricubic_layout.h"
#include "tricubic/tricubic_math.h"

#ifndef CPU_CAPABILITY
#error "compiled once per CPU capability by CMakeLists.txt (nanobragg_cpu_kernels), never alone"
#endif

// __builtin_shufflevector: Clang, and GCC from 12. Without it (GCC 11 and
// older) the kernels take one point per register, read coordinates lane by
// lane and spread weights element by element: slower, the same results.
#ifndef NANOBRAGG_HAVE_SHUFFLEVECTOR
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define NANOBRAGG_HAVE_SHUFFLEVECTOR 1
#endif
#endif
#endif
#ifndef NANOBRAGG_HAVE_SHUFFLEVECTOR
#define NANOBRAGG_HAVE_SHUFFLEVECTOR 0
#endif

NANOBRAGG_DECLARE_CPU_KERNELS(CPU_CAPABILITY)

namespace nanobragg {
namespace tricubic {
namespace CPU_CAPABILITY {
namespace {

constexpr const char* kForward = "nanobragg::tricubic_interp";
constexpr const char* kBackward = "nanobragg::tricubic_interp_backward";
constexpr const char* kDoubleBackward = "nanobragg::tricubic_interp_double_backward";

// Points per task of at::parallel_for: ~100 flops and 64 loads each.
constexpr int64_t kPointGrain = 512;

// GCC/Clang vector types (the attribute needs a concrete element type).
typedef float Float2 __attribute__((vector_size(8)));
typedef float Float4 __attribute__((vector_size(16)));
typedef float Float8 __attribute__((vector_size(32)));
typedef float Float16 __attribute__((vector_size(64)));
typedef double Double2 __attribute__((vector_size(16)));
typedef double Double4 __attribute__((vector_size(32)));
typedef double Double8 __attribute__((vector_size(64)));

// VectorOf<T, N>::type: the vector type of N elements of T above.
template <typename T, int N>
struct VectorOf {};
template <typename T>
struct VectorOf<T, 1> {  // one element: the scalar
  using type = T;
};
#define NANOBRAGG_VECTOR_OF(T, N, Type) \
  template <>                           \
  struct VectorOf<T, N> {               \
    using type = Type;                  \
  };
NANOBRAGG_VECTOR_OF(float, 2, Float2)
NANOBRAGG_VECTOR_OF(float, 4, Float4)
NANOBRAGG_VECTOR_OF(float, 8, Float8)
NANOBRAGG_VECTOR_OF(float, 16, Float16)
NANOBRAGG_VECTOR_OF(double, 2, Double2)
NANOBRAGG_VECTOR_OF(double, 4, Double4)
NANOBRAGG_VECTOR_OF(double, 8, Double8)
#undef NANOBRAGG_VECTOR_OF

// Points go through the kernels in batches of one vector's lanes (8 floats
// with AVX2, 16 with AVX-512). Where each point falls and its weights are
// computed for the whole batch at once with at::vec::Vectorized, by the same
// templates (tricubic_math.h) that the per-point path runs on scalars; then
// each point whose stencil is inside the grid has its 4x4x4 block contracted:
// where a register holds several points' rows (RowGroup: AVX2 floats,
// AVX-512), in windows of that many lanes, every such point through the one
// group call; else on its own (16 rows, each a short vector load:
// SimdTaps4). Points whose stencil leaves the grid, or that the batch test
// cannot decide, take the per-point path (tricubic_value, ...). A lane's
// arithmetic does not depend on its position in a batch, so neither do the
// results on how the points are split among threads.
//
// What a kernel needs of a batch besides the weights: their derivatives
// (the hkl gradient), the incoming gradient (both gradients), and what the
// grid gradient's scatter takes lane by lane (kScatter, with kGradOut).
enum LaneNeeds : int { kWeights = 0, kDerivatives = 1, kGradOut = 2, kScatter = 4 };

template <typename T, int kNeeds>
struct LaneBatch {
  using Vec = at::vec::Vectorized<T>;
  using Int = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  static constexpr int kLanes = Vec::size();
  static_assert(kLanes <= 64, "inside is a 64-bit mask");

  alignas(64) T x[3][kLanes];        // h, k, l
  alignas(64) T g[kLanes];           // incoming gradient (kGradOut)
  alignas(64) T w[3][4][kLanes];     // [axis][node][lane]
  alignas(64) T dw[3][4][kLanes];    // (kDerivatives)
  alignas(64) Int first[3][kLanes];  // stencil's first node per axis
  // kScatter: g w_h[a] (ScatterWeights::ga), w_k and w_l lane by lane (4
  // nodes each, one vector load), and the offset of the stencil's first node
  // in a contiguous grid (LaneBounds::node_stride; 0 outside the grid).
  alignas(64) T ga[4][kLanes];
  alignas(64) T kl_rows[2][kLanes][4];
  alignas(64) int64_t node_offset[kLanes];
  uint64_t inside = 0;  // bit j: lane j's stencil is in the grid

  bool is_inside(int j) const { return (inside >> j) & 1; }

  // Lane j's weights (or derivatives) along each axis, as 4-arrays.
  C10_ALWAYS_INLINE void lane_weights(const T (&table)[3][4][kLanes], int j, T out[3][4]) const {
    for (int d = 0; d < 3; ++d) {
      for (int c = 0; c < 4; ++c) out[d][c] = table[d][c][j];
    }
  }
  int64_t offset(int j, const int64_t stride[3]) const {
    return int64_t(first[0][j]) * stride[0] + int64_t(first[1][j]) * stride[1] +
           int64_t(first[2][j]) * stride[2];
  }
};

// stencil_interval per axis in T; NaN, which no lane passes, on an axis
// where the vector test would not be exact (stencil_interval): its points
// take the per-point path.
template <typename T>
struct LaneBounds {
  T first_x[3], end_x[3];
  int64_t node_stride[2];  // of h and k in a contiguous grid (l: 1)
};

template <typename T>
LaneBounds<T> lane_bounds(const int64_t size[3], const int64_t lo[3]) {
  LaneBounds<T> b;
  for (int d = 0; d < 3; ++d) {
    if (!stencil_interval<T>(lo[d], size[d], b.first_x[d], b.end_x[d])) {
      b.first_x[d] = b.end_x[d] = std::numeric_limits<T>::quiet_NaN();
    }
  }
  b.node_stride[0] = size[1] * size[2], b.node_stride[1] = size[2];
  return b;
}

#if NANOBRAGG_HAVE_SHUFFLEVECTOR
// Part m (of 4) of the transpose of {w0, w1, w2, w3} (N lanes each): node
// e % 4 of lane m N / 4 + e / 4 at element e, in three two-register
// shuffles.
template <int m, int N, typename V, int... E>
C10_ALWAYS_INLINE void transposed_part(const V& w0, const V& w1, const V& w2, const V& w3, V& out,
                                       std::integer_sequence<int, E...>) {
  const V w01 = __builtin_shufflevector(w0, w1, (m * N / 4 + E / 4 + (E % 4 == 1 ? N : 0))...);
  const V w23 = __builtin_shufflevector(w2, w3, (m * N / 4 + E / 4 + (E % 4 == 3 ? N : 0))...);
  out = __builtin_shufflevector(w01, w23, (E % 4 < 2 ? E : N + E)...);
}
#endif

// rows[j][c] = table[c][j]: one axis' weights lane by lane (4 vectors of N
// lanes into 4 vectors of N / 4 rows), for the scatter's planes.
template <typename T, int N>
C10_ALWAYS_INLINE void transpose_weights(const T (&table)[4][N], T (&rows)[N][4]) {
#if NANOBRAGG_HAVE_SHUFFLEVECTOR
  if constexpr (N % 4 == 0) {
    using V = typename VectorOf<T, N>::type;
    V w[4], out;
    for (int c = 0; c < 4; ++c) std::memcpy(&w[c], table[c], sizeof(V));
    constexpr auto elements = std::make_integer_sequence<int, N>{};
    transposed_part<0, N>(w[0], w[1], w[2], w[3], out, elements);
    std::memcpy(&rows[0][0], &out, sizeof(V));
    transposed_part<1, N>(w[0], w[1], w[2], w[3], out, elements);
    std::memcpy(&rows[N / 4][0], &out, sizeof(V));
    transposed_part<2, N>(w[0], w[1], w[2], w[3], out, elements);
    std::memcpy(&rows[N / 2][0], &out, sizeof(V));
    transposed_part<3, N>(w[0], w[1], w[2], w[3], out, elements);
    std::memcpy(&rows[3 * N / 4][0], &out, sizeof(V));
    return;
  }
#endif
  for (int j = 0; j < N; ++j) {
    for (int c = 0; c < 4; ++c) rows[j][c] = table[c][j];
  }
}

// Fills the batch's weights, first nodes and inside mask from x.
template <typename T, int kNeeds>
C10_ALWAYS_INLINE void locate_lanes(LaneBatch<T, kNeeds>& b, const LaneBounds<T>& bounds,
                                    int count) {
  using Batch = LaneBatch<T, kNeeds>;
  using Vec = typename Batch::Vec;
  constexpr int kLanes = Batch::kLanes;
  Vec in_grid;
  for (int d = 0; d < 3; ++d) {
    const Vec x = Vec::loadu(b.x[d]);
    const Vec lower(bounds.first_x[d]);
    const Vec n = x.floor();
    const Vec u = x - n;  // exact, as locate_stencil's
    Vec w[4];
    lagrange_weights(u, w);
    for (int c = 0; c < 4; ++c) w[c].store(b.w[d][c]);
    if constexpr ((kNeeds & kScatter) != 0) {
      if (d == 0) {
        const Vec g = Vec::loadu(b.g);
        for (int c = 0; c < 4; ++c) (g * w[c]).store(b.ga[c]);
      } else {
        transpose_weights<T, kLanes>(b.w[d], b.kl_rows[d - 1]);
      }
    }
    if constexpr ((kNeeds & kDerivatives) != 0) {
      Vec dw[4];
      lagrange_weight_derivs(u, dw);
      for (int c = 0; c < 4; ++c) dw[c].store(b.dw[d][c]);
    }
    const Vec axis_in = (x >= lower) & (x < Vec(bounds.end_x[d]));
    in_grid = d == 0 ? axis_in : (in_grid & axis_in);
    // n - lower is an exact integer below the axis' size, and below 2^24
    // for float (lane_bounds), in the lanes inside the grid; the others
    // convert 0, not NaN or a huge value (undefined in C++).
    at::vec::convert_to_int_of_same_size(Vec::blendv(Vec(T(0)), n - lower, axis_in))
        .store(b.first[d]);
  }
  if constexpr ((kNeeds & kScatter) != 0) {
    for (int j = 0; j < kLanes; ++j) {
      b.node_offset[j] = int64_t(b.first[0][j]) * bounds.node_stride[0] +
                         int64_t(b.first[1][j]) * bounds.node_stride[1] + int64_t(b.first[2][j]);
    }
  }
  const uint64_t all = count >= 64 ? ~uint64_t(0) : (uint64_t(1) << count) - 1;
  const uint64_t outside = static_cast<uint64_t>(static_cast<uint32_t>(in_grid.zero_mask()));
  b.inside = ~outside & all & (kLanes >= 64 ? ~uint64_t(0) : (uint64_t(1) << kLanes) - 1);
}

// The common layouts, read a whole batch at a time: no gather point by
// point, and no single-lane stores that the batch's vector loads would have
// to wait for. hkl a contiguous [N, 3]; grad_output contiguous or expanded
// from one value (what `.sum().backward()` passes). Null: point by point.
template <typename T>
struct DirectLayout {
  const T* hkl = nullptr;   // point p's (h, k, l) at hkl + 3 p
  const T* grad = nullptr;  // point p's incoming gradient at grad + grad_step p
  int64_t grad_step = 0;
};

template <typename T, int N>
DirectLayout<T> direct_layout(const at::Tensor& hkl, const at::Tensor* grad,
                              const PointOffsets<N>& offsets) {
  DirectLayout<T> d;
  if (offsets.ndim != 1) return d;
  if (offsets.strides[0][0] == 3 && hkl.stride(-1) == 1) d.hkl = hkl.const_data_ptr<T>();
  if constexpr (N >= 2) {
    if (grad != nullptr && (offsets.strides[1][0] == 0 || offsets.strides[1][0] == 1)) {
      d.grad = grad->const_data_ptr<T>();
      d.grad_step = offsets.strides[1][0];
    }
  }
  return d;
}

#if (defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)) && NANOBRAGG_HAVE_SHUFFLEVECTOR
// Coordinate d of N points stored (h, k, l), (h, k, l), ... in a, b, c:
// elements 3 j + d of their concatenation, in two two-register permutes.
template <int d, int N, typename V, int... J>
C10_ALWAYS_INLINE void coordinate_of(const V& a, const V& b, const V& c, V& out,
                                     std::integer_sequence<int, J...>) {
  const V ab = __builtin_shufflevector(a, b, (3 * J + d < 2 * N ? 3 * J + d : 0)...);
  out = __builtin_shufflevector(ab, c, (3 * J + d < 2 * N ? J : 3 * J + d - N)...);
}

// A full batch's coordinates from a contiguous [N, 3] (DirectLayout::hkl).
template <typename T, int kLanes>
C10_ALWAYS_INLINE void load_lane_coords(const T* hkl, T (&x)[3][kLanes]) {
  using V = typename VectorOf<T, kLanes>::type;
  V a, b, c, out;
  std::memcpy(&a, hkl, sizeof(V));
  std::memcpy(&b, hkl + kLanes, sizeof(V));
  std::memcpy(&c, hkl + 2 * kLanes, sizeof(V));
  constexpr auto lanes = std::make_integer_sequence<int, kLanes>{};
  coordinate_of<0, kLanes>(a, b, c, out, lanes);
  std::memcpy(x[0], &out, sizeof(V));
  coordinate_of<1, kLanes>(a, b, c, out, lanes);
  std::memcpy(x[1], &out, sizeof(V));
  coordinate_of<2, kLanes>(a, b, c, out, lanes);
  std::memcpy(x[2], &out, sizeof(V));
}
constexpr bool kDirectLoads = true;
#else
template <typename T, int kLanes>
void load_lane_coords(const T*, T (&)[3][kLanes]) {}
constexpr bool kDirectLoads = false;
#endif

// For each point p in [begin, end): coords(p, h, k, l) reads its
// coordinates (and grad(p) its incoming gradient, for kGradOut); then
// stencil(p, j, batch) runs for a point whose stencil is inside the grid
// (lane j of the batch), per_point(p, h, k, l) for the others.
// With `group` (kGroup > 1), lanes go in windows of kGroup, j a multiple of
// kGroup: group(p, j, batch, keep) runs for each window with a stencil
// inside the grid, storing the results of the lanes j + q with bit q of
// keep set (those inside), and per_point for the window's other lanes.
// With `after_batch`, after_batch(batch) runs after each batch's lanes (the
// grid gradient's scatter of its inside lanes, in one loop).
struct NoGroups {};
struct NoBatchHook {};

template <typename T, int kNeeds, int kGroup = 1, typename CoordsFn, typename GradFn,
          typename StencilFn, typename PointFn, typename GroupFn = NoGroups,
          typename BatchFn = NoBatchHook>
C10_ALWAYS_INLINE void for_each_point_in_lanes(
    int64_t begin, int64_t end, const LaneBounds<T>& bounds, const DirectLayout<T>& direct,
    const CoordsFn& coords, const GradFn& grad, const StencilFn& stencil, const PointFn& per_point,
    const GroupFn& group = GroupFn(), const BatchFn& after_batch = BatchFn()) {
  static_assert(kGroup > 1 || std::is_same_v<GroupFn, NoGroups>, "a group is 2 or more lanes");
  using Batch = LaneBatch<T, kNeeds>;
  Batch b;
  constexpr int kLanes = Batch::kLanes;
  constexpr bool kGrad = (kNeeds & kGradOut) != 0;
  for (int64_t i = begin; i < end; i += kLanes) {
    const int count = static_cast<int>(std::min<int64_t>(kLanes, end - i));
    const bool full = count == kLanes;
    if (kDirectLoads && full && direct.hkl != nullptr) {
      load_lane_coords<T, kLanes>(direct.hkl + 3 * i, b.x);
    } else {
      for (int j = 0; j < kLanes; ++j) {
        if (j < count) {
          coords(i + j, b.x[0][j], b.x[1][j], b.x[2][j]);
        } else {
          b.x[0][j] = b.x[1][j] = b.x[2][j] = T(0);
        }
      }
    }
    if constexpr (kGrad) {
      if (full && direct.grad != nullptr) {
        const auto g = direct.grad_step == 0 ? typename Batch::Vec(direct.grad[0])
                                             : Batch::Vec::loadu(direct.grad + i);
        g.store(b.g);
      } else {
        for (int j = 0; j < kLanes; ++j) b.g[j] = j < count ? grad(i + j) : T(0);
      }
    }
    locate_lanes(b, bounds, count);
    if constexpr (!std::is_same_v<GroupFn, NoGroups>) {
      // The lanes in windows of kGroup: one group call for each window with
      // a lane inside, storing the inside lanes' results (the others compute
      // values no one reads, from a block that is in the grid all the same:
      // locate_lanes puts an axis that a lane leaves at node 0, and a grid
      // with a stencil inside has 4 nodes or more on each axis); per_point
      // for the rest. Every inside point thus goes through the group's
      // arithmetic, never a single-point path that a compiler may fuse
      // into multiply-adds differently (g++ 13.3 did). One caveat: the
      // group is compiled twice, for a window whose lanes share one block
      // and for one whose lanes do not (with_group_blocks), the same
      // arithmetic after different loads; the bitwise tests run at every
      // capability, and gpu_check.sh under the GPU image's compiler.
      static_assert(kLanes % kGroup == 0, "whole windows");
      constexpr unsigned kGroupMask = (1u << kGroup) - 1;
      for (int j = 0; j < count; j += kGroup) {
        const unsigned keep = static_cast<unsigned>(b.inside >> j) & kGroupMask;
        if (keep != 0) group(i + j, j, b, keep);
        for (int q = 0; keep != kGroupMask && q < kGroup && j + q < count; ++q) {
          if (((keep >> q) & 1u) == 0)
            per_point(i + j + q, b.x[0][j + q], b.x[1][j + q], b.x[2][j + q]);
        }
      }
    } else {
      for (int j = 0; j < count; ++j) {
        if (b.is_inside(j)) {
          stencil(i + j, j, b);
        } else {
          per_point(i + j, b.x[0][j], b.x[1][j], b.x[2][j]);
        }
      }
    }
    if constexpr (!std::is_same_v<BatchFn, NoBatchHook>) after_batch(b);
  }
}

// Taps4 (tricubic_math.h) in one vector register: 4 floats (SSE), 4 doubles
// (AVX2, or two SSE registers). The compilers do not vectorise Taps4's
// 4-element loops themselves; the arithmetic per element is the same.
template <typename T>
struct SimdTaps4 {
  using V = typename VectorOf<T, 4>::type;
  static_assert(sizeof(V) == 4 * sizeof(T), "float or double");
  V v;

  static C10_ALWAYS_INLINE SimdTaps4 zero() { return SimdTaps4{V{}}; }
  template <bool kUnitL>
  static C10_ALWAYS_INLINE SimdTaps4 load(const T* row, const int64_t stride[3]) {
    SimdTaps4 r;
    if constexpr (kUnitL) {
      std::memcpy(&r.v, row, sizeof(V));
    } else {
      const int64_t sl = stride[2];
      r.v = V{row[0], row[sl], row[2 * sl], row[3 * sl]};
    }
    return r;
  }
  C10_ALWAYS_INLINE void add_scaled(T w, const SimdTaps4& r) { v += w * r.v; }

  // Summed from +0, one product per addition: with contraction on, each
  // step is one multiply-add, the same wherever this is inlined (in a sum of
  // two products the compiler may fuse either one, and did differently in
  // different kernels). RowGroup's dots sum in the same order.
  C10_ALWAYS_INLINE T dot(const T w[4]) const {
    T s = T(0);
    s += w[0] * v[0];
    s += w[1] * v[1];
    s += w[2] * v[2];
    s += w[3] * v[3];
    return s;
  }
};

// Rows of several points side by side in one register: with AVX-512, 4
// points' rows of 4 floats (or 2 points' rows of 4 doubles) fill a 512-bit
// register, so the 20 multiply-adds of contract_stencil cover 4 points and
// the weights of consecutive lanes are read as one vector. Each element
// goes through the same operations, in the same order, as in SimdTaps4 (and
// the dot in Taps4::dot's form); but which products a compiler fuses into
// multiply-adds may differ between the two (g++ 13.3 fused them
// differently), so where groups exist every inside point goes through them,
// a window's outside lanes computed and not stored (for_each_point_in_lanes).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kRegisterBytes = 64;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kRegisterBytes = 32;
#else
constexpr int kRegisterBytes = 16;
#endif

// The row type of the single-point stencil paths: SimdTaps4, one register,
// where 4 elements fit in one; else (doubles without AVX) Taps4's plain
// arrays, since a vector type wider than the registers is what GCC lowers
// through the stack (the float64 forward took 3 times the float32 one).
template <typename T>
using StencilTaps =
    std::conditional_t<(4 * int(sizeof(T)) > kRegisterBytes), Taps4<T>, SimdTaps4<T>>;

template <typename T>
struct RowGroup {
  static constexpr int kPoints =
      NANOBRAGG_HAVE_SHUFFLEVECTOR ? std::max<int>(1, kRegisterBytes / int(4 * sizeof(T))) : 1;
  static constexpr bool kEnabled = kPoints > 1;
  static constexpr unsigned kAllPoints = (1u << kPoints) - 1;  // a `keep` mask
  using V = typename VectorOf<T, 4 * kPoints>::type;           // kPoints rows of 4 taps
  using PerPoint = typename VectorOf<T, kPoints>::type;        // one value per point

  // Row `offset` of each point's block (block[i] + offset), side by side.
  template <bool kUnitL>
  static C10_ALWAYS_INLINE V load_rows(const T* const block[kPoints], int64_t offset,
                                       const int64_t stride[3]) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float> && kPoints == 4 && kUnitL) {
      // Two 256-bit inserts from memory (any of three ports) and one 512-bit
      // one: the generic form takes three 512-bit shuffles, which all
      // compete with the multiply-adds for one port.
      const __m256 r01 =
          _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(block[0] + offset)),
                               _mm_loadu_ps(block[1] + offset), 1);
      const __m256 r23 =
          _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(block[2] + offset)),
                               _mm_loadu_ps(block[3] + offset), 1);
      const __m512 r = _mm512_insertf32x8(_mm512_castps256_ps512(r01), r23, 1);
      V v;
      std::memcpy(&v, &r, sizeof(v));
      return v;
    }
#endif
#if NANOBRAGG_HAVE_SHUFFLEVECTOR
    using Row = typename SimdTaps4<T>::V;
    const Row r0 = SimdTaps4<T>::template load<kUnitL>(block[0] + offset, stride).v;
    const Row r1 = SimdTaps4<T>::template load<kUnitL>(block[1] + offset, stride).v;
    if constexpr (kPoints == 2) {
      return __builtin_shufflevector(r0, r1, 0, 1, 2, 3, 4, 5, 6, 7);
    } else {
      const Row r2 = SimdTaps4<T>::template load<kUnitL>(block[2] + offset, stride).v;
      const Row r3 = SimdTaps4<T>::template load<kUnitL>(block[3] + offset, stride).v;
      const Float8 r01 = __builtin_shufflevector(r0, r1, 0, 1, 2, 3, 4, 5, 6, 7);
      const Float8 r23 = __builtin_shufflevector(r2, r3, 0, 1, 2, 3, 4, 5, 6, 7);
      return __builtin_shufflevector(r01, r23, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
                                     15);
    }
#else
    V r;
    for (int i = 0; i < kPoints; ++i) {
      const auto row = SimdTaps4<T>::template load<kUnitL>(block[i] + offset, stride).v;
      for (int c = 0; c < 4; ++c) r[4 * i + c] = row[c];
    }
    return r;
#endif
  }
  // Row `offset` of one block, repeated for every point (the group's points
  // share their block): one broadcast load, where load_rows takes a load per
  // point and shuffles; every element the value load_rows would give.
  template <bool kUnitL>
  static C10_ALWAYS_INLINE V load_shared_rows(const T* block, int64_t offset,
                                              const int64_t stride[3]) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float> && kPoints == 4 && kUnitL) {
      const __m512 r = _mm512_broadcast_f32x4(_mm_loadu_ps(block + offset));
      V v;
      std::memcpy(&v, &r, sizeof(v));
      return v;
    } else if constexpr (std::is_same_v<T, double> && kPoints == 2 && kUnitL) {
      const __m512d r = _mm512_broadcast_f64x4(_mm256_loadu_pd(block + offset));
      V v;
      std::memcpy(&v, &r, sizeof(v));
      return v;
    }
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float> && kPoints == 2 && kUnitL) {
      const __m256 r = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(block + offset));
      V v;
      std::memcpy(&v, &r, sizeof(v));
      return v;
    }
#endif
    const auto row = SimdTaps4<T>::template load<kUnitL>(block + offset, stride).v;
    V r;
    for (int i = 0; i < 4 * kPoints; ++i) r[i] = row[i % 4];
    return r;
  }
  // load_shared_rows where the points share block[0], else load_rows.
  template <bool kShared, bool kUnitL>
  static C10_ALWAYS_INLINE V rows(const T* const block[kPoints], int64_t offset,
                                  const int64_t stride[3]) {
    if constexpr (kShared) {
      return load_shared_rows<kUnitL>(block[0], offset, stride);
    } else {
      return load_rows<kUnitL>(block, offset, stride);
    }
  }
  // Whether every point of the group has the same block.
  static C10_ALWAYS_INLINE bool shared_block(const T* const block[kPoints]) {
    bool same = true;
    for (int i = 1; i < kPoints; ++i) same &= block[i] == block[0];
    return same;
  }
  // kPoints consecutive lanes' values, one per point.
  static C10_ALWAYS_INLINE PerPoint load_points(const T* lanes) {
    PerPoint x;
    std::memcpy(&x, lanes, sizeof(x));
    return x;
  }
  // Each point's value repeated over its row: {x0, x0, x0, x0, x1, ...}.
  // (One permute of a register loaded from the lanes; written with the
  // intrinsics because the compilers widen the generic form through memory.)
  static C10_ALWAYS_INLINE V spread(const T* lanes) {
    V r;
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float> && kPoints == 4) {
      const __m512i index = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
      const __m512 x = _mm512_castps128_ps512(_mm_loadu_ps(lanes));
      const __m512 y = _mm512_permutexvar_ps(index, x);
      std::memcpy(&r, &y, sizeof(r));
      return r;
    } else if constexpr (std::is_same_v<T, double> && kPoints == 2) {
      const __m512i index = _mm512_setr_epi64(0, 0, 0, 0, 1, 1, 1, 1);
      const __m512d x = _mm512_castpd128_pd512(_mm_loadu_pd(lanes));
      const __m512d y = _mm512_permutexvar_pd(index, x);
      std::memcpy(&r, &y, sizeof(r));
      return r;
    }
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float> && kPoints == 2) {
      const __m256 y = _mm256_set_m128(_mm_broadcast_ss(lanes + 1), _mm_broadcast_ss(lanes));
      std::memcpy(&r, &y, sizeof(r));
      return r;
    }
#endif
    for (int i = 0; i < 4 * kPoints; ++i) r[i] = lanes[i / 4];
    return r;
  }
  // Tap c of each point's row.
  template <int c>
  static C10_ALWAYS_INLINE PerPoint tap(const V& v) {
#if NANOBRAGG_HAVE_SHUFFLEVECTOR
    if constexpr (kPoints == 2) {
      return __builtin_shufflevector(v, v, c, 4 + c);
    } else {
      return __builtin_shufflevector(v, v, c, 4 + c, 8 + c, 12 + c);
    }
#else
    PerPoint r;
    for (int i = 0; i < kPoints; ++i) r[i] = v[4 * i + c];
    return r;
#endif
  }
  // sum_c w_c v_c per point, in Taps4::dot's order; w: the batch's 4 weight
  // arrays [c][lane], from the group's first lane.
  static C10_ALWAYS_INLINE PerPoint dot(const V& v, const T* w0, const T* w1, const T* w2,
                                        const T* w3) {
    PerPoint s = PerPoint{};
    s += load_points(w0) * tap<0>(v);
    s += load_points(w1) * tap<1>(v);
    s += load_points(w2) * tap<2>(v);
    s += load_points(w3) * tap<3>(v);
    return s;
  }

  // Three dots per point at once, in dot's order: {x . w, y . w, z . dw} of
  // each point, times its scale, stored point by point (3 values each) at
  // out, for the points with their bit of keep set. One register holds tap
  // c of the three rows of every point, so the 12 dots of 4 float points
  // take 4 multiply-adds and no per-point shuffles.
  static C10_ALWAYS_INLINE void dots_of_three(const V& x, const V& y, const V& z,
                                              const T* const w[4], const T* const dw[4],
                                              const T* scale, unsigned keep, T* out) {
    using Lanes = std::make_integer_sequence<int, 4 * kPoints>;
    V wc[4], tc[4];
    for (int c = 0; c < 4; ++c)
      wc[c] = first_first_second(load_low(w[c]), load_low(dw[c]), Lanes{});
    taps_of_three(x, y, z, tc, Lanes{});
    V d = V{};
    for (int c = 0; c < 4; ++c) d += wc[c] * tc[c];
    const V s = load_low(scale);
    const V r = interleave(first_first_second(s, s, Lanes{}) * d, Lanes{});
    if (keep == kAllPoints) {
      store_first_three(out, r);
    } else {
      store_kept(out, r, 3, keep);
    }
  }
  // The `per` values of each point (point i's at per i of `values`) into
  // out + per i, for the points with bit i of keep set.
  template <typename Values>
  static C10_ALWAYS_INLINE void store_kept(T* out, const Values& values, int per, unsigned keep) {
    T all[sizeof(Values) / sizeof(T)];
    std::memcpy(all, &values, sizeof(values));
    for (int i = 0; i < kPoints; ++i) {
      if ((keep >> i) & 1u) std::memcpy(out + per * i, all + per * i, per * sizeof(T));
    }
  }

 private:
  // kPoints values from p in the low lanes of a register, the others
  // unspecified (intrinsics: the compilers widen a short vector through
  // memory, and the store forwarding that defeats costs more than a dot).
  static C10_ALWAYS_INLINE V load_low(const T* p) {
    V r;
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float> && kPoints == 4) {
      const __m512 v = _mm512_castps128_ps512(_mm_loadu_ps(p));
      std::memcpy(&r, &v, sizeof(r));
      return r;
    } else if constexpr (std::is_same_v<T, double> && kPoints == 2) {
      const __m512d v = _mm512_castpd128_pd512(_mm_loadu_pd(p));
      std::memcpy(&r, &v, sizeof(r));
      return r;
    }
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float> && kPoints == 2) {
      const __m256 v = _mm256_castps128_ps256(
          _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
      std::memcpy(&r, &v, sizeof(r));
      return r;
    }
#endif
    r = V{};
    for (int i = 0; i < kPoints; ++i) r[i] = p[i];
    return r;
  }
  // The first 3 kPoints values of v at out.
  static C10_ALWAYS_INLINE void store_first_three(T* out, const V& v) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float> && kPoints == 4) {
      _mm512_mask_storeu_ps(out, __mmask16(0x0FFF), __m512(v));
      return;
    } else if constexpr (std::is_same_v<T, double> && kPoints == 2) {
      _mm512_mask_storeu_pd(out, __mmask8(0x3F), __m512d(v));
      return;
    }
#endif
    std::memcpy(out, &v, 3 * kPoints * sizeof(T));
  }
#if NANOBRAGG_HAVE_SHUFFLEVECTOR
  // {a, a, b, (unused)}, kPoints elements each, from a and b's low lanes.
  template <int... I>
  static C10_ALWAYS_INLINE V first_first_second(const V& a, const V& b,
                                                std::integer_sequence<int, I...>) {
    constexpr int n = kPoints, w = 4 * kPoints;
    return __builtin_shufflevector(a, b, (I < 2 * n ? I % n : I < 3 * n ? w + I - 2 * n : 0)...);
  }
  // out[c]: {tap c of x's rows, of y's, of z's, (unused)}.
  template <int c, int... I>
  static C10_ALWAYS_INLINE V tap_of_three(const V& x, const V& y, const V& z,
                                          std::integer_sequence<int, I...>) {
    constexpr int n = kPoints, w = 4 * kPoints;
    const V xy = __builtin_shufflevector(x, y,
                                         (I < n       ? 4 * I + c
                                          : I < 2 * n ? w + 4 * (I - n) + c
                                                      : 0)...);
    return __builtin_shufflevector(xy, z,
                                   (I < 2 * n   ? I
                                    : I < 3 * n ? w + 4 * (I - 2 * n) + c
                                                : 0)...);
  }
  template <typename Lanes>
  static C10_ALWAYS_INLINE void taps_of_three(const V& x, const V& y, const V& z, V out[4],
                                              Lanes lanes) {
    out[0] = tap_of_three<0>(x, y, z, lanes);
    out[1] = tap_of_three<1>(x, y, z, lanes);
    out[2] = tap_of_three<2>(x, y, z, lanes);
    out[3] = tap_of_three<3>(x, y, z, lanes);
  }
  // {x0, y0, z0, x1, y1, z1, ...} from {x..., y..., z..., (unused)}.
  template <int... I>
  static C10_ALWAYS_INLINE V interleave(const V& v, std::integer_sequence<int, I...>) {
    constexpr int n = kPoints;
    return __builtin_shufflevector(v, v, (I < 3 * n ? (I % 3) * n + I / 3 : 0)...);
  }
#else
  template <typename Lanes>
  static V first_first_second(const V& a, const V& b, Lanes) {
    V r{};
    for (int i = 0; i < 3 * kPoints; ++i) r[i] = i < 2 * kPoints ? a[i % kPoints] : b[i % kPoints];
    return r;
  }
  template <typename Lanes>
  static void taps_of_three(const V& x, const V& y, const V& z, V out[4], Lanes) {
    for (int c = 0; c < 4; ++c) {
      out[c] = V{};
      for (int i = 0; i < kPoints; ++i) {
        out[c][i] = x[4 * i + c], out[c][kPoints + i] = y[4 * i + c];
        out[c][2 * kPoints + i] = z[4 * i + c];
      }
    }
  }
  template <typename Lanes>
  static V interleave(const V& v, Lanes) {
    V r{};
    for (int i = 0; i < 3 * kPoints; ++i) r[i] = v[(i % 3) * kPoints + i / 3];
    return r;
  }
#endif
};

// contract_stencil for the kPoints points of lanes j, j + 1, ... of a batch,
// into out[i] for the points with bit i of keep set; kShared: all in one
// block.
template <typename T, bool kUnitL, bool kShared, int kNeeds>
C10_ALWAYS_INLINE void contract_group_rows(const LaneBatch<T, kNeeds>& b, int j,
                                           const T* const block[], const int64_t stride[3],
                                           unsigned keep, T* out) {
  using G = RowGroup<T>;
  using V = typename G::V;
  V wk[4];
  for (int c = 0; c < 4; ++c) wk[c] = G::spread(&b.w[1][c][j]);
  V acc = V{};
  for (int a = 0; a < 4; ++a) {
    V plane = V{};
    for (int c = 0; c < 4; ++c) {
      plane +=
          wk[c] * G::template rows<kShared, kUnitL>(block, a * stride[0] + c * stride[1], stride);
    }
    acc += G::spread(&b.w[0][a][j]) * plane;
  }
  const typename G::PerPoint value =
      G::dot(acc, &b.w[2][0][j], &b.w[2][1][j], &b.w[2][2][j], &b.w[2][3][j]);
  if (keep == G::kAllPoints) {
    std::memcpy(out, &value, sizeof(value));
  } else {
    G::store_kept(out, value, 1, keep);
  }
}

// Consecutive detector lookups mostly share their block (the bench's 512²
// detector: runs of 12.6 points with the same first node on average), and
// a group whose points all do reads each row once, broadcast to every
// point: the same values in the same operations, so the same result to the
// bit, with a quarter of the loads and none of the shuffles that put 4 rows
// side by side. rows(shared, block) runs with the blocks of the kPoints points
// of lanes j, j + 1, ... and shared an integral_constant: whether they are
// all one block.
template <typename T, int kNeeds, typename RowsFn>
C10_ALWAYS_INLINE void with_group_blocks(const LaneBatch<T, kNeeds>& b, int j, const T* data,
                                         const int64_t stride[3], const RowsFn& rows) {
  using G = RowGroup<T>;
  const T* block[G::kPoints];
  for (int i = 0; i < G::kPoints; ++i) block[i] = data + b.offset(j + i, stride);
  if (G::shared_block(block)) {
    rows(std::true_type{}, block);
  } else {
    rows(std::false_type{}, block);
  }
}

template <typename T, bool kUnitL, int kNeeds>
C10_ALWAYS_INLINE void contract_group(const LaneBatch<T, kNeeds>& b, int j, const T* data,
                                      const int64_t stride[3], unsigned keep, T* out) {
  with_group_blocks(
      b, j, data, stride, [&](auto shared, const T* const block[]) NANOBRAGG_LAMBDA_INLINE {
        contract_group_rows<T, kUnitL, decltype(shared)::value>(b, j, block, stride, keep, out);
      });
}

// tricubic_hkl_grad_stencil (contract_stencil_grad's arithmetic) for the
// kPoints points of lanes j, j + 1, ...: grad_out dF/dhkl of point j + i
// into grad_hkl[3 i .. 3 i + 2], for bit i of keep set; kShared: all in one
// block.
template <typename T, bool kUnitL, bool kShared, int kNeeds>
C10_ALWAYS_INLINE void hkl_grad_group_rows(const LaneBatch<T, kNeeds>& b, int j,
                                           const T* const block[], const int64_t stride[3],
                                           const T* grad_out, unsigned keep, T* grad_hkl) {
  using G = RowGroup<T>;
  using V = typename G::V;
  V wk[4], dwk[4];
  for (int c = 0; c < 4; ++c) {
    wk[c] = G::spread(&b.w[1][c][j]);
    dwk[c] = G::spread(&b.dw[1][c][j]);
  }
  V acc = V{}, acc_h = V{}, acc_k = V{};
  // (Unrolled: GCC kept it a loop, and the hkl gradient alone took 7% longer.)
  NANOBRAGG_UNROLL
  for (int a = 0; a < 4; ++a) {
    V plane = V{}, plane_k = V{};
    for (int c = 0; c < 4; ++c) {
      const V r = G::template rows<kShared, kUnitL>(block, a * stride[0] + c * stride[1], stride);
      plane += wk[c] * r;
      plane_k += dwk[c] * r;
    }
    const V wh = G::spread(&b.w[0][a][j]);
    acc += wh * plane;
    acc_h += G::spread(&b.dw[0][a][j]) * plane;
    acc_k += wh * plane_k;
  }
  const T* const wl[4] = {&b.w[2][0][j], &b.w[2][1][j], &b.w[2][2][j], &b.w[2][3][j]};
  const T* const dwl[4] = {&b.dw[2][0][j], &b.dw[2][1][j], &b.dw[2][2][j], &b.dw[2][3][j]};
  G::dots_of_three(acc_h, acc_k, acc, wl, dwl, grad_out, keep, grad_hkl);
}
// A group whose points share their block reads each row once, as
// contract_group does: the same results to the bit; with AVX-512 floats the
// hkl gradient alone 6% faster, both gradients 3% (the bench's 512²).
template <typename T, bool kUnitL, int kNeeds>
C10_ALWAYS_INLINE void hkl_grad_group(const LaneBatch<T, kNeeds>& b, int j, const T* data,
                                      const int64_t stride[3], const T* grad_out, unsigned keep,
                                      T* grad_hkl) {
  with_group_blocks(b, j, data, stride,
                    [&](auto shared, const T* const block[]) NANOBRAGG_LAMBDA_INLINE {
                      hkl_grad_group_rows<T, kUnitL, decltype(shared)::value>(
                          b, j, block, stride, grad_out, keep, grad_hkl);
                    });
}

// A row of 4 taps added at dest + r (g wl[c] at r + c), in one vector.
template <typename T>
C10_ALWAYS_INLINE void add_row_simd(T* dest, int64_t r, T g, const T wl[4]) {
  using V = typename SimdTaps4<T>::V;
  V d, w;
  std::memcpy(&d, dest + r, sizeof(V));
  std::memcpy(&w, wl, sizeof(V));
  d += g * w;
  std::memcpy(dest + r, &d, sizeof(V));
}

// One h-plane of a 4x4x4 block, taps (b, c) at 4 b + c, in the widest
// registers the capability has: one with AVX-512 floats, two with AVX2 floats
// or AVX-512 doubles, four with AVX2 doubles, four or eight with SSE. (GCC
// lowers a vector type wider than the registers through the stack, a few
// elements at a time: as one 16-element vector, the AVX2 grid gradient took
// 2.7 forwards, the AVX-512 one 1.0.)
template <typename T>
struct Plane {
  static constexpr int kWidth = std::min<int>(16, kRegisterBytes / int(sizeof(T)));
  static constexpr int kParts = 16 / kWidth;
  using Part = typename VectorOf<T, kWidth>::type;
  using Row = typename SimdTaps4<T>::V;  // 4 taps along l
  Part part[kParts];                     // elements kWidth i .. kWidth (i + 1) - 1

  C10_ALWAYS_INLINE Plane& operator+=(const Plane& o) {
    for (int i = 0; i < kParts; ++i) part[i] += o.part[i];
    return *this;
  }
  // this += s o, element by element (a multiply-add each)
  C10_ALWAYS_INLINE void add_scaled(T s, const Plane& o) {
    for (int i = 0; i < kParts; ++i) part[i] += s * o.part[i];
  }
  C10_ALWAYS_INLINE Plane operator*(const Plane& o) const {
    Plane r;
    for (int i = 0; i < kParts; ++i) r.part[i] = part[i] * o.part[i];
    return r;
  }
  // d += taps (b, 0..3), elements 4 b .. 4 b + 3. (Not a Row returned: a
  // 32-byte vector by value changes the ABI without AVX, and GCC says so.)
  template <int b>
  C10_ALWAYS_INLINE void add_row_to(Row& d) const {
#if NANOBRAGG_HAVE_SHUFFLEVECTOR
    if constexpr (kWidth == 2) {
      d += __builtin_shufflevector(part[2 * b], part[2 * b + 1], 0, 1, 2, 3);
    } else if constexpr (kWidth == 4) {
      d += part[b];
    } else {
      constexpr int q = 4 * b / kWidth, o = 4 * b % kWidth;
      d += __builtin_shufflevector(part[q], part[q], o, o + 1, o + 2, o + 3);
    }
#else
    for (int c = 0; c < 4; ++c) d[c] += part[(4 * b + c) / kWidth][(4 * b + c) % kWidth];
#endif
  }
};

// A lane's grid gradient block by block: the 4 planes of 16 taps of each
// 4x4x4 block its points' stencils cover (a block per first node), summed
// over all the lane's points in it, in the order the points come. Detector
// lookups revisit the same few hundred blocks row after row of pixels, so
// keeping their sums here, a 256-byte record each (floats), costs a fraction
// of adding each run of points into a grid-sized gradient, whose rows are
// scattered and, in a partial grid, cold. Bounded: at most max_blocks
// blocks (as many taps as half the grid has nodes); a lane with more
// distinct blocks (random lookups) sends the rest to its grid-sized gradient.
template <typename T>
struct BlockSums {
  struct Block {
    Plane<T> planes[4];  // [a]: taps (b, c) at 4 b + c
  };
  std::vector<Block> blocks;     // in order of first use
  std::vector<int64_t> base;     // block's first node, as an offset in the gradient
  std::vector<int64_t> first_h;  // ... and its h index
  std::vector<int32_t> table;    // open addressing on base: block index + 1; 0 empty
  size_t max_blocks = 0;
  bool full = false;

  explicit BlockSums(size_t max) : max_blocks(max) {}

  // The block whose first node is at offset `at` (h index h), added (zero)
  // if new; -1 once max_blocks are held.
  int32_t find_or_add(int64_t at, int64_t h) {
    if (full) return -1;
    if (table.empty()) table.assign(256, 0);
    size_t i = slot_of(at);
    for (; table[i] != 0; i = (i + 1) & (table.size() - 1)) {
      const int32_t b = table[i] - 1;
      if (base[b] == at) return b;
    }
    if (blocks.size() >= max_blocks) {
      full = true;
      return -1;
    }
    blocks.emplace_back();  // zeroed
    base.push_back(at);
    first_h.push_back(h);
    table[i] = static_cast<int32_t>(blocks.size());
    if (2 * blocks.size() > table.size()) grow();
    return static_cast<int32_t>(blocks.size() - 1);
  }

 private:
  size_t slot_of(int64_t at) const {
    return static_cast<size_t>((static_cast<uint64_t>(at) * 0x9E3779B97F4A7C15ull) >> 32) &
           (table.size() - 1);
  }
  void grow() {
    table.assign(2 * table.size(), 0);
    for (size_t b = 0; b < blocks.size(); ++b) {
      size_t i = slot_of(base[b]);
      while (table[i] != 0) i = (i + 1) & (table.size() - 1);
      table[i] = static_cast<int32_t>(b + 1);
    }
  }
};

// One lane of accumulate_grid_grad: its points' grid gradient goes into the
// zeroed output (lane 0) or into a partial grid of its own. A lazy partial
// grid is allocated when the lane first writes into it (with BlockSums,
// detector lookups never do) and zeroed one (h, k) row of Nl nodes at a
// time, when the row is first written, and the reduction reads only the
// rows written: zeroing and reading whole partial grids cost more than the
// scatter itself, and allocating unused ones made the allocator hand pages
// back to the kernel and fault others in, call after call.
template <typename T>
struct GridGradLane {
  T* dest;  // null: a lazy partial grid not allocated yet
  int64_t nk = 0, nl = 0;
  uint8_t* row_written = nullptr;    // [Nh * Nk]; null: every row zeroed already
  uint8_t* block_ready = nullptr;    // [Nh * Nk]: the 4x4 rows from (h, k) written
  BlockSums<T>* sums = nullptr;      // where PendingBlock keeps blocks; null: dest
  at::Tensor* partial = nullptr;     // where a lazy partial grid is allocated
  const at::Tensor* like = nullptr;  // ... with this one's shape and options

  C10_ALWAYS_INLINE void write_row(int64_t row) {
    if (!row_written[row]) {
      if (dest == nullptr) allocate();
      row_written[row] = 1;
      std::fill_n(dest + row * nl, nl, T(0));
    }
  }
  C10_NOINLINE void allocate() {
    *partial = at::empty(like->sizes(), like->options());
    dest = partial->mutable_data_ptr<T>();
  }
  // Makes rows (h0 + a, k0 + b), a, b < 4, ready to be added into: before a
  // stencil's scatter through add() (consecutive points mostly share h0, k0).
  C10_ALWAYS_INLINE void prepare_block(int64_t h0, int64_t k0) {
    if (row_written == nullptr) return;
    const int64_t anchor = h0 * nk + k0;
    if (block_ready[anchor]) return;
    block_ready[anchor] = 1;
    for (int64_t a = 0; a < 4; ++a) {
      for (int64_t b = 0; b < 4; ++b) write_row((h0 + a) * nk + k0 + b);
    }
  }

  // Adds into prepared rows: plain +=, the lane owns its destination.
  struct Add {
    T* dest;
    C10_ALWAYS_INLINE void operator()(int64_t i, T v) const { dest[i] += v; }
    C10_ALWAYS_INLINE void add_row(int64_t r, T g, const T wl[4]) const {
      add_row_simd(dest, r, g, wl);
    }
  };
  // Adds anywhere, making the row ready first (the per-point paths).
  struct CheckedAdd {
    GridGradLane* lane;
    C10_ALWAYS_INLINE void operator()(int64_t i, T v) const {
      if (lane->row_written != nullptr) lane->write_row(i / lane->nl);
      lane->dest[i] += v;
    }
    C10_ALWAYS_INLINE void add_row(int64_t r, T g, const T wl[4]) const {
      if (lane->row_written != nullptr) lane->write_row(r / lane->nl);
      add_row_simd(lane->dest, r, g, wl);
    }
  };
  Add add() const { return Add{dest}; }
  CheckedAdd checked_add() { return CheckedAdd{this}; }
};

// {x0 x0 x0 x0 x1 ... x3} and {x0 x1 x2 x3 x0 ... x3}: a row's 4 values
// spread over a plane of 16, for w_k[b] w_l[c] at 4 b + c. (Intrinsics
// where there are some: the compilers widen the generic form through
// memory, and the store-to-load forwarding it defeats costs more than the
// whole scatter.)
template <typename T>
C10_ALWAYS_INLINE void spread_over_plane(const typename Plane<T>::Row& x, Plane<T>& out) {
  constexpr int kWidth = Plane<T>::kWidth;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const __m512i index = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    out.part[0] = Float16(_mm512_permutexvar_ps(index, _mm512_castps128_ps512(__m128(x))));
    return;
  } else {
    const __m512d x2 = _mm512_castpd256_pd512(__m256d(x));
    out.part[0] = Double8(_mm512_permutexvar_pd(_mm512_setr_epi64(0, 0, 0, 0, 1, 1, 1, 1), x2));
    out.part[1] = Double8(_mm512_permutexvar_pd(_mm512_setr_epi64(2, 2, 2, 2, 3, 3, 3, 3), x2));
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    const __m256 x2 = _mm256_castps128_ps256(__m128(x));
    out.part[0] = Float8(_mm256_permutevar8x32_ps(x2, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1)));
    out.part[1] = Float8(_mm256_permutevar8x32_ps(x2, _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3)));
    return;
  } else {
    out.part[0] = Double4(_mm256_permute4x64_pd(__m256d(x), 0x00));
    out.part[1] = Double4(_mm256_permute4x64_pd(__m256d(x), 0x55));
    out.part[2] = Double4(_mm256_permute4x64_pd(__m256d(x), 0xAA));
    out.part[3] = Double4(_mm256_permute4x64_pd(__m256d(x), 0xFF));
    return;
  }
#endif
  for (int i = 0; i < Plane<T>::kParts; ++i) {
    for (int e = 0; e < kWidth; ++e) out.part[i][e] = x[(kWidth * i + e) / 4];
  }
}
template <typename T>
C10_ALWAYS_INLINE void tile_over_plane(const typename Plane<T>::Row& x, Plane<T>& out) {
  constexpr int kWidth = Plane<T>::kWidth;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    out.part[0] = Float16(_mm512_broadcast_f32x4(__m128(x)));
    return;
  } else {
    out.part[0] = out.part[1] = Double8(_mm512_broadcast_f64x4(__m256d(x)));
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    out.part[0] = out.part[1] = Float8(_mm256_broadcast_ps(reinterpret_cast<const __m128*>(&x)));
    return;
  }
#endif
  for (int i = 0; i < Plane<T>::kParts; ++i) {
    for (int e = 0; e < kWidth; ++e) out.part[i][e] = x[(kWidth * i + e) % 4];
  }
}

// The grid gradient of a run of consecutive points whose stencils start at
// the same node (detector lookups: neighbouring pixels mostly fall in the
// same cell), summed from zero in the block's 4 planes of 16 taps, in
// registers, and handed on once, when the block changes or the lane's points
// end: added into the block's record in the lane's BlockSums (the sum of its
// runs, in the order they come), or, a lane without one or whose BlockSums is
// full, into the lane's gradient. (Summing each run from zero, rather than
// from the block's record, keeps the record's load off the next run's path.)
// A point adds (grad_out w_h[a]) (w_k[b] w_l[c]) to tap (a, b, c), as
// tricubic_math.h's ScatterRow does, a plane (16 taps, one AVX-512 register
// of floats) per multiply-add. The runs depend on the points' order only, so
// the result does not depend on the thread count.
template <typename T>
struct PendingBlock {
  using Taps = SimdTaps4<T>;
  int64_t base = -1, h0 = 0, k0 = 0;  // gradient offset and first node of the block
  Plane<T> planes[4] = {};            // [a]: taps (b, c) at 4 b + c

  // Hands the run on (not inlined: once per run, and the scatter's loop
  // keeps its planes in registers around the call).
  C10_NOINLINE void flush(GridGradLane<T>& lane, const int64_t stride[3]) {
    if (base < 0) return;
    const int32_t slot = lane.sums != nullptr ? lane.sums->find_or_add(base, h0) : -1;
    if (slot >= 0) {
      auto& block = lane.sums->blocks[slot];
      for (int a = 0; a < 4; ++a) block.planes[a] += planes[a];
    } else {
      add_to_lane(lane, stride);
    }
    base = -1;
  }
  // Adds the planes into the lane's grid-shaped gradient at base.
  C10_ALWAYS_INLINE void add_to_lane(GridGradLane<T>& lane, const int64_t stride[3]) {
    lane.prepare_block(h0, k0);  // (allocates a lazy partial grid)
    // (strides in locals: the rows' byte copies could alias them)
    const int64_t s0 = stride[0], s1 = stride[1];
    T* const block = lane.dest + base;
    for (int a = 0; a < 4; ++a) add_plane(block + a * s0, s1, planes[a]);
  }
  // A plane's 4 rows of 4 taps added at g (rows s1 apart).
  static C10_ALWAYS_INLINE void add_plane(T* g, int64_t s1, const Plane<T>& p) {
    add_row<0>(g, p);
    add_row<1>(g + s1, p);
    add_row<2>(g + 2 * s1, p);
    add_row<3>(g + 3 * s1, p);
  }
  template <int b>
  static C10_ALWAYS_INLINE void add_row(T* row, const Plane<T>& p) {
    typename Taps::V d;
    std::memcpy(&d, row, sizeof(d));
    p.template add_row_to<b>(d);
    std::memcpy(row, &d, sizeof(d));
  }
  // The scatter of a batch's lanes that are inside the grid, in lane order.
  template <int kNeeds>
  C10_ALWAYS_INLINE void scatter_batch(const LaneBatch<T, kNeeds>& b, GridGradLane<T>& lane,
                                       const int64_t stride[3]) {
    using Batch = LaneBatch<T, kNeeds>;
    using Row = typename Taps::V;
    // (locals: GCC keeps the members on the stack, a store and a load per
    // plane and point)
    Plane<T> p0 = planes[0], p1 = planes[1], p2 = planes[2], p3 = planes[3];
    for (int j = 0; j < Batch::kLanes; ++j) {
      if (!b.is_inside(j)) continue;
      Row wk, wl;
      std::memcpy(&wk, b.kl_rows[0][j], sizeof(Row));
      std::memcpy(&wl, b.kl_rows[1][j], sizeof(Row));
      Plane<T> spread_wk, tiled_wl;
      spread_over_plane<T>(wk, spread_wk);
      tile_over_plane<T>(wl, tiled_wl);
      const Plane<T> kl = spread_wk * tiled_wl;  // ScatterWeights::kl
      if (b.node_offset[j] != base) {            // a new run
        planes[0] = p0, planes[1] = p1, planes[2] = p2, planes[3] = p3;
        flush(lane, stride);
        base = b.node_offset[j], h0 = b.first[0][j], k0 = b.first[1][j];
        p0 = p1 = p2 = p3 = Plane<T>{};
      }
      p0.add_scaled(b.ga[0][j], kl);
      p1.add_scaled(b.ga[1][j], kl);
      p2.add_scaled(b.ga[2][j], kl);
      p3.add_scaled(b.ga[3][j], kl);
    }
    planes[0] = p0, planes[1] = p1, planes[2] = p2, planes[3] = p3;
  }
};

// How many partial grids the grid gradient is accumulated in. A function of
// the problem size only, never of the thread count, so the summation order,
// and the result to the last bit, does not depend on how many threads run.
// Bounded so that zeroing and reducing the partials costs at most an eighth
// of the scatter (8 node updates per grid element), and the workspace, a
// partial grid and at most half a grid of BlockSums per lane, at most 256 MiB.
int64_t grid_grad_lane_count(int64_t num_points, int64_t grid_numel, int64_t element_bytes) {
  constexpr int64_t kMaxLanes = 16;
  constexpr int64_t kMinPointsPerLane = 4096;
  constexpr int64_t kPartialBudgetBytes = int64_t(256) << 20;
  if (grid_numel == 0) {
    return 1;
  }
  int64_t lanes = std::min(kMaxLanes, num_points / kMinPointsPerLane);
  lanes = std::min(lanes, 8 * num_points / grid_numel);
  lanes = std::min(lanes, kPartialBudgetBytes / (grid_numel * element_bytes * 3 / 2));
  return std::max<int64_t>(lanes, 1);
}

// BlockSums' blocks of one lane added into the gradient g (contiguous,
// strides `stride`), in the order of first use, the planes with h in
// [h_begin, h_end) only.
template <typename T>
void add_block_sums(const BlockSums<T>& sums, T* g, const int64_t stride[3], int64_t h_begin,
                    int64_t h_end) {
  for (size_t b = 0; b < sums.blocks.size(); ++b) {
    for (int a = 0; a < 4; ++a) {
      const int64_t h = sums.first_h[b] + a;
      if (h < h_begin || h >= h_end) continue;
      PendingBlock<T>::add_plane(g + sums.base[b] + a * stride[0], stride[1],
                                 sums.blocks[b].planes[a]);
    }
  }
}

// Adds scatter(begin, end, lane), the grid gradient of points [begin, end)
// through a GridGradLane, for every point p < n into grad_grid (contiguous,
// zeroed), in grid_grad_lane_count lanes added up in a fixed order: lane 0,
// 1, 2, ... for every node, each lane's partial grid (a lane that wrote
// nothing into a row adds nothing there, and x + 0 == x), then its block
// sums. `lazy` (the PendingBlock scatters): each lane has BlockSums, and its
// partial grid is zeroed row by row as it is written (the scatter calls
// prepare_block or adds through checked_add); else partial grids are zeroed
// all at once.
template <typename T, typename ScatterFn>
void accumulate_grid_grad(int64_t n, at::Tensor& grad_grid, bool lazy, const ScatterFn& scatter) {
  const int64_t g_numel = grad_grid.numel();
  const int64_t lanes = grid_grad_lane_count(n, g_numel, sizeof(T));
  T* out = grad_grid.mutable_data_ptr<T>();
  const int64_t nh = grad_grid.size(0), nk = grad_grid.size(1), nl = grad_grid.size(2);
  const int64_t out_stride[3] = {nk * nl, nl, 1};
  // Block sums of each lane, as many taps at most as half the grid has nodes.
  std::vector<BlockSums<T>> sums(
      lazy ? lanes : 0, BlockSums<T>(static_cast<size_t>(std::max<int64_t>(1, g_numel / 128))));
  if (lanes == 1) {
    GridGradLane<T> lane{out};
    lane.sums = lazy ? &sums[0] : nullptr;
    scatter(int64_t(0), n, lane);
    if (lazy) add_block_sums(sums[0], out, out_stride, 0, nh);
    return;
  }
  const int64_t rows = nh * nk;
  // The partial grids of lanes 1, 2, ...: lazy ones allocated by their lane
  // when it first writes into one, else all zeroed here.
  std::vector<at::Tensor> partials(lanes - 1);
  if (!lazy) {
    for (auto& p : partials) p = at::zeros(grad_grid.sizes(), grad_grid.options());
  }
  std::vector<uint8_t> flags(lazy ? 2 * (lanes - 1) * rows : 0, uint8_t(0));

  // Each lane owns a contiguous range of points, its block sums and its own
  // partial grid.
  at::parallel_for(0, lanes, 1, [&](int64_t lane_begin, int64_t lane_end) {
    for (int64_t i = lane_begin; i < lane_end; ++i) {
      GridGradLane<T> lane{i == 0 ? out : nullptr, nk, nl};
      if (lazy) lane.sums = &sums[i];
      if (i > 0 && !lazy) lane.dest = partials[i - 1].mutable_data_ptr<T>();
      if (i > 0 && lazy) {
        lane.row_written = flags.data() + 2 * (i - 1) * rows;
        lane.block_ready = lane.row_written + rows;
        lane.partial = &partials[i - 1];
        lane.like = &grad_grid;
      }
      scatter(n * i / lanes, n * (i + 1) / lanes, lane);
    }
  });
  // Lane by lane into the output, h-planes split among the threads.
  at::parallel_for(0, nh, std::max<int64_t>(1, 4096 / std::max<int64_t>(nk * nl, 1)),
                   [&](int64_t h_begin, int64_t h_end) {
                     for (int64_t i = 0; i < lanes; ++i) {
                       const T* partial = i > 0 && partials[i - 1].defined()
                                              ? partials[i - 1].const_data_ptr<T>()
                                              : nullptr;
                       for (int64_t row = h_begin * nk; partial && row < h_end * nk; ++row) {
                         if (lazy && !flags[2 * (i - 1) * rows + row]) continue;
                         T* o = out + row * nl;
                         const T* part = partial + row * nl;
                         for (int64_t c = 0; c < nl; ++c) o[c] += part[c];
                       }
                       if (lazy) add_block_sums(sums[i], out, out_stride, h_begin, h_end);
                     }
                   });
}

// The backward kernels' points: each one's coordinates and incoming
// gradient, through PointOffsets (hkl and grad_output strided or expanded
// as they come; contiguous copies only where PointOffsets cannot hold the
// layout), and the layouts read a batch at a time (DirectLayout).
template <typename T>
struct BackwardPoints {
  at::Tensor hkl, grad;
  int64_t count = 0;
  PointOffsets<2> offsets;
  DirectLayout<T> direct;
  const T* hkl_data = nullptr;
  const T* grad_data = nullptr;
  int64_t hkl_last = 0;  // hkl's stride between h, k and l

  BackwardPoints(const at::Tensor& hkl_in, const at::Tensor& grad_output)
      : hkl(hkl_in), grad(grad_output) {
    const auto point_shape = point_shape_of(hkl_in);
    count = c10::multiply_integers(point_shape);
    offsets = offsets_or_contiguous<2>(point_shape, {&hkl, &grad}, {0, 0});
    direct = direct_layout<T>(hkl, &grad, offsets);
    hkl_data = hkl.const_data_ptr<T>();
    grad_data = grad.const_data_ptr<T>();
    hkl_last = hkl.stride(-1);
  }
  C10_ALWAYS_INLINE void coords(int64_t p, T& h, T& k, T& l) const {
    const T* x = hkl_data + offsets.get_one(p, 0);
    h = x[0], k = x[hkl_last], l = x[2 * hkl_last];
  }
  C10_ALWAYS_INLINE T grad_at(int64_t p) const { return grad_data[offsets.get_one(p, 1)]; }
};

template <typename T>
void grid_grad_kernel(const at::Tensor& grad_output, const at::Tensor& hkl_in,
                      c10::IntArrayRef index_min, OutOfRange mode, at::Tensor& grad_grid) {
  const BackwardPoints<T> points(hkl_in, grad_output);
  const GridShape shape = make_grid_shape(grad_grid.sizes(), index_min);
  const LaneBounds<T> bounds = lane_bounds<T>(shape.size, shape.lo);
  const int64_t out_stride[3] = {bounds.node_stride[0], bounds.node_stride[1], 1};  // node_offset's
  auto coords = [&](int64_t p, T& h, T& k, T& l)
                    NANOBRAGG_LAMBDA_INLINE { points.coords(p, h, k, l); };
  auto grad_at = [&](int64_t p) NANOBRAGG_LAMBDA_INLINE { return points.grad_at(p); };
  accumulate_grid_grad<T>(
      points.count, grad_grid, /*lazy=*/true,
      [&](int64_t begin, int64_t end, GridGradLane<T>& lane) NANOBRAGG_LAMBDA_INLINE {
        constexpr int kNeeds = kGradOut | kScatter;
        using Batch = LaneBatch<T, kNeeds>;
        auto checked_add = lane.checked_add();
        PendingBlock<T> pending;
        for_each_point_in_lanes<T, kNeeds>(
            begin, end, bounds, points.direct, coords, grad_at,
            [](int64_t, int, const Batch&) {},  // (after_batch's scatter)
            [&](int64_t p, T h, T k, T l) NANOBRAGG_LAMBDA_INLINE {
              tricubic_grid_grad_scatter<T>(shape.size, shape.lo, h, k, l, mode, grad_at(p),
                                            checked_add);
            },
            NoGroups(),
            [&](const Batch& b)
                NANOBRAGG_LAMBDA_INLINE { pending.scatter_batch(b, lane, out_stride); });
        pending.flush(lane, out_stride);
      });
}

template <typename T>
void hkl_grad_kernel(const at::Tensor& grad_output, const at::Tensor& grid,
                     const at::Tensor& hkl_in, c10::IntArrayRef index_min, OutOfRange mode,
                     at::Tensor& grad_hkl) {
  const BackwardPoints<T> points(hkl_in, grad_output);
  const int64_t n = points.count;
  const DirectLayout<T>& direct = points.direct;
  const GridView<T> view = make_grid_view<T>(grid, index_min);
  T* out = grad_hkl.mutable_data_ptr<T>();  // contiguous [..., 3]
  const LaneBounds<T> bounds = lane_bounds<T>(view.size, view.lo);
  auto coords = [&](int64_t p, T& h, T& k, T& l)
                    NANOBRAGG_LAMBDA_INLINE { points.coords(p, h, k, l); };
  auto grad_at = [&](int64_t p) NANOBRAGG_LAMBDA_INLINE { return points.grad_at(p); };
  with_unit_l_stride(view.stride[2] == 1, [&](auto unit_l) {
    constexpr bool kUnitL = decltype(unit_l)::value;
    at::parallel_for(0, n, kPointGrain, [&](int64_t begin, int64_t end) {
      constexpr int kNeeds = kDerivatives | kGradOut;
      using Batch = LaneBatch<T, kNeeds>;
      auto stencil = [&](int64_t p, int j, const Batch& b) NANOBRAGG_LAMBDA_INLINE {
        T w[3][4], dw[3][4];
        b.lane_weights(b.w, j, w), b.lane_weights(b.dw, j, dw);
        tricubic_hkl_grad_stencil<T, kUnitL, StencilTaps<T>>(view.data + b.offset(j, view.stride),
                                                             view.stride, w[0], w[1], w[2], dw[0],
                                                             dw[1], dw[2], b.g[j], out + 3 * p);
      };
      auto per_point = [&](int64_t p, T h, T k, T l) NANOBRAGG_LAMBDA_INLINE {
        tricubic_hkl_grad<T, kUnitL>(view, h, k, l, mode, grad_at(p), out + 3 * p);
      };
      if constexpr (RowGroup<T>::kEnabled) {
        for_each_point_in_lanes<T, kNeeds, RowGroup<T>::kPoints>(
            begin, end, bounds, direct, coords, grad_at, stencil, per_point,
            [&](int64_t p, int j, const Batch& b, unsigned keep) NANOBRAGG_LAMBDA_INLINE {
              hkl_grad_group<T, kUnitL>(b, j, view.data, view.stride, &b.g[j], keep, out + 3 * p);
            });
      } else {
        for_each_point_in_lanes<T, kNeeds>(begin, end, bounds, direct, coords, grad_at, stencil,
                                           per_point);
      }
    });
  });
}

// Both gradients in one pass (tricubic_backward_point): each point's block
// is read once, for the hkl gradient and the grid scatter, in the lanes of
// accumulate_grid_grad (each point's hkl gradient is its own, so the lanes
// change nothing in it).
template <typename T>
void both_grads_kernel(const at::Tensor& grad_output, const at::Tensor& grid,
                       const at::Tensor& hkl_in, c10::IntArrayRef index_min, OutOfRange mode,
                       at::Tensor& grad_grid, at::Tensor& grad_hkl) {
  const BackwardPoints<T> points(hkl_in, grad_output);
  const DirectLayout<T>& direct = points.direct;
  const GridView<T> view = make_grid_view<T>(grid, index_min);
  T* out = grad_hkl.mutable_data_ptr<T>();  // contiguous [..., 3]
  const LaneBounds<T> bounds = lane_bounds<T>(view.size, view.lo);
  const int64_t out_stride[3] = {bounds.node_stride[0], bounds.node_stride[1], 1};  // node_offset's
  auto coords = [&](int64_t p, T& h, T& k, T& l)
                    NANOBRAGG_LAMBDA_INLINE { points.coords(p, h, k, l); };
  auto grad_at = [&](int64_t p) NANOBRAGG_LAMBDA_INLINE { return points.grad_at(p); };
  with_unit_l_stride(view.stride[2] == 1, [&](auto unit_l) {
    constexpr bool kUnitL = decltype(unit_l)::value;
    accumulate_grid_grad<T>(
        points.count, grad_grid, /*lazy=*/true,
        [&](int64_t begin, int64_t end, GridGradLane<T>& lane) NANOBRAGG_LAMBDA_INLINE {
          constexpr int kNeeds = kDerivatives | kGradOut | kScatter;
          using Batch = LaneBatch<T, kNeeds>;
          auto checked_add = lane.checked_add();
          PendingBlock<T> pending;
          auto stencil = [&](int64_t p, int j, const Batch& b) NANOBRAGG_LAMBDA_INLINE {
            T w[3][4], dw[3][4];
            b.lane_weights(b.w, j, w), b.lane_weights(b.dw, j, dw);
            tricubic_hkl_grad_stencil<T, kUnitL, StencilTaps<T>>(
                view.data + b.offset(j, view.stride), view.stride, w[0], w[1], w[2], dw[0], dw[1],
                dw[2], b.g[j], out + 3 * p);
          };
          auto per_point = [&](int64_t p, T h, T k, T l) NANOBRAGG_LAMBDA_INLINE {
            tricubic_backward_point<T, kUnitL>(view, h, k, l, mode, grad_at(p), out + 3 * p,
                                               checked_add);
          };
          auto scatter = [&](const Batch& b) NANOBRAGG_LAMBDA_INLINE {
            pending.scatter_batch(b, lane, out_stride);
          };
          if constexpr (RowGroup<T>::kEnabled) {
            for_each_point_in_lanes<T, kNeeds, RowGroup<T>::kPoints>(
                begin, end, bounds, direct, coords, grad_at, stencil, per_point,
                [&](int64_t p, int j, const Batch& b, unsigned keep) NANOBRAGG_LAMBDA_INLINE {
                  hkl_grad_group<T, kUnitL>(b, j, view.data, view.stride, &b.g[j], keep,
                                            out + 3 * p);
                },
                scatter);
          } else {
            for_each_point_in_lanes<T, kNeeds>(begin, end, bounds, direct, coords, grad_at, stencil,
                                               per_point, NoGroups(), scatter);
          }
          pending.flush(lane, out_stride);
        });
  });
}

}  // namespace

at::Tensor tricubic_interp_cpu(const at::Tensor& grid, const at::Tensor& hkl_in,
                               c10::IntArrayRef index_min, double default_value,
                               c10::string_view out_of_range) {
  const OutOfRange mode =
      checks::check_tricubic_args(kForward, grid, hkl_in, index_min, out_of_range);
  at::Tensor hkl = hkl_in;
  const auto point_shape = point_shape_of(hkl).vec();
  at::Tensor out = at::empty(point_shape, grid.options());
  const int64_t n = out.numel();
  if (n == 0) {
    return out;
  }
  const auto offsets = offsets_or_contiguous<1>(point_shape, {&hkl}, {0});
  AT_DISPATCH_FLOATING_TYPES(grid.scalar_type(), "tricubic_interp_cpu", [&] {
    const GridView<scalar_t> view = make_grid_view<scalar_t>(grid, index_min);
    const scalar_t* hkl_data = hkl.const_data_ptr<scalar_t>();
    const int64_t hkl_last = hkl.stride(-1);
    const scalar_t fill = static_cast<scalar_t>(default_value);
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    using T = scalar_t;
    const LaneBounds<T> bounds = lane_bounds<T>(view.size, view.lo);
    const DirectLayout<T> direct = direct_layout<T>(hkl, nullptr, offsets);
    auto coords = [&](int64_t p, T& h, T& k, T& l) NANOBRAGG_LAMBDA_INLINE {
      const T* x = hkl_data + offsets.get_one(p, 0);
      h = x[0], k = x[hkl_last], l = x[2 * hkl_last];
    };
    with_unit_l_stride(view.stride[2] == 1, [&](auto unit_l) {
      constexpr bool kUnitL = decltype(unit_l)::value;
      at::parallel_for(0, n, kPointGrain, [&](int64_t begin, int64_t end) {
        using Batch = LaneBatch<T, kWeights>;
        auto stencil = [&](int64_t p, int j, const Batch& b) NANOBRAGG_LAMBDA_INLINE {
          T w[3][4];
          b.lane_weights(b.w, j, w);
          out_data[p] = contract_stencil<T, kUnitL, StencilTaps<T>>(
              view.data + b.offset(j, view.stride), view.stride, w[0], w[1], w[2]);
        };
        auto per_point = [&](int64_t p, T h, T k, T l) NANOBRAGG_LAMBDA_INLINE {
          out_data[p] = tricubic_value<T, kUnitL>(view, h, k, l, mode, fill);
        };
        auto no_grad = [](int64_t) { return T(0); };
        if constexpr (RowGroup<T>::kEnabled) {
          for_each_point_in_lanes<T, kWeights, RowGroup<T>::kPoints>(
              begin, end, bounds, direct, coords, no_grad, stencil, per_point,
              [&](int64_t p, int j, const Batch& b, unsigned keep) NANOBRAGG_LAMBDA_INLINE {
                contract_group<T, kUnitL>(b, j, view.data, view.stride, keep, out_data + p);
              });
        } else {
          for_each_point_in_lanes<T, kWeights>(begin, end, bounds, direct, coords, no_grad, stencil,
                                               per_point);
        }
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> tricubic_interp_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& grid, const at::Tensor& hkl,
    c10::IntArrayRef index_min, c10::string_view out_of_range, std::array<bool, 2> output_mask) {
  const OutOfRange mode =
      checks::check_tricubic_args(kBackward, grid, hkl, index_min, out_of_range);
  checks::check_tricubic_grad_output(kBackward, grad_output, grid, hkl);
  at::Tensor grad_grid, grad_hkl;  // (not a structured binding: lambdas capture them)
  std::tie(grad_grid, grad_hkl) = allocate_backward_outputs(grid, hkl, output_mask);
  if (hkl.numel() == 0) {
    return {grad_grid, grad_hkl};
  }
  AT_DISPATCH_FLOATING_TYPES(grid.scalar_type(), "tricubic_interp_backward_cpu", [&] {
    if (output_mask[0] && output_mask[1]) {
      both_grads_kernel<scalar_t>(grad_output, grid, hkl, index_min, mode, grad_grid, grad_hkl);
      return;
    }
    if (output_mask[0]) {
      grid_grad_kernel<scalar_t>(grad_output, hkl, index_min, mode, grad_grid);
    }
    if (output_mask[1]) {
      hkl_grad_kernel<scalar_t>(grad_output, grid, hkl, index_min, mode, grad_hkl);
    }
  });
  return {grad_grid, grad_hkl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tricubic_interp_double_backward_cpu(
    const std::optional<at::Tensor>& grad_grad_grid, const std::optional<at::Tensor>& grad_grad_hkl,
    const at::Tensor& grad_output, const at::Tensor& grid, const at::Tensor& hkl_in,
    c10::IntArrayRef index_min, c10::string_view out_of_range, std::array<bool, 3> output_mask) {
  const DoubleBackwardCall call =
      prepare_double_backward(kDoubleBackward, grad_grad_grid, grad_grad_hkl, grad_output, grid,
                              hkl_in, index_min, out_of_range, output_mask);
  // (named references: lambdas cannot capture structured bindings)
  at::Tensor grad_grad_output = call.grad_grad_output;
  at::Tensor grad_grid = call.grad_grid;
  at::Tensor grad_hkl = call.grad_hkl;
  const int64_t n = call.num_points;
  if (n == 0) {
    return {grad_grad_output, grad_grid, grad_hkl};
  }
  const at::Tensor& hkl = call.hkl;
  const at::Tensor& grad = call.grad;
  const at::Tensor& v = call.gg_hkl;
  const PointOffsets<3>& offsets = call.offsets;
  const OutOfRange mode = call.mode;
  AT_DISPATCH_FLOATING_TYPES(grid.scalar_type(), "tricubic_interp_double_backward_cpu", [&] {
    using T = scalar_t;
    const T* x_data = hkl.const_data_ptr<T>();
    const T* g_data = grad.const_data_ptr<T>();
    const T* v_data = v.const_data_ptr<T>();
    const int64_t x_last = hkl.stride(-1), v_last = v.stride(-1);
    // Point p's coordinates, incoming gradient and grad_hkl cotangent.
    auto point = [&](int64_t p, T x[3], T& g, T vp[3]) NANOBRAGG_LAMBDA_INLINE {
      int64_t off[3];
      offsets.get(p, off);
      for (int d = 0; d < 3; ++d) {
        x[d] = x_data[off[0] + d * x_last];
        vp[d] = v_data[off[2] + d * v_last];
      }
      g = g_data[off[1]];
    };
    if (output_mask[0] || output_mask[2]) {
      const GridView<T> view = make_grid_view<T>(grid, index_min);
      const GridView<T> gg = make_cotangent_view<T>(call.gg_grid, index_min);
      T* ggo = output_mask[0] ? grad_grad_output.mutable_data_ptr<T>() : nullptr;
      T* gh = output_mask[2] ? grad_hkl.mutable_data_ptr<T>() : nullptr;
      with_unit_l_stride(view.stride[2] == 1, [&](auto unit_l) {
        at::parallel_for(0, n, kPointGrain, [&](int64_t begin, int64_t end) {
          cpu::for_each_index(
              [&](int64_t p) NANOBRAGG_LAMBDA_INLINE {
                T x[3], g, vp[3], d_g, d_hkl[3];
                point(p, x, g, vp);
                tricubic_double_backward_point<T, decltype(unit_l)::value>(
                    view, gg, x[0], x[1], x[2], mode, g, vp, d_g, d_hkl);
                if (ggo != nullptr) ggo[p] = d_g;
                if (gh != nullptr) {
                  for (int d = 0; d < 3; ++d) gh[3 * p + d] = d_hkl[d];
                }
              },
              begin, end);
        });
      });
    }
    if (output_mask[1] && call.has_gg_hkl) {
      const GridShape shape = make_grid_shape(grid.sizes(), index_min);
      accumulate_grid_grad<T>(n, grad_grid, /*lazy=*/false,
                              [&](int64_t begin, int64_t end, GridGradLane<T>& lane)
                                  NANOBRAGG_LAMBDA_INLINE {
                                    auto add = lane.add();
                                    for (int64_t p = begin; p < end; ++p) {
                                      T x[3], g, vp[3];
                                      point(p, x, g, vp);
                                      tricubic_double_backward_grid_scatter<T>(
                                          shape.size, shape.lo, x[0], x[1], x[2], mode, g, vp, add);
                                    }
                                  });
    }
  });
  return {grad_grad_output, grad_grid, grad_hkl};
}

}  // namespace CPU_CAPABILITY
}  // namespace tricubic
}  // namespace nanobragg
