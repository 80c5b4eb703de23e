// Per-point math of nanobragg::tricubic_interp, shared by the CPU and CUDA
// kernels (the way ATen's GridSampler.h serves both backends). Only c10
// macros and <cmath>: no tensors, no allocation, no dispatch.
//
// Contract: docs/CONTRACT.md §1. With n = floor(x) and u = x - n on each
// axis, the stencil is the 4 nodes n-1..n+2 and the value is
//   F = sum_abc w_a(u_h) w_b(u_k) w_c(u_l) grid[n_h-1+a, n_k-1+b, n_l-1+c]
// with the Lagrange weights on consecutive integers, the closed form of
// nanoBragg's polin3 (21 polint calls).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/macros.h"

namespace nanobragg {
namespace tricubic {

enum class OutOfRange : int32_t { Default = 0, Nearest = 1 };

// Lagrange weights of nodes n-1, n, n+1, n+2 at u = x - n.
template <typename T>
NANOBRAGG_INLINE void lagrange_weights(T u, T w[4]) {
  const T up1 = u + T(1);
  const T um1 = u - T(1);
  const T um2 = u - T(2);
  w[0] = -u * um1 * um2 * T(1.0 / 6.0);
  w[1] = up1 * um1 * um2 * T(0.5);
  w[2] = -up1 * u * um2 * T(0.5);
  w[3] = up1 * u * um1 * T(1.0 / 6.0);
}

// dw/du.
template <typename T>
NANOBRAGG_INLINE void lagrange_weight_derivs(T u, T dw[4]) {
  // Horner's form: every addition has one product operand at most, so with
  // contraction on each becomes the same multiply-add wherever this is
  // inlined (u2 - 6 u, a difference of two products, could fuse either).
  dw[0] = -((T(3) * u - T(6)) * u + T(2)) * T(1.0 / 6.0);
  dw[1] = ((T(3) * u - T(4)) * u - T(1)) * T(0.5);
  dw[2] = -((T(3) * u - T(2)) * u - T(2)) * T(0.5);
  dw[3] = (T(3) * u * u - T(1)) * T(1.0 / 6.0);
}

// d2w/du2, for the second derivatives (double backward).
template <typename T>
NANOBRAGG_INLINE void lagrange_weight_second_derivs(T u, T d2w[4]) {
  d2w[0] = T(1) - u;
  d2w[1] = T(3) * u - T(2);
  d2w[2] = T(1) - T(3) * u;
  d2w[3] = u;
}

// The weights of one axis and their first and second derivatives.
template <typename T>
struct AxisWeights {
  T w[4], dw[4], d2w[4];
};

template <typename T>
NANOBRAGG_INLINE AxisWeights<T> axis_weights(T u) {
  AxisWeights<T> a;
  lagrange_weights(u, a.w);
  lagrange_weight_derivs(u, a.dw);
  lagrange_weight_second_derivs(u, a.d2w);
  return a;
}

// Range tests are exact for every coordinate and every index_min: floor(x)
// (or the nearest node) is compared with index_min as integers, so NaN/Inf,
// huge coordinates and index_min near the int64 limits can never turn into
// an in-bounds index, by overflow or by rounding (in double, 2^62 - 1 is
// 2^62). `lo` is index_min of the axis, `size` the grid extent along it.

// An integer-valued double as int64; false for NaN, +-Inf and values outside
// int64 (2^63 is exact in double).
NANOBRAGG_INLINE bool node_as_int64(double node, int64_t& out) {
  if (!(node >= -9223372036854775808.0 && node < 9223372036854775808.0)) {
    return false;
  }
  out = static_cast<int64_t>(node);
  return true;
}

// offset = node - lo, when 0 <= node - lo <= max_offset; no overflow for
// any int64 operands (the difference of node >= lo fits in uint64).
NANOBRAGG_INLINE bool offset_in_range(int64_t node, int64_t lo, int64_t max_offset,
                                      int64_t& offset) {
  if (node < lo || max_offset < 0) {
    return false;
  }
  const uint64_t d = static_cast<uint64_t>(node) - static_cast<uint64_t>(lo);
  if (d > static_cast<uint64_t>(max_offset)) {
    return false;
  }
  offset = static_cast<int64_t>(d);
  return true;
}

// Interpolation stencil: true when nodes n-1..n+2 are all inside the grid;
// then `first` is the grid index of node n-1 and `u` the fractional offset.
template <typename T>
NANOBRAGG_INLINE bool locate_stencil(T x, int64_t lo, int64_t size, int64_t& first, T& u) {
  const double xd = static_cast<double>(x);
  const double n = ::floor(xd);
  int64_t node = 0;
  // (n - 1 below int64's range: no grid node is there)
  if (!node_as_int64(n, node) || node == INT64_MIN) {
    return false;
  }
  if (!offset_in_range(node - 1, lo, size - 4, first)) {
    return false;
  }
  u = static_cast<T>(xd - n);
  return true;
}

// locate_stencil's test as an interval of x: with n = floor(x), nodes
// n-1..n+2 are inside exactly when lo + 1 <= x < lo + size - 2. The CPU
// kernels test a vector of points at once against these two integers, in T;
// false where that test would not be exact: a grid of fewer than 4 nodes, a
// bound T cannot hold, or an axis so long that floor(x) - (lo + 1), an
// integer below size, is not exact in T (or, for float, not an int32).
template <typename T>
NANOBRAGG_INLINE bool stencil_interval(int64_t lo, int64_t size, T& first_x, T& end_x) {
  constexpr int64_t kExactIntegers = int64_t(1) << std::numeric_limits<T>::digits;
  // (index_min is not limited: nodes past int64's end are never inside)
  if (size < 4 || size > kExactIntegers || lo > INT64_MAX - (size - 2)) {
    return false;
  }
  const int64_t first = lo + 1, end = lo + (size - 2);  // (the guard above: no overflow)
  if (first < -kExactIntegers || end > kExactIntegers) {
    return false;
  }
  first_x = static_cast<T>(first);
  end_x = static_cast<T>(end);
  return true;
}

// nanoBragg's nearest node, ceil(x - 0.5) (1.5 -> 1, -0.5 -> -1); true when
// that node is inside the grid, and then `index` is its grid index. Written
// as floor(x) + (x > floor(x) + 0.5), where every step is exact: x - 0.5
// rounds for doubles near -0.5 and for integers from 2^52.
template <typename T>
NANOBRAGG_INLINE bool locate_nearest(T x, int64_t lo, int64_t size, int64_t& index) {
  const double xd = static_cast<double>(x);
  const double f = ::floor(xd);
  const double m = xd > f + 0.5 ? f + 1.0 : f;
  int64_t node = 0;
  return node_as_int64(m, node) && offset_in_range(node, lo, size - 1, index);
}

// A read-only strided view of the [Nh, Nk, Nl] grid and its index origin.
template <typename T>
struct GridView {
  const T* data;
  int64_t size[3];
  int64_t stride[3];
  int64_t lo[3];  // index_min
};

// Where one point falls: a full stencil, one nearest node, or nothing.
enum class PointKind : int32_t { Stencil, Nearest, Default };

template <typename T>
struct PointStencil {
  PointKind kind;
  int64_t first[3];  // Stencil: node n-1 per axis; Nearest: the node
  T u[3];            // Stencil: fractional offsets
};

template <typename T>
NANOBRAGG_INLINE PointStencil<T> classify_point(const int64_t size[3], const int64_t lo[3], T h,
                                                T k, T l, OutOfRange mode) {
  PointStencil<T> p;
  const T x[3] = {h, k, l};
  bool inside = true;
  for (int d = 0; d < 3; ++d) {
    p.u[d] = T(0);
    p.first[d] = 0;
  }
  for (int d = 0; d < 3 && inside; ++d) {
    inside = locate_stencil(x[d], lo[d], size[d], p.first[d], p.u[d]);
  }
  if (inside) {
    p.kind = PointKind::Stencil;
    return p;
  }
  if (mode == OutOfRange::Nearest) {
    bool found = true;
    for (int d = 0; d < 3 && found; ++d) {
      found = locate_nearest(x[d], lo[d], size[d], p.first[d]);
    }
    if (found) {
      p.kind = PointKind::Nearest;
      return p;
    }
  }
  p.kind = PointKind::Default;
  return p;
}

template <typename T>
NANOBRAGG_INLINE int64_t node_offset(const int64_t stride[3], const int64_t first[3]) {
  return first[0] * stride[0] + first[1] * stride[1] + first[2] * stride[2];
}

// Stride of the l axis: a compile-time 1 for grids with contiguous rows (the
// common case, where the 4 taps of a row are one vector load), else runtime.
template <bool kUnitL>
NANOBRAGG_INLINE int64_t l_stride(const int64_t stride[3]) {
  return kUnitL ? 1 : stride[2];
}

// Four taps along l: a row of the 4x4x4 block, or the accumulator of rows.
// The contractions below are written on this type; the CPU kernels pass a
// SIMD type with the same members (tricubic_cpu.cpp), which keeps a row in
// one vector register and gives the same arithmetic element by element.
template <typename T>
struct Taps4 {
  T v[4];

  NANOBRAGG_INLINE static Taps4 zero() { return Taps4{{T(0), T(0), T(0), T(0)}}; }
  template <bool kUnitL>
  NANOBRAGG_INLINE static Taps4 load(const T* row, const int64_t stride[3]) {
    const int64_t sl = l_stride<kUnitL>(stride);
    return Taps4{{row[0], row[sl], row[2 * sl], row[3 * sl]}};
  }
  // this += w * r
  NANOBRAGG_INLINE void add_scaled(T w, const Taps4& r) {
    NANOBRAGG_UNROLL
    for (int c = 0; c < 4; ++c) {
      v[c] += w * r.v[c];
    }
  }
  // sum_c w[c] this[c], in the order c = 0, 1, 2, 3
  NANOBRAGG_INLINE T dot(const T w[4]) const {
    return w[0] * v[0] + w[1] * v[1] + w[2] * v[2] + w[3] * v[3];
  }
};

// The grid gradient's taps of one point, grad_out w_h[a] w_k[b] w_l[c], as
// (grad_out w_h[a]) (w_k[b] w_l[c]): the 16 products along k and l once per
// point, then one multiply (one FMA into the gradient on the CPU) per tap.
template <typename T>
struct ScatterWeights {
  T ga[4];     // grad_out w_h[a]
  T kl[4][4];  // w_k[b] w_l[c]
};

template <typename T>
NANOBRAGG_INLINE ScatterWeights<T> scatter_weights(T grad_out, const T wh[4], const T wk[4],
                                                   const T wl[4]) {
  ScatterWeights<T> sw;
  NANOBRAGG_UNROLL
  for (int a = 0; a < 4; ++a) {
    sw.ga[a] = grad_out * wh[a];
    NANOBRAGG_UNROLL
    for (int c = 0; c < 4; ++c) {
      sw.kl[a][c] = wk[a] * wl[c];
    }
  }
  return sw;
}

// sum_abc wh[a] wk[b] wl[c] g[a,b,c] over the 4x4x4 block at `g`, one axis at
// a time: each h-plane's 4 rows are summed with weights wk[b] into a 4-vector
// along l (16 FMAs, four independent chains), the planes with weights wh[a]
// (4 FMAs), and the result is dotted with wl. Every row of 4 taps is read
// once; a row is one vector on the CPU (Taps).
template <typename T, bool kUnitL = false, typename Taps = Taps4<T>>
NANOBRAGG_INLINE T contract_stencil(const T* g, const int64_t stride[3], const T wh[4],
                                    const T wk[4], const T wl[4]) {
  Taps plane[4];
  NANOBRAGG_UNROLL
  for (int a = 0; a < 4; ++a) {
    const T* p = g + a * stride[0];
    plane[a] = Taps::zero();
    NANOBRAGG_UNROLL
    for (int b = 0; b < 4; ++b) {
      plane[a].add_scaled(wk[b], Taps::template load<kUnitL>(p + b * stride[1], stride));
    }
  }
  Taps acc = Taps::zero();
  NANOBRAGG_UNROLL
  for (int a = 0; a < 4; ++a) {
    acc.add_scaled(wh[a], plane[a]);
  }
  return acc.dot(wl);
}

// Gradient of the contraction with respect to (u_h, u_k, u_l) in one pass:
// per h-plane the rows summed with wk and with w'_k, then the planes with
// wh and w'_h into three 4-vectors (weights w_h w_k, w'_h w_k, w_h w'_k),
// dotted with wl, wl and w'_l. `row(a, b)` is called once per row of the
// block, in the same pass (the one-pass backward scatters the grid gradient
// there); NoRowVisit does nothing.
struct NoRowVisit {
  NANOBRAGG_INLINE void operator()(int, int) const {}
};

template <typename T, bool kUnitL = false, typename Taps = Taps4<T>, typename RowFn = NoRowVisit>
NANOBRAGG_INLINE void contract_stencil_grad(const T* g, const int64_t stride[3], const T wh[4],
                                            const T wk[4], const T wl[4], const T dwh[4],
                                            const T dwk[4], const T dwl[4], T grad[3],
                                            const RowFn& row = RowFn()) {
  Taps plane[4], plane_k[4];  // rows summed with wk, with w'_k
  NANOBRAGG_UNROLL
  for (int a = 0; a < 4; ++a) {
    const T* p = g + a * stride[0];
    plane[a] = Taps::zero();
    plane_k[a] = Taps::zero();
    NANOBRAGG_UNROLL
    for (int b = 0; b < 4; ++b) {
      const Taps r = Taps::template load<kUnitL>(p + b * stride[1], stride);
      plane[a].add_scaled(wk[b], r);
      plane_k[a].add_scaled(dwk[b], r);
      row(a, b);
    }
  }
  Taps acc = Taps::zero(), acc_h = Taps::zero(), acc_k = Taps::zero();
  NANOBRAGG_UNROLL
  for (int a = 0; a < 4; ++a) {
    acc.add_scaled(wh[a], plane[a]);
    acc_h.add_scaled(dwh[a], plane[a]);
    acc_k.add_scaled(wh[a], plane_k[a]);
  }
  grad[0] = acc_h.dot(wl);
  grad[1] = acc_k.dot(wl);
  grad[2] = acc.dot(dwl);
}

// Value, gradient and Hessian in (u_h, u_k, u_l) of the contraction, in one
// pass: six row accumulators (w_h w_k, w'_h w_k, w_h w'_k, w''_h w_k,
// w'_h w'_k, w_h w''_k), then dots with w_l, w'_l, w''_l.
template <typename T>
struct StencilJet {
  T value;
  T grad[3];
  T hess[6];  // hh, kk, ll, hk, hl, kl
};

template <typename T, bool kUnitL = false>
NANOBRAGG_INLINE StencilJet<T> contract_stencil_jet(const T* g, const int64_t stride[3],
                                                    const AxisWeights<T>& wh,
                                                    const AxisWeights<T>& wk,
                                                    const AxisWeights<T>& wl) {
  const int64_t sl = l_stride<kUnitL>(stride);
  T acc[6][4] = {};
  NANOBRAGG_UNROLL
  for (int a = 0; a < 4; ++a) {
    NANOBRAGG_UNROLL
    for (int b = 0; b < 4; ++b) {
      const T row_w[6] = {wh.w[a] * wk.w[b],   wh.dw[a] * wk.w[b],  wh.w[a] * wk.dw[b],
                          wh.d2w[a] * wk.w[b], wh.dw[a] * wk.dw[b], wh.w[a] * wk.d2w[b]};
      const T* row = g + a * stride[0] + b * stride[1];
      NANOBRAGG_UNROLL
      for (int c = 0; c < 4; ++c) {
        const T v = row[c * sl];
        NANOBRAGG_UNROLL
        for (int r = 0; r < 6; ++r) {
          acc[r][c] += row_w[r] * v;
        }
      }
    }
  }
  auto dot = [](const T x[4], const T y[4]) {
    return x[0] * y[0] + x[1] * y[1] + x[2] * y[2] + x[3] * y[3];
  };
  StencilJet<T> j;
  j.value = dot(acc[0], wl.w);
  j.grad[0] = dot(acc[1], wl.w);
  j.grad[1] = dot(acc[2], wl.w);
  j.grad[2] = dot(acc[0], wl.dw);
  j.hess[0] = dot(acc[3], wl.w);
  j.hess[1] = dot(acc[5], wl.w);
  j.hess[2] = dot(acc[0], wl.d2w);
  j.hess[3] = dot(acc[4], wl.w);
  j.hess[4] = dot(acc[1], wl.dw);
  j.hess[5] = dot(acc[2], wl.dw);
  return j;
}

// Forward value of one point.
template <typename T, bool kUnitL = false>
NANOBRAGG_INLINE T tricubic_value(const GridView<T>& grid, T h, T k, T l, OutOfRange mode,
                                  T default_value) {
  const PointStencil<T> p = classify_point(grid.size, grid.lo, h, k, l, mode);
  if (p.kind == PointKind::Default) {
    return default_value;
  }
  const T* base = grid.data + node_offset<T>(grid.stride, p.first);
  if (p.kind == PointKind::Nearest) {
    return *base;
  }
  T wh[4], wk[4], wl[4];
  lagrange_weights(p.u[0], wh);
  lagrange_weights(p.u[1], wk);
  lagrange_weights(p.u[2], wl);
  return contract_stencil<T, kUnitL>(base, grid.stride, wh, wk, wl);
}

// tricubic_hkl_grad's Stencil case, given the point's block and weights.
template <typename T, bool kUnitL = false, typename Taps = Taps4<T>>
NANOBRAGG_INLINE void tricubic_hkl_grad_stencil(const T* block, const int64_t stride[3],
                                                const T wh[4], const T wk[4], const T wl[4],
                                                const T dwh[4], const T dwk[4], const T dwl[4],
                                                T grad_out, T grad_hkl[3]) {
  T g[3];
  contract_stencil_grad<T, kUnitL, Taps>(block, stride, wh, wk, wl, dwh, dwk, dwl, g);
  for (int d = 0; d < 3; ++d) {
    grad_hkl[d] = grad_out * g[d];
  }
}

// dF/d(h,k,l) of one point, scaled by the incoming gradient.
template <typename T, bool kUnitL = false>
NANOBRAGG_INLINE void tricubic_hkl_grad(const GridView<T>& grid, T h, T k, T l, OutOfRange mode,
                                        T grad_out, T grad_hkl[3]) {
  grad_hkl[0] = grad_hkl[1] = grad_hkl[2] = T(0);
  const PointStencil<T> p = classify_point(grid.size, grid.lo, h, k, l, mode);
  if (p.kind != PointKind::Stencil) {
    return;  // nearest and default values do not move with hkl
  }
  T wh[4], wk[4], wl[4], dwh[4], dwk[4], dwl[4];
  lagrange_weights(p.u[0], wh);
  lagrange_weights(p.u[1], wk);
  lagrange_weights(p.u[2], wl);
  lagrange_weight_derivs(p.u[0], dwh);
  lagrange_weight_derivs(p.u[1], dwk);
  lagrange_weight_derivs(p.u[2], dwl);
  tricubic_hkl_grad_stencil<T, kUnitL>(grid.data + node_offset<T>(grid.stride, p.first),
                                       grid.stride, wh, wk, wl, dwh, dwk, dwl, grad_out, grad_hkl);
}

// Adds g wl[c] at r + c, c = 0..3, through `add`: add.add_row(r, g, wl)
// where the add function has one (the CPU's, a vector read-modify-write of
// the row), else add(r + c, g * wl[c]) per tap (CUDA's atomics).
template <typename T, typename AddFn>
NANOBRAGG_INLINE auto add_row_impl(AddFn& add, int64_t r, T g, const T wl[4], int)
    -> decltype(add.add_row(r, g, wl), void()) {
  add.add_row(r, g, wl);
}
template <typename T, typename AddFn>
NANOBRAGG_INLINE void add_row_impl(AddFn& add, int64_t r, T g, const T wl[4], long) {
  NANOBRAGG_UNROLL
  for (int c = 0; c < 4; ++c) {
    add(r + c, g * wl[c]);
  }
}
template <typename T, typename AddFn>
NANOBRAGG_INLINE void add_row(AddFn& add, int64_t r, T g, const T wl[4]) {
  add_row_impl(add, r, g, wl, 0);
}

// Adds sw.ga[a] sw.kl[b][c] at base + a stride[0] + b stride[1] + c (a
// contiguous grid-shaped gradient) through `add`.
template <typename T, typename AddFn>
NANOBRAGG_INLINE void scatter_rows(int64_t base, const int64_t stride[3],
                                   const ScatterWeights<T>& sw, AddFn& add) {
  NANOBRAGG_UNROLL
  for (int a = 0; a < 4; ++a) {
    NANOBRAGG_UNROLL
    for (int b = 0; b < 4; ++b) {
      add_row(add, base + a * stride[0] + b * stride[1], sw.ga[a], sw.kl[b]);
    }
  }
}

// Scatters grad_out * w_a w_b w_c of one point into a contiguous grid-shaped
// gradient through `add(offset, value)`: plain += on CPU (race-free by
// construction there), an atomic or aggregated add on CUDA.
template <typename T, typename AddFn>
NANOBRAGG_INLINE void tricubic_grid_grad_scatter(const int64_t size[3], const int64_t lo[3], T h,
                                                 T k, T l, OutOfRange mode, T grad_out,
                                                 AddFn& add) {
  const PointStencil<T> p = classify_point(size, lo, h, k, l, mode);
  if (p.kind == PointKind::Default) {
    return;
  }
  const int64_t stride[3] = {size[1] * size[2], size[2], 1};
  const int64_t base = node_offset<T>(stride, p.first);
  if (p.kind == PointKind::Nearest) {
    add(base, grad_out);
    return;
  }
  T wh[4], wk[4], wl[4];
  lagrange_weights(p.u[0], wh);
  lagrange_weights(p.u[1], wk);
  lagrange_weights(p.u[2], wl);
  scatter_rows(base, stride, scatter_weights(grad_out, wh, wk, wl), add);
}

// The row (a, b) of a point's grid-gradient scatter: grad_out w_a w_b w_c
// added at row + c, c = 0..3, in tricubic_grid_grad_scatter's arithmetic.
template <typename T, typename AddFn>
struct ScatterRow {
  AddFn& add;
  int64_t base;
  const int64_t* stride;  // of the grid gradient (contiguous)
  const ScatterWeights<T>& sw;

  NANOBRAGG_INLINE void operator()(int a, int b) const {
    add_row(add, base + a * stride[0] + b * stride[1], sw.ga[a], sw.kl[b]);
  }
};

// tricubic_backward_point's Stencil case, given the point's block in the
// grid and its weights: grad_out dF/dhkl into grad_hkl, and row(a, b) called
// for each row of the block in the same pass, to scatter the grid gradient
// (ScatterRow; the CPU kernels sum the rows of consecutive points that
// share a block first).
template <typename T, bool kUnitL, typename Taps, typename RowFn>
NANOBRAGG_INLINE void tricubic_backward_stencil(const T* block, const int64_t grid_stride[3],
                                                const T wh[4], const T wk[4], const T wl[4],
                                                const T dwh[4], const T dwk[4], const T dwl[4],
                                                T grad_out, T grad_hkl[3], const RowFn& row) {
  T g[3];
  contract_stencil_grad<T, kUnitL, Taps>(block, grid_stride, wh, wk, wl, dwh, dwk, dwl, g, row);
  for (int d = 0; d < 3; ++d) {
    grad_hkl[d] = grad_out * g[d];
  }
}

// The whole backward of one point in one pass over its 4x4x4 block: dF/dhkl
// scaled by grad_out into grad_hkl (derivative weights, as tricubic_hkl_grad)
// and grad_out w_a w_b w_c scattered into the grid gradient through `add`
// (value weights, as tricubic_grid_grad_scatter, with the same arithmetic).
template <typename T, bool kUnitL, typename AddFn>
NANOBRAGG_INLINE void tricubic_backward_point(const GridView<T>& grid, T h, T k, T l,
                                              OutOfRange mode, T grad_out, T grad_hkl[3],
                                              AddFn& add) {
  grad_hkl[0] = grad_hkl[1] = grad_hkl[2] = T(0);
  const PointStencil<T> p = classify_point(grid.size, grid.lo, h, k, l, mode);
  if (p.kind == PointKind::Default) {
    return;
  }
  const int64_t out_stride[3] = {grid.size[1] * grid.size[2], grid.size[2], 1};
  const int64_t base = node_offset<T>(out_stride, p.first);
  if (p.kind == PointKind::Nearest) {
    add(base, grad_out);
    return;
  }
  T wh[4], wk[4], wl[4], dwh[4], dwk[4], dwl[4];
  lagrange_weights(p.u[0], wh);
  lagrange_weights(p.u[1], wk);
  lagrange_weights(p.u[2], wl);
  lagrange_weight_derivs(p.u[0], dwh);
  lagrange_weight_derivs(p.u[1], dwk);
  lagrange_weight_derivs(p.u[2], dwl);
  const ScatterWeights<T> sw = scatter_weights(grad_out, wh, wk, wl);
  tricubic_backward_stencil<T, kUnitL, Taps4<T>>(
      grid.data + node_offset<T>(grid.stride, p.first), grid.stride, wh, wk, wl, dwh, dwk, dwl,
      grad_out, grad_hkl, ScatterRow<T, AddFn>{add, base, out_stride, sw});
}

// ---------------------------------------------------------------------------
// Double backward. The backward maps (g, grid, hkl) to
//   grad_grid = scatter of g W(hkl),   grad_hkl = g dF/dhkl(grid, hkl),
// with W the 64 stencil weights. Given the cotangents G (grid-shaped, of
// grad_grid) and v (per point, of grad_hkl), its derivatives are
//   d/dg    = sum W G + v . dF/dhkl            = interp(G) + v . grad F
//   d/dhkl  = g (grad interp(G) + H_F v)       (H_F: Hessian of F in hkl)
//   d/dgrid = scatter of g sum_d v_d dW/dhkl_d
// A nearest point's backward is grad_grid[node] += g, so its d/dg is
// G[node]; a default point has none. `gg` (G's view) may have null data.

// d/dg and d/dhkl of one point. v may be all zero (no cotangent of grad_hkl).
template <typename T, bool kUnitL = false>
NANOBRAGG_INLINE void tricubic_double_backward_point(const GridView<T>& grid, const GridView<T>& gg,
                                                     T h, T k, T l, OutOfRange mode, T grad_out,
                                                     const T v[3], T& grad_grad_out,
                                                     T grad_hkl[3]) {
  grad_grad_out = T(0);
  grad_hkl[0] = grad_hkl[1] = grad_hkl[2] = T(0);
  const PointStencil<T> p = classify_point(grid.size, grid.lo, h, k, l, mode);
  if (p.kind == PointKind::Default) {
    return;
  }
  if (p.kind == PointKind::Nearest) {
    if (gg.data != nullptr) {
      grad_grad_out = gg.data[node_offset<T>(gg.stride, p.first)];
    }
    return;
  }
  const AxisWeights<T> wh = axis_weights(p.u[0]);
  const AxisWeights<T> wk = axis_weights(p.u[1]);
  const AxisWeights<T> wl = axis_weights(p.u[2]);
  const StencilJet<T> f = contract_stencil_jet<T, kUnitL>(
      grid.data + node_offset<T>(grid.stride, p.first), grid.stride, wh, wk, wl);
  const T* H = f.hess;
  T d_hkl[3] = {H[0] * v[0] + H[3] * v[1] + H[4] * v[2], H[3] * v[0] + H[1] * v[1] + H[5] * v[2],
                H[4] * v[0] + H[5] * v[1] + H[2] * v[2]};
  grad_grad_out = v[0] * f.grad[0] + v[1] * f.grad[1] + v[2] * f.grad[2];
  if (gg.data != nullptr) {
    const StencilJet<T> G = contract_stencil_jet<T, false>(
        gg.data + node_offset<T>(gg.stride, p.first), gg.stride, wh, wk, wl);
    grad_grad_out += G.value;
    for (int d = 0; d < 3; ++d) {
      d_hkl[d] += G.grad[d];
    }
  }
  for (int d = 0; d < 3; ++d) {
    grad_hkl[d] = grad_out * d_hkl[d];
  }
}

// The weight of tap (a, b, c) in d/dgrid: sum_d v_d dW/dhkl_d.
template <typename T>
NANOBRAGG_INLINE T second_order_tap(const AxisWeights<T>& wh, const AxisWeights<T>& wk,
                                    const AxisWeights<T>& wl, const T v[3], int a, int b, int c) {
  return v[0] * wh.dw[a] * wk.w[b] * wl.w[c] + v[1] * wh.w[a] * wk.dw[b] * wl.w[c] +
         v[2] * wh.w[a] * wk.w[b] * wl.dw[c];
}

// Scatters d/dgrid of one point (grad_out * second_order_tap) through `add`,
// as tricubic_grid_grad_scatter does for the first derivative.
template <typename T, typename AddFn>
NANOBRAGG_INLINE void tricubic_double_backward_grid_scatter(const int64_t size[3],
                                                            const int64_t lo[3], T h, T k, T l,
                                                            OutOfRange mode, T grad_out,
                                                            const T v[3], AddFn& add) {
  const PointStencil<T> p = classify_point(size, lo, h, k, l, mode);
  if (p.kind != PointKind::Stencil) {
    return;  // a nearest point's grid gradient does not move with hkl
  }
  const int64_t stride[3] = {size[1] * size[2], size[2], 1};
  const int64_t base = node_offset<T>(stride, p.first);
  const AxisWeights<T> wh = axis_weights(p.u[0]);
  const AxisWeights<T> wk = axis_weights(p.u[1]);
  const AxisWeights<T> wl = axis_weights(p.u[2]);
  NANOBRAGG_UNROLL
  for (int a = 0; a < 4; ++a) {
    NANOBRAGG_UNROLL
    for (int b = 0; b < 4; ++b) {
      // Along l the tap is r0 w_l + r1 w'_l.
      const T r0 = grad_out * (v[0] * wh.dw[a] * wk.w[b] + v[1] * wh.w[a] * wk.dw[b]);
      const T r1 = grad_out * v[2] * wh.w[a] * wk.w[b];
      const int64_t row = base + a * stride[0] + b * stride[1];
      NANOBRAGG_UNROLL
      for (int c = 0; c < 4; ++c) {
        add(row + c, r0 * wl.w[c] + r1 * wl.dw[c]);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// The deterministic grid gradient (CUDA under
// torch.use_deterministic_algorithms). Shared here so that the CPU tests run
// the same arithmetic. The steps:
//   1. each point's key (point_sort_key): the node its stencil starts at;
//   2. a stable sort of (key, point index), so each key's points form a run
//      in point order, and a table of each key's run [begin, end);
//   3. each point's SortedSample, in sorted order (contiguous reads below),
//      and a mark in row i / kLongPiece where a long piece (step 4) starts
//      at position i (mark_long_piece);
//   4. the runs cut into pieces at every kPieceSpan-th sorted position
//      (run_piece); each piece of kLongPiece points or more (a long piece)
//      is summed by one warp, found by its mark, into its row of a table
//      (row = first position / kLongPiece, distinct because such pieces
//      start kLongPiece or more apart): the 64 tap sums of a stencil piece,
//      lane l adding positions first + l, first + l + 32, ... and the
//      lanes' sums then added in the fixed tree of a transposing warp sum
//      (warp_tap_sums reproduces it); the gradient sum of a nearest piece
//      in slot 0 (lane_tree_sum's tree);
//   5. per grid node, one warp: for each of the 64 stencil starts that
//      cover the node, in the order (a, b, c), lane l adds the table
//      entries of its run's long pieces l, l + 32, ... and the tap of
//      position first + l of each short piece (fewer than 32 points: only
//      a run's first and last piece can be short); then (first order) the
//      nearest points on the node likewise; the 32 lane sums are added in a
//      fixed tree (lane_tree_sum).
// Every sum has a fixed order, so the result is bitwise repeatable. A point
// of a long piece has its weights computed once (as in the atomic scatter),
// not once per node it touches; a piece is at most kPieceSpan points, so a
// table warp's work is bounded however the lookups cluster; a node's lane
// takes, per covering start, at most 2 points and one table entry per
// 32 kPieceSpan points of its run. Empty nodes cost 64 run table reads.

// Grid extents and index origin, without the data.
struct GridShape {
  int64_t size[3];
  int64_t lo[3];  // index_min
};

NANOBRAGG_INLINE int64_t linear_node(const int64_t size[3], const int64_t i[3]) {
  return (i[0] * size[1] + i[1]) * size[2] + i[2];
}

// Keys: 2 * (node of n-1) for a stencil point, 2 * node + 1 for a nearest
// point, 2 * grid size for a point that contributes nothing (sorts last).
NANOBRAGG_INLINE int64_t stencil_key(const int64_t size[3], const int64_t first[3]) {
  return 2 * linear_node(size, first);
}
NANOBRAGG_INLINE int64_t nearest_key(int64_t node) {
  return 2 * node + 1;
}
NANOBRAGG_INLINE int64_t max_sort_key(const int64_t size[3]) {
  return 2 * size[0] * size[1] * size[2];
}

template <typename T>
NANOBRAGG_INLINE int64_t point_sort_key(const GridShape& shape, T h, T k, T l, OutOfRange mode) {
  const PointStencil<T> p = classify_point(shape.size, shape.lo, h, k, l, mode);
  if (p.kind == PointKind::Stencil) {
    return stencil_key(shape.size, p.first);
  }
  if (p.kind == PointKind::Nearest) {
    return nearest_key(linear_node(shape.size, p.first));
  }
  return max_sort_key(shape.size);
}

// Whether a stencil can start at node `first` (all 4x4x4 nodes inside).
NANOBRAGG_INLINE bool stencil_start_valid(const int64_t size[3], const int64_t first[3]) {
  for (int d = 0; d < 3; ++d) {
    if (first[d] < 0 || first[d] + 3 > size[d] - 1) {
      return false;
    }
  }
  return true;
}

// Step 2's table: position i of the sorted keys starts and/or ends its
// key's run. run_begin/run_end have max_sort_key + 1 entries, zeroed (an
// empty run) before. Positions fit in int32 (at most 2^31 - 1 points).
template <typename Key>
NANOBRAGG_INLINE void mark_run(const Key* sorted_keys, int64_t n, int64_t i, int32_t* run_begin,
                               int32_t* run_end) {
  const Key key = sorted_keys[i];
  if (i == 0 || sorted_keys[i - 1] != key) run_begin[key] = static_cast<int32_t>(i);
  if (i == n - 1 || sorted_keys[i + 1] != key) run_end[key] = static_cast<int32_t>(i + 1);
}

// What the gather needs of point i, in original order: its coordinates,
// incoming gradient and, for the double backward's d/dgrid, the cotangent v
// of its grad_hkl.
template <typename T>
struct PointSample {
  T h, k, l, grad;
  T v[3];
};

// ... and in sorted order: fractional offsets (0 for a nearest point), the
// gradient and (kSecondOrder) v. The first-order sample is four values
// aligned to 16 bytes: one vector load on the GPU.
template <typename T, bool kSecondOrder>
struct SortedSample {
  T u[3];
  T grad;
  T v[3];
  NANOBRAGG_INLINE T cotangent(int d) const { return v[d]; }
};
template <typename T>
struct alignas(16) SortedSample<T, false> {
  T u[3];
  T grad;
  NANOBRAGG_INLINE T cotangent(int) const { return T(0); }
};

template <typename T, bool kSecondOrder>
NANOBRAGG_INLINE SortedSample<T, kSecondOrder> make_sorted_sample(const GridShape& shape,
                                                                  const PointSample<T>& s,
                                                                  OutOfRange mode) {
  const PointStencil<T> p = classify_point(shape.size, shape.lo, s.h, s.k, s.l, mode);
  SortedSample<T, kSecondOrder> out;
  for (int d = 0; d < 3; ++d) {
    out.u[d] = p.u[d];  // 0 unless a stencil point
  }
  out.grad = s.grad;
  if constexpr (kSecondOrder) {
    for (int d = 0; d < 3; ++d) out.v[d] = s.v[d];
  }
  return out;
}

// w[i] of a 4-vector for an index known only at run time, without indexing
// (on the GPU an indexed local array would go to local memory).
template <typename T>
NANOBRAGG_INLINE T pick(const T w[4], int i) {
  return i == 0 ? w[0] : (i == 1 ? w[1] : (i == 2 ? w[2] : w[3]));
}

// A stencil sample's weights, computed once, and its taps: tap (a, b, c) is
// (grad w_h[a]) (w_k[b] w_l[c]), as the CPU scatter forms it, or for the
// double backward's d/dgrid grad * second_order_tap.
template <typename T, bool kSecondOrder>
struct SampleTaps {
  T wh[4], wk[4], wl[4];
  T dh[4], dk[4], dl[4];  // kSecondOrder
  T grad, v[3];

  NANOBRAGG_INLINE explicit SampleTaps(const SortedSample<T, kSecondOrder>& s) : grad(s.grad) {
    lagrange_weights(s.u[0], wh);
    lagrange_weights(s.u[1], wk);
    lagrange_weights(s.u[2], wl);
    for (int d = 0; d < 3; ++d) v[d] = s.cotangent(d);
    if (kSecondOrder) {
      lagrange_weight_derivs(s.u[0], dh);
      lagrange_weight_derivs(s.u[1], dk);
      lagrange_weight_derivs(s.u[2], dl);
    }
  }
  NANOBRAGG_INLINE T operator()(int a, int b, int c) const {
    if (!kSecondOrder) {
      return (grad * pick(wh, a)) * (pick(wk, b) * pick(wl, c));
    }
    return grad * (v[0] * pick(dh, a) * pick(wk, b) * pick(wl, c) +
                   v[1] * pick(wh, a) * pick(dk, b) * pick(wl, c) +
                   v[2] * pick(wh, a) * pick(wk, b) * pick(dl, c));
  }
};

template <typename T, bool kSecondOrder>
NANOBRAGG_INLINE T sample_tap(const SortedSample<T, kSecondOrder>& s, int a, int b, int c) {
  return SampleTaps<T, kSecondOrder>(s)(a, b, c);
}

// Step 4's pieces. kLongPiece is a warp's width: a long piece gives every
// lane of its warp a point, and a short one (fewer) gives each lane of a
// node's warp at most one (step 5). kPieceSpan bounds a warp's work in step
// 4 (32 points per lane) and sets step 5's table reads per run (one per
// kPieceSpan points).
constexpr int64_t kLongPiece = 32;
constexpr int64_t kPieceSpan = 1024;
constexpr int kTaps = 64;

struct Piece {
  int64_t begin, end;  // sorted positions
  NANOBRAGG_INLINE bool is_long() const { return end - begin >= kLongPiece; }
  NANOBRAGG_INLINE int64_t table_row() const { return begin / kLongPiece; }
};

// Rows of the piece table for n points (some rows unused).
NANOBRAGG_INLINE int64_t piece_table_rows(int64_t n) {
  return (n + kLongPiece - 1) / kLongPiece;
}

// The pieces of the run [begin, end): cut at the multiples of kPieceSpan.
NANOBRAGG_INLINE int64_t piece_count(int64_t begin, int64_t end) {
  return end > begin ? (end - 1) / kPieceSpan - begin / kPieceSpan + 1 : 0;
}
// The piece that starts at `first` of a run ending at `end`: up to the next
// multiple of kPieceSpan (the one rule of where pieces end, for steps 4 and 5).
NANOBRAGG_INLINE Piece piece_from(int64_t first, int64_t end) {
  const int64_t span_end = (first / kPieceSpan + 1) * kPieceSpan;
  return Piece{first, span_end < end ? span_end : end};
}
NANOBRAGG_INLINE Piece run_piece(int64_t begin, int64_t end, int64_t k) {
  return piece_from(k == 0 ? begin : (begin / kPieceSpan + k) * kPieceSpan, end);
}

// Step 3's mark of the long pieces that the table holds (stencil pieces;
// nearest ones too unless kSecondOrder, whose d/dgrid nearest points do not
// touch): whether sorted position i starts one. It does if a piece starts
// there and its kLongPiece-th position is still in the same key's run and
// kPieceSpan span (keys are sorted: equal ends mean equal between), so no
// run_end is needed yet.
template <bool kSecondOrder, typename Key>
NANOBRAGG_INLINE bool starts_long_piece(const Key* sorted_keys, int64_t n, int64_t i,
                                        int64_t max_key) {
  const Key key = sorted_keys[i];
  const bool starts = i == 0 || i % kPieceSpan == 0 || sorted_keys[i - 1] != key;
  if (!starts || key == max_key || (kSecondOrder && key % 2 != 0)) {
    return false;
  }
  const int64_t last = i + kLongPiece - 1;
  return last < n && last / kPieceSpan == i / kPieceSpan && sorted_keys[last] == key;
}
// At most one long piece starts in each row's kLongPiece positions (a long
// piece has that many): row_marks[i / kLongPiece] = i % kLongPiece + 1 marks
// it, 0 (zeroed before) none, so that step 4 finds its work in one load
// per row.
template <bool kSecondOrder, typename Key>
NANOBRAGG_INLINE void mark_long_piece(const Key* sorted_keys, int64_t n, int64_t i, int64_t max_key,
                                      int32_t* row_marks) {
  if (starts_long_piece<kSecondOrder>(sorted_keys, n, i, max_key)) {
    row_marks[i / kLongPiece] = static_cast<int32_t>(i % kLongPiece + 1);
  }
}
// Step 4: the long piece that row's nonzero mark names.
template <typename Key>
NANOBRAGG_INLINE Piece marked_piece(const Key* sorted_keys, int64_t row, int32_t mark,
                                    const int32_t* run_end) {
  const int64_t begin = row * kLongPiece + mark - 1;
  return piece_from(begin, run_end[sorted_keys[begin]]);
}

// Adds the 64 taps of a stencil sample to acc (tap 16 a + 4 b + c).
template <typename T, bool kSecondOrder>
NANOBRAGG_INLINE void add_sample_taps(const SortedSample<T, kSecondOrder>& s, T (&acc)[kTaps]) {
  const SampleTaps<T, kSecondOrder> taps(s);
  NANOBRAGG_UNROLL
  for (int a = 0; a < 4; ++a) {
    NANOBRAGG_UNROLL
    for (int b = 0; b < 4; ++b) {
      NANOBRAGG_UNROLL
      for (int c = 0; c < 4; ++c) {
        acc[16 * a + 4 * b + c] += taps(a, b, c);
      }
    }
  }
}

// Lane `lane`'s share of a long stencil piece: the taps of positions
// piece.begin + lane, + 32, ..., summed into acc from 0.
template <typename T, bool kSecondOrder>
NANOBRAGG_INLINE void piece_lane_taps(const SortedSample<T, kSecondOrder>* __restrict__ samples,
                                      const Piece& piece, int lane, T (&acc)[kTaps]) {
  NANOBRAGG_UNROLL
  for (int t = 0; t < kTaps; ++t) acc[t] = T(0);
  // The next sample is loaded before this one's taps are added, so that the
  // load's latency hides behind the arithmetic (the sum's order is unchanged).
  int64_t i = piece.begin + lane;
  if (i >= piece.end) return;
  SortedSample<T, kSecondOrder> s = samples[i];
  for (i += 32; i < piece.end; i += 32) {
    const SortedSample<T, kSecondOrder> next = samples[i];
    add_sample_taps<T, kSecondOrder>(s, acc);
    s = next;
  }
  add_sample_taps<T, kSecondOrder>(s, acc);
}

// ... of a long nearest piece: the gradients of the same positions.
template <typename T, bool kSecondOrder>
NANOBRAGG_INLINE T piece_lane_grads(const SortedSample<T, kSecondOrder>* __restrict__ samples,
                                    const Piece& piece, int lane) {
  T total = T(0);
  for (int64_t i = piece.begin + lane; i < piece.end; i += 32) total += samples[i].grad;
  return total;
}

// Step 5, one run's part of lane `lane`'s sum: long_sum(piece) (its table
// entry) for the long pieces lane, lane + 32, ...; term(i) for position
// piece.begin + lane of a short first or last piece.
template <typename T, typename LongFn, typename TermFn>
NANOBRAGG_INLINE T run_lane_sum(int64_t begin, int64_t end, int lane, const LongFn& long_sum,
                                const TermFn& term) {
  T total = T(0);
  const int64_t pieces = piece_count(begin, end);
  for (int64_t k = lane; k < pieces; k += 32) {
    const Piece p = run_piece(begin, end, k);
    if (p.is_long()) total += long_sum(p);
  }
  for (int64_t k = 0; k < pieces; k += (pieces > 1 ? pieces - 1 : 1)) {  // first, last
    const Piece p = run_piece(begin, end, k);
    const int64_t i = p.begin + lane;
    if (!p.is_long() && i < p.end) total += term(i);
  }
  return total;
}

// Lane `lane`'s share of node `node`'s gradient (step 5): the runs of the 64
// stencils covering the node, then (first order) of the nearest points on
// it. table: piece_table_rows(n) rows of kTaps entries.
template <typename T, bool kSecondOrder>
NANOBRAGG_INLINE T gather_node_lane(const GridShape& shape, int64_t node, int lane,
                                    const int32_t* __restrict__ run_begin,
                                    const int32_t* __restrict__ run_end,
                                    const SortedSample<T, kSecondOrder>* __restrict__ samples,
                                    const T* __restrict__ table) {
  const int64_t idx[3] = {node / (shape.size[1] * shape.size[2]),
                          (node / shape.size[2]) % shape.size[1], node % shape.size[2]};
  T total = T(0);
  for (int a = 0; a < 4; ++a) {
    for (int b = 0; b < 4; ++b) {
      // (unrolled on the GPU: the four runs' bounds are loaded together; a
      // host compiler may decline, and clang's -Werror says so)
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int c = 0; c < 4; ++c) {
        const int64_t first[3] = {idx[0] - a, idx[1] - b, idx[2] - c};
        if (!stencil_start_valid(shape.size, first)) {
          continue;
        }
        const int64_t key = stencil_key(shape.size, first);
        const int tap = 16 * a + 4 * b + c;
        total += run_lane_sum<T>(
            run_begin[key], run_end[key], lane,
            [&](const Piece& p) { return table[p.table_row() * kTaps + tap]; },
            [&](int64_t i) { return sample_tap<T, kSecondOrder>(samples[i], a, b, c); });
      }
    }
  }
  if (!kSecondOrder) {  // a nearest point's gradient does not move with hkl
    const int64_t key = nearest_key(node);
    total += run_lane_sum<T>(
        run_begin[key], run_end[key], lane,
        [&](const Piece& p) { return table[p.table_row() * kTaps]; },
        [&](int64_t i) { return samples[i].grad; });
  }
  return total;
}

// The sum of 32 lane values in the tree a warp's xor shuffles form
// (offsets 16, 8, 4, 2, 1), as lane 0 ends up with it: the host's
// reproduction of the CUDA kernels' order.
template <typename T>
NANOBRAGG_INLINE T lane_tree_sum(const T (&lane_values)[32]) {
  T v[32];
  for (int l = 0; l < 32; ++l) v[l] = lane_values[l];
  for (int offset = 16; offset > 0; offset /= 2) {
    T next[32];
    for (int l = 0; l < 32; ++l) next[l] = v[l] + v[l ^ offset];
    for (int l = 0; l < 32; ++l) v[l] = next[l];
  }
  return v[0];
}

// The 64 sums over 32 lanes of their kTaps values, in the tree of the CUDA
// kernels' transposing warp sum (tricubic_cuda.cu, warp_transpose_step with
// halves 32, 16, 8, 4, 2; lane L ends with taps 2L and 2L + 1): at each
// step a lane keeps the half of its entries its bit half / 2 selects and
// adds the same half of the lane that differs in that bit. Host only.
template <typename T>
inline void warp_tap_sums(const T (&lanes)[32][kTaps], T (&sums)[kTaps]) {
  T v[32][kTaps];
  for (int l = 0; l < 32; ++l)
    for (int t = 0; t < kTaps; ++t) v[l][t] = lanes[l][t];
  for (int half = kTaps / 2; half >= 2; half /= 2) {
    T next[32][kTaps];
    for (int l = 0; l < 32; ++l) {
      const int partner = l ^ (half / 2);
      const int offset = (l & (half / 2)) != 0 ? half : 0;
      for (int i = 0; i < half; ++i) next[l][i] = v[l][i + offset] + v[partner][i + offset];
    }
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < half; ++i) v[l][i] = next[l][i];
  }
  for (int l = 0; l < 32; ++l) {
    sums[2 * l] = v[l][0];
    sums[2 * l + 1] = v[l][1];
  }
}

}  // namespace tricubic
}  // namespace nanobragg
