// CPU kernels of nanobragg::tricubic_interp and its backward. The per-point
// math is tricubic_math.h, the same code the CUDA kernels run.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
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

// Points go through the kernels in batches of one vector's lanes (8 floats
// with AVX2, 16 with AVX-512). Where each point falls and its weights are
// computed for the whole batch at once with at::vec::Vectorized, by the same
// templates (tricubic_math.h) that the per-point path runs on scalars; then
// each point whose stencil is inside the grid has its 4x4x4 block contracted
// on its own (16 rows, each a short vector load: SimdTaps4). Points whose
// stencil leaves the grid, or that the batch test cannot decide, take the
// per-point path (tricubic_value, ...). A lane's arithmetic does not depend
// on its position in a batch, so neither do the results on how the points
// are split among threads.
//
// What a kernel needs of a batch besides the weights: their derivatives
// (the hkl gradient), the incoming gradient (the grid gradient).
enum LaneNeeds : int { kWeights = 0, kDerivatives = 1, kGradOut = 2 };

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
  uint64_t inside = 0;               // bit j: lane j's stencil is in the grid

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
// whose bounds T cannot hold exactly (index_min near the limits of T).
template <typename T>
struct LaneBounds {
  T first_x[3], end_x[3];
};

template <typename T>
LaneBounds<T> lane_bounds(const int64_t size[3], const double lo[3]) {
  LaneBounds<T> b;
  for (int d = 0; d < 3; ++d) {
    double first_x, end_x;
    stencil_interval(lo[d], size[d], first_x, end_x);
    const bool exact = static_cast<double>(static_cast<T>(first_x)) == first_x &&
                       static_cast<double>(static_cast<T>(end_x)) == end_x;
    b.first_x[d] = exact ? static_cast<T>(first_x) : std::numeric_limits<T>::quiet_NaN();
    b.end_x[d] = exact ? static_cast<T>(end_x) : std::numeric_limits<T>::quiet_NaN();
  }
  return b;
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
    if constexpr ((kNeeds & kDerivatives) != 0) {
      Vec dw[4];
      lagrange_weight_derivs(u, dw);
      for (int c = 0; c < 4; ++c) dw[c].store(b.dw[d][c]);
    }
    const Vec axis_in = (x >= lower) & (x < Vec(bounds.end_x[d]));
    in_grid = d == 0 ? axis_in : (in_grid & axis_in);
    // n - lower is an exact small integer in the lanes inside the grid; the
    // others convert 0, not NaN or a huge value (undefined in C++).
    at::vec::convert_to_int_of_same_size(Vec::blendv(Vec(T(0)), n - lower, axis_in))
        .store(b.first[d]);
  }
  const uint64_t all = count >= 64 ? ~uint64_t(0) : (uint64_t(1) << count) - 1;
  const uint64_t outside = static_cast<uint64_t>(static_cast<uint32_t>(in_grid.zero_mask()));
  b.inside = ~outside & all & (kLanes >= 64 ? ~uint64_t(0) : (uint64_t(1) << kLanes) - 1);
}

// For each point p in [begin, end): coords(p, h, k, l) reads its
// coordinates (and grad(p) its incoming gradient, for kGradOut); then
// stencil(p, j, batch) runs for a point whose stencil is inside the grid
// (lane j of the batch), per_point(p, h, k, l) for the others.
template <typename T, int kNeeds, typename CoordsFn, typename GradFn, typename StencilFn,
          typename PointFn>
C10_ALWAYS_INLINE void for_each_point_in_lanes(int64_t begin, int64_t end,
                                               const LaneBounds<T>& bounds, const CoordsFn& coords,
                                               const GradFn& grad, const StencilFn& stencil,
                                               const PointFn& per_point) {
  LaneBatch<T, kNeeds> b;
  constexpr int kLanes = LaneBatch<T, kNeeds>::kLanes;
  for (int64_t i = begin; i < end; i += kLanes) {
    const int count = static_cast<int>(std::min<int64_t>(kLanes, end - i));
    for (int j = 0; j < kLanes; ++j) {
      if (j < count) {
        coords(i + j, b.x[0][j], b.x[1][j], b.x[2][j]);
        if constexpr ((kNeeds & kGradOut) != 0) b.g[j] = grad(i + j);
      } else {
        b.x[0][j] = b.x[1][j] = b.x[2][j] = b.g[j] = T(0);
      }
    }
    locate_lanes(b, bounds, count);
    for (int j = 0; j < count; ++j) {
      if (b.is_inside(j)) {
        stencil(i + j, j, b);
      } else {
        per_point(i + j, b.x[0][j], b.x[1][j], b.x[2][j]);
      }
    }
  }
}

// Taps4 (tricubic_math.h) in one vector register: 4 floats (SSE), 4 doubles
// (AVX2, or two SSE registers). The compilers do not vectorise Taps4's
// 4-element loops themselves; the arithmetic per element is the same.
// (GCC/Clang vector extensions; the attribute needs a concrete type.)
typedef float Float4 __attribute__((vector_size(16)));
typedef double Double4 __attribute__((vector_size(32)));

template <typename T>
struct SimdTaps4 {
  using V = std::conditional_t<std::is_same_v<T, float>, Float4, Double4>;
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

  C10_ALWAYS_INLINE T dot(const T w[4]) const {
    return w[0] * v[0] + w[1] * v[1] + w[2] * v[2] + w[3] * v[3];
  }
};

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

// One lane of accumulate_grid_grad: its points' grid gradient goes into the
// zeroed output (lane 0) or into a partial grid of its own. A lazy partial
// grid is zeroed one (h, k) row of Nl nodes at a time, when the row is first
// written, and the reduction reads only the rows written: detector lookups
// touch a few percent of the rows, and zeroing and reading whole partial
// grids cost more than the scatter itself.
template <typename T>
struct GridGradLane {
  T* dest;
  int64_t nk = 0, nl = 0;
  uint8_t* row_written = nullptr;  // [Nh * Nk]; null: every row zeroed already
  uint8_t* block_ready = nullptr;  // [Nh * Nk]: the 4x4 rows from (h, k) written

  C10_ALWAYS_INLINE void write_row(int64_t row) {
    if (!row_written[row]) {
      row_written[row] = 1;
      std::fill_n(dest + row * nl, nl, T(0));
    }
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

// The grid gradient of consecutive points whose stencils start at the same
// node (detector lookups: neighbouring pixels mostly fall in the same cell),
// summed in 16 rows of 4 taps and added into the lane's gradient once, when
// the block changes or the lane's points end: one read-modify-write of the
// block per run of points instead of per point. The runs depend on the
// points' order only, so the result does not depend on the thread count.
template <typename T>
struct PendingBlock {
  using Taps = SimdTaps4<T>;
  int64_t base = -1, h0 = 0, k0 = 0;  // gradient offset and first node of the block
  Taps rows[16] = {};

  C10_ALWAYS_INLINE void flush(GridGradLane<T>& lane, const int64_t stride[3]) {
    if (base < 0) return;
    lane.prepare_block(h0, k0);
    for (int a = 0; a < 4; ++a) {
      for (int b = 0; b < 4; ++b) {
        T* row = lane.dest + base + a * stride[0] + b * stride[1];
        Taps d = Taps::template load<true>(row, stride);
        d.v += rows[4 * a + b].v;
        std::memcpy(row, &d.v, sizeof(d.v));
      }
    }
    base = -1;
  }
  // Makes the block at gradient offset `at` (first node h, k) the pending one.
  C10_ALWAYS_INLINE void hold(int64_t at, int64_t h, int64_t k, GridGradLane<T>& lane,
                              const int64_t stride[3]) {
    if (at == base) return;
    flush(lane, stride);
    base = at, h0 = h, k0 = k;
    for (int r = 0; r < 16; ++r) rows[r] = Taps::zero();
  }
  // Row (a, b) of a point's scatter (tricubic_math.h's ScatterRow arithmetic).
  C10_ALWAYS_INLINE void add(int a, int b, const ScatterWeights<T>& sw) {
    rows[4 * a + b].add_scaled(sw.ga[a], Taps::template load<true>(sw.kl[b], nullptr));
  }
};

// How many partial grids the grid gradient is accumulated in. A function of
// the problem size only, never of the thread count, so the summation order,
// and the result to the last bit, does not depend on how many threads run.
// Bounded so that zeroing and reducing the partials costs at most an eighth
// of the scatter (8 node updates per grid element) and at most 256 MiB.
int64_t grid_grad_lane_count(int64_t num_points, int64_t grid_numel, int64_t element_bytes) {
  constexpr int64_t kMaxLanes = 16;
  constexpr int64_t kMinPointsPerLane = 4096;
  constexpr int64_t kPartialBudgetBytes = int64_t(256) << 20;
  if (grid_numel == 0) {
    return 1;
  }
  int64_t lanes = std::min(kMaxLanes, num_points / kMinPointsPerLane);
  lanes = std::min(lanes, 8 * num_points / grid_numel);
  lanes = std::min(lanes, kPartialBudgetBytes / (grid_numel * element_bytes));
  return std::max<int64_t>(lanes, 1);
}

// Adds scatter(begin, end, lane), the grid gradient of points [begin, end)
// through a GridGradLane, for every point p < n into grad_grid (contiguous,
// zeroed), in grid_grad_lane_count partial grids reduced in a fixed order:
// lane 0, 1, 2, ... for every node (a lane that wrote nothing into a row
// adds nothing there, and x + 0 == x). `lazy`: partial grids are zeroed row
// by row as they are written (the scatter calls prepare_block or adds
// through checked_add), else all at once.
template <typename T, typename ScatterFn>
void accumulate_grid_grad(int64_t n, at::Tensor& grad_grid, bool lazy, const ScatterFn& scatter) {
  const int64_t g_numel = grad_grid.numel();
  const int64_t lanes = grid_grad_lane_count(n, g_numel, sizeof(T));
  T* out = grad_grid.mutable_data_ptr<T>();
  if (lanes == 1) {
    GridGradLane<T> lane{out};
    scatter(int64_t(0), n, lane);
    return;
  }
  const int64_t nk = grad_grid.size(1), nl = grad_grid.size(2);
  const int64_t rows = grad_grid.size(0) * nk;
  at::Tensor partials = lazy ? at::empty({lanes - 1, g_numel}, grad_grid.options())
                             : at::zeros({lanes - 1, g_numel}, grad_grid.options());
  T* partial_data = partials.mutable_data_ptr<T>();
  std::vector<uint8_t> flags(lazy ? 2 * (lanes - 1) * rows : 0, uint8_t(0));

  // Each lane owns a contiguous range of points and its own partial grid.
  at::parallel_for(0, lanes, 1, [&](int64_t lane_begin, int64_t lane_end) {
    for (int64_t i = lane_begin; i < lane_end; ++i) {
      GridGradLane<T> lane{i == 0 ? out : partial_data + (i - 1) * g_numel, nk, nl};
      if (lazy && i > 0) {
        lane.row_written = flags.data() + 2 * (i - 1) * rows;
        lane.block_ready = lane.row_written + rows;
      }
      scatter(n * i / lanes, n * (i + 1) / lanes, lane);
    }
  });
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(nl, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t row = begin; row < end; ++row) {
                       T* o = out + row * nl;
                       for (int64_t i = 1; i < lanes; ++i) {
                         if (lazy && !flags[2 * (i - 1) * rows + row]) continue;
                         const T* part = partial_data + (i - 1) * g_numel + row * nl;
                         for (int64_t c = 0; c < nl; ++c) o[c] += part[c];
                       }
                     }
                   });
}

template <typename T>
void grid_grad_kernel(const at::Tensor& grad_output, const at::Tensor& hkl_in,
                      c10::IntArrayRef index_min, OutOfRange mode, at::Tensor& grad_grid) {
  at::Tensor hkl = hkl_in;
  at::Tensor grad = grad_output;
  const auto point_shape = point_shape_of(hkl);
  const auto offsets = point_offsets_or_contiguous<2>(point_shape, {&hkl, &grad});
  const GridShape shape = make_grid_shape(grad_grid.sizes(), index_min);
  const LaneBounds<T> bounds = lane_bounds<T>(shape.size, shape.lo);
  const int64_t out_stride[3] = {shape.size[1] * shape.size[2], shape.size[2], 1};
  const T* hkl_data = hkl.const_data_ptr<T>();
  const T* grad_data = grad.const_data_ptr<T>();
  const int64_t hkl_last = hkl.stride(-1);
  auto coords = [&](int64_t p, T& h, T& k, T& l) NANOBRAGG_LAMBDA_INLINE {
    const T* x = hkl_data + offsets.get_one(p, 0);
    h = x[0], k = x[hkl_last], l = x[2 * hkl_last];
  };
  auto grad_at = [&](int64_t p)
                     NANOBRAGG_LAMBDA_INLINE { return grad_data[offsets.get_one(p, 1)]; };
  accumulate_grid_grad<T>(
      c10::multiply_integers(point_shape), grad_grid, /*lazy=*/true,
      [&](int64_t begin, int64_t end, GridGradLane<T>& lane) NANOBRAGG_LAMBDA_INLINE {
        using Batch = LaneBatch<T, kGradOut>;
        auto checked_add = lane.checked_add();
        PendingBlock<T> pending;
        for_each_point_in_lanes<T, kGradOut>(
            begin, end, bounds, coords, grad_at,
            [&](int64_t, int j, const Batch& b) NANOBRAGG_LAMBDA_INLINE {
              T w[3][4];
              b.lane_weights(b.w, j, w);
              pending.hold(b.offset(j, out_stride), b.first[0][j], b.first[1][j], lane, out_stride);
              const ScatterWeights<T> sw = scatter_weights(b.g[j], w[0], w[1], w[2]);
              for (int a = 0; a < 4; ++a) {
                for (int k = 0; k < 4; ++k) pending.add(a, k, sw);
              }
            },
            [&](int64_t p, T h, T k, T l) NANOBRAGG_LAMBDA_INLINE {
              tricubic_grid_grad_scatter<T>(shape.size, shape.lo, h, k, l, mode, grad_at(p),
                                            checked_add);
            });
        pending.flush(lane, out_stride);
      });
}

template <typename T>
void hkl_grad_kernel(const at::Tensor& grad_output, const at::Tensor& grid,
                     const at::Tensor& hkl_in, c10::IntArrayRef index_min, OutOfRange mode,
                     at::Tensor& grad_hkl) {
  at::Tensor hkl = hkl_in;
  at::Tensor grad = grad_output;
  const auto point_shape = point_shape_of(hkl);
  const int64_t n = c10::multiply_integers(point_shape);
  const auto offsets = point_offsets_or_contiguous<2>(point_shape, {&hkl, &grad});
  const GridView<T> view = make_grid_view<T>(grid, index_min);
  const T* hkl_data = hkl.const_data_ptr<T>();
  const T* grad_data = grad.const_data_ptr<T>();
  const int64_t hkl_last = hkl.stride(-1);
  T* out = grad_hkl.mutable_data_ptr<T>();  // contiguous [..., 3]
  const LaneBounds<T> bounds = lane_bounds<T>(view.size, view.lo);
  auto coords = [&](int64_t p, T& h, T& k, T& l) NANOBRAGG_LAMBDA_INLINE {
    const T* x = hkl_data + offsets.get_one(p, 0);
    h = x[0], k = x[hkl_last], l = x[2 * hkl_last];
  };
  auto grad_at = [&](int64_t p)
                     NANOBRAGG_LAMBDA_INLINE { return grad_data[offsets.get_one(p, 1)]; };
  with_unit_l_stride(view.stride[2] == 1, [&](auto unit_l) {
    constexpr bool kUnitL = decltype(unit_l)::value;
    at::parallel_for(0, n, kPointGrain, [&](int64_t begin, int64_t end) {
      using Batch = LaneBatch<T, kDerivatives>;
      for_each_point_in_lanes<T, kDerivatives>(
          begin, end, bounds, coords, grad_at,
          [&](int64_t p, int j, const Batch& b) NANOBRAGG_LAMBDA_INLINE {
            T w[3][4], dw[3][4];
            b.lane_weights(b.w, j, w), b.lane_weights(b.dw, j, dw);
            tricubic_hkl_grad_stencil<T, kUnitL, SimdTaps4<T>>(
                view.data + b.offset(j, view.stride), view.stride, w[0], w[1], w[2], dw[0], dw[1],
                dw[2], grad_at(p), out + 3 * p);
          },
          [&](int64_t p, T h, T k, T l) NANOBRAGG_LAMBDA_INLINE {
            tricubic_hkl_grad<T, kUnitL>(view, h, k, l, mode, grad_at(p), out + 3 * p);
          });
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
  at::Tensor hkl = hkl_in;
  at::Tensor grad = grad_output;
  const auto point_shape = point_shape_of(hkl);
  const auto offsets = point_offsets_or_contiguous<2>(point_shape, {&hkl, &grad});
  const GridView<T> view = make_grid_view<T>(grid, index_min);
  const T* hkl_data = hkl.const_data_ptr<T>();
  const T* grad_data = grad.const_data_ptr<T>();
  const int64_t hkl_last = hkl.stride(-1);
  T* out = grad_hkl.mutable_data_ptr<T>();  // contiguous [..., 3]
  const LaneBounds<T> bounds = lane_bounds<T>(view.size, view.lo);
  const int64_t out_stride[3] = {view.size[1] * view.size[2], view.size[2], 1};
  auto coords = [&](int64_t p, T& h, T& k, T& l) NANOBRAGG_LAMBDA_INLINE {
    const T* x = hkl_data + offsets.get_one(p, 0);
    h = x[0], k = x[hkl_last], l = x[2 * hkl_last];
  };
  auto grad_at = [&](int64_t p)
                     NANOBRAGG_LAMBDA_INLINE { return grad_data[offsets.get_one(p, 1)]; };
  with_unit_l_stride(view.stride[2] == 1, [&](auto unit_l) {
    constexpr bool kUnitL = decltype(unit_l)::value;
    accumulate_grid_grad<T>(
        c10::multiply_integers(point_shape), grad_grid, /*lazy=*/true,
        [&](int64_t begin, int64_t end, GridGradLane<T>& lane) NANOBRAGG_LAMBDA_INLINE {
          using Batch = LaneBatch<T, kDerivatives | kGradOut>;
          auto checked_add = lane.checked_add();
          PendingBlock<T> pending;
          for_each_point_in_lanes<T, kDerivatives | kGradOut>(
              begin, end, bounds, coords, grad_at,
              [&](int64_t p, int j, const Batch& b) NANOBRAGG_LAMBDA_INLINE {
                T w[3][4], dw[3][4];
                b.lane_weights(b.w, j, w), b.lane_weights(b.dw, j, dw);
                pending.hold(b.offset(j, out_stride), b.first[0][j], b.first[1][j], lane,
                             out_stride);
                const ScatterWeights<T> sw = scatter_weights(b.g[j], w[0], w[1], w[2]);
                tricubic_backward_stencil<T, kUnitL, SimdTaps4<T>>(
                    view.data + b.offset(j, view.stride), view.stride, w[0], w[1], w[2], dw[0],
                    dw[1], dw[2], b.g[j], out + 3 * p,
                    [&](int a, int k) NANOBRAGG_LAMBDA_INLINE { pending.add(a, k, sw); });
              },
              [&](int64_t p, T h, T k, T l) NANOBRAGG_LAMBDA_INLINE {
                tricubic_backward_point<T, kUnitL>(view, h, k, l, mode, grad_at(p), out + 3 * p,
                                                   checked_add);
              });
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
  const auto offsets = point_offsets_or_contiguous<1>(point_shape, {&hkl});
  AT_DISPATCH_FLOATING_TYPES(grid.scalar_type(), "tricubic_interp_cpu", [&] {
    const GridView<scalar_t> view = make_grid_view<scalar_t>(grid, index_min);
    const scalar_t* hkl_data = hkl.const_data_ptr<scalar_t>();
    const int64_t hkl_last = hkl.stride(-1);
    const scalar_t fill = static_cast<scalar_t>(default_value);
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    using T = scalar_t;
    const LaneBounds<T> bounds = lane_bounds<T>(view.size, view.lo);
    auto coords = [&](int64_t p, T& h, T& k, T& l) NANOBRAGG_LAMBDA_INLINE {
      const T* x = hkl_data + offsets.get_one(p, 0);
      h = x[0], k = x[hkl_last], l = x[2 * hkl_last];
    };
    with_unit_l_stride(view.stride[2] == 1, [&](auto unit_l) {
      constexpr bool kUnitL = decltype(unit_l)::value;
      at::parallel_for(0, n, kPointGrain, [&](int64_t begin, int64_t end) {
        using Batch = LaneBatch<T, kWeights>;
        for_each_point_in_lanes<T, kWeights>(
            begin, end, bounds, coords, [](int64_t) { return T(0); },
            [&](int64_t p, int j, const Batch& b) NANOBRAGG_LAMBDA_INLINE {
              T w[3][4];
              b.lane_weights(b.w, j, w);
              out_data[p] = contract_stencil<T, kUnitL, SimdTaps4<T>>(
                  view.data + b.offset(j, view.stride), view.stride, w[0], w[1], w[2]);
            },
            [&](int64_t p, T h, T k, T l) NANOBRAGG_LAMBDA_INLINE {
              out_data[p] = tricubic_value<T, kUnitL>(view, h, k, l, mode, fill);
            });
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
