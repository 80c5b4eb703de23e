// CUDA kernels of nanobragg::tricubic_interp and its backward. The per-point
// math is tricubic_math.h, the code the CPU kernels run (and the CPU tests
// check).
//
// Grid gradient: by default each in-range point adds its 64 weighted taps
// with atomicAdd (order of additions, and so the last bits, vary between
// runs). Under torch.use_deterministic_algorithms(True) it takes a gather
// path instead (tricubic_math.h, "deterministic grid gradient"): points are
// radix-sorted by the node their stencil starts at, one warp sums each piece
// of a start's run of points into a table row of 64 tap sums, and one warp
// per grid node adds the rows and short pieces that land on it, all in a
// fixed order. That path holds O(points) sort keys, samples and table rows.
// Nothing here waits for the host.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <ATen/cuda/cub.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "common/library_init.h"

#include <array>
#include <limits>
#include <tuple>

#include "common/checks.h"
#include "common/cuda_launch.h"
#include "common/point_offsets.h"
#include "tricubic/tricubic_layout.h"
#include "tricubic/tricubic_math.h"

namespace nanobragg {
namespace tricubic {
namespace {

constexpr const char* kForward = "nanobragg::tricubic_interp";
constexpr const char* kBackward = "nanobragg::tricubic_interp_backward";
constexpr const char* kDoubleBackward = "nanobragg::tricubic_interp_double_backward";
using cuda::blocks_for;
using cuda::grid_stride;
using cuda::kThreads;

template <typename T>
__global__ void forward_kernel(GridView<T> grid, const T* __restrict__ hkl, int64_t hkl_last,
                               PointOffsets<1> offsets, int64_t n, OutOfRange mode, T fill,
                               T* __restrict__ out) {
  grid_stride(n, [&](int64_t p) {
    int64_t off[1];
    offsets.get(p, off);
    const T* x = hkl + off[0];
    out[p] = tricubic_value<T>(grid, x[0], x[hkl_last], x[2 * hkl_last], mode, fill);
  });
}

template <typename T>
__global__ void hkl_grad_kernel(GridView<T> grid, const T* __restrict__ hkl, int64_t hkl_last,
                                const T* __restrict__ grad, PointOffsets<2> offsets, int64_t n,
                                OutOfRange mode, T* __restrict__ grad_hkl) {
  grid_stride(n, [&](int64_t p) {
    int64_t off[2];
    offsets.get(p, off);
    const T* x = hkl + off[0];
    tricubic_hkl_grad<T>(grid, x[0], x[hkl_last], x[2 * hkl_last], mode, grad[off[1]],
                         grad_hkl + 3 * p);
  });
}

template <typename T>
struct AtomicAdd {
  T* dest;
  __device__ void operator()(int64_t i, T v) const { atomicAdd(dest + i, v); }
};

// One step of a transposing warp sum: each lane keeps half of its kHalf * 2
// entries (the upper half where its bit kHalf / 2 is set), adds the same
// half from the lane that differs in that bit, and sends it the other.
template <int kHalf, int N, typename T>
__device__ __forceinline__ void warp_transpose_step(T (&v)[N], int lane) {
  const bool upper = (lane & (kHalf / 2)) != 0;
#pragma unroll
  for (int i = 0; i < kHalf; ++i) {
    const T send = upper ? v[i] : v[i + kHalf];
    const T keep = upper ? v[i + kHalf] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, kHalf / 2);
  }
}

// The transposing steps of 32 entries a lane down to its 2 (halves 16, 8,
// 4, 2): what both warp sums of taps end with (warp_tap_sums, on the host).
template <int N, typename T>
__device__ __forceinline__ void warp_transpose_halves(T (&v)[N], int lane) {
  warp_transpose_step<16>(v, lane);
  warp_transpose_step<8>(v, lane);
  warp_transpose_step<4>(v, lane);
  warp_transpose_step<2>(v, lane);
}

// The 64 taps ga[a] kl[4 b + c] of the warp's points summed over its 32
// lanes (32 + 16 + 8 + 4 + 2 = 62 shuffles, not 64 x 5): lane L gets the
// sums of taps 2L and 2L + 1 (tap 16 a + 4 b + c) in v[0] and v[1]. The
// first step makes its taps as it sends them, so that 32 live values (not
// 64) fit in registers. All 32 lanes must call it.
template <typename T>
__device__ __forceinline__ void warp_sum_taps(const T (&ga)[4], const T (&kl)[16], int lane,
                                              T (&v)[32]) {
  const bool upper = (lane & 16) != 0;  // keeps taps 32..63 (a = 2, 3)
  const T keep_a[2] = {upper ? ga[2] : ga[0], upper ? ga[3] : ga[1]};
  const T send_a[2] = {upper ? ga[0] : ga[2], upper ? ga[1] : ga[3]};
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    v[i] =
        keep_a[i / 16] * kl[i % 16] + __shfl_xor_sync(0xffffffffu, send_a[i / 16] * kl[i % 16], 16);
  }
  warp_transpose_halves(v, lane);
}

// The first-order grid gradient by atomics, aggregated per warp. Detector
// lookups come pixel by pixel, so most of a warp's 32 points share their
// stencil start, and their 64 taps land on the same 64 nodes: one atomicAdd
// per tap and point would serialise 32 deep on each node. Instead the lanes
// whose points share a start (__match_any_sync) sum their taps in the warp
// (warp_sum_taps), and each lane adds two of the 64 sums: 64 atomics
// per start instead of 64 per point. Up to kWarpRounds starts shared by two
// or more points are summed so; every other stencil point adds its own taps
// (tricubic_grid_grad_scatter), as do nearest points. Each tap is
// grad w_h[a] (w_k[b] w_l[c]), as on the CPU; only the order of the sums
// differs (the atomic path's order is not fixed anyway).
constexpr int kWarpRounds = 8;

template <typename T>
__global__ void grid_grad_atomic_kernel(GridShape shape, const T* __restrict__ hkl,
                                        int64_t hkl_last, const T* __restrict__ grad,
                                        PointOffsets<2> offsets, int64_t n, OutOfRange mode,
                                        T* grad_grid) {
  const int64_t stride[3] = {shape.size[1] * shape.size[2], shape.size[2], 1};
  const int64_t groups = (n + cuda::kWarp - 1) / cuda::kWarp;
  cuda::warp_stride(groups, [&](int64_t group, int lane) {
    const int64_t p = group * cuda::kWarp + lane;
    bool stencil = false;
    int64_t base = -1;  // node of the stencil start; -1: no stencil
    T g = T(0);
    T wh[4] = {T(0), T(0), T(0), T(0)}, wk[4] = {T(0), T(0), T(0), T(0)},
      wl[4] = {T(0), T(0), T(0), T(0)};
    if (p < n) {
      int64_t off[2];
      offsets.get(p, off);
      const T* x = hkl + off[0];
      const PointStencil<T> s =
          classify_point(shape.size, shape.lo, x[0], x[hkl_last], x[2 * hkl_last], mode);
      if (s.kind == PointKind::Nearest) {
        atomicAdd(grad_grid + node_offset<T>(stride, s.first), grad[off[1]]);
      } else if (s.kind == PointKind::Stencil) {
        stencil = true;
        base = node_offset<T>(stride, s.first);
        g = grad[off[1]];
        lagrange_weights(s.u[0], wh);
        lagrange_weights(s.u[1], wk);
        lagrange_weights(s.u[2], wl);
      }
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
    // (__match_any_sync needs sm_70: older GPUs add every point's taps.)
    const unsigned peers = 1u << lane;
#else
    // The lanes with the same start as this one (non-stencil lanes share
    // base -1 and are left out below).
    const unsigned peers = __match_any_sync(0xffffffffu, static_cast<unsigned long long>(base));
#endif
    const bool leads_a_group = stencil && __popc(peers) >= 2 && lane == __ffs(peers) - 1;
    unsigned leaders = __ballot_sync(0xffffffffu, leads_a_group);  // the same in every lane
    bool pending = stencil;
    for (int round = 0; round < kWarpRounds && leaders != 0; ++round) {
      const int leader = __ffs(leaders) - 1;
      leaders &= leaders - 1;
      const int64_t start = __shfl_sync(0xffffffffu, base, leader);
      const bool mine = stencil && ((peers >> leader) & 1u) != 0;
      pending = pending && !mine;
      T ga[4], kl[16], v[32];
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        ga[a] = mine ? g * wh[a] : T(0);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          kl[4 * a + c] = wk[a] * wl[c];
        }
      }
      warp_sum_taps(ga, kl, lane, v);
      // This lane's taps 2L, 2L + 1: (a, b, c) and (a, b, c + 1).
      const int a = lane >> 3, b = (lane >> 1) & 3, c = 2 * (lane & 1);
      T* node = grad_grid + start + a * stride[0] + b * stride[1] + c;
      atomicAdd(node, v[0]);
      atomicAdd(node + 1, v[1]);
    }
    if (pending) {  // a start of its own, or past kWarpRounds
      AtomicAdd<T> add{grad_grid};
      scatter_rows(base, stride, scatter_weights(g, wh, wk, wl), add);
    }
  });
}

// Reads point i's coordinates, gradient and (double backward) grad_hkl
// cotangent. Offsets: hkl, grad, v.
template <typename T>
struct StridedPoints {
  const T* hkl;
  int64_t hkl_last;
  const T* grad;
  const T* v;  // null: first derivative
  int64_t v_last;
  PointOffsets<3> offsets;
  __device__ PointSample<T> operator()(int64_t i) const {
    int64_t off[3];
    offsets.get(i, off);
    const T* x = hkl + off[0];
    PointSample<T> s{x[0], x[hkl_last], x[2 * hkl_last], grad[off[1]], {T(0), T(0), T(0)}};
    if (v != nullptr) {
      for (int d = 0; d < 3; ++d) s.v[d] = v[off[2] + d * v_last];
    }
    return s;
  }
};

// Deterministic path, step 1: the sort key of each point, and its index
// (the sort's values).
template <typename T, typename Key>
__global__ void sort_key_kernel(GridShape shape, StridedPoints<T> points, int64_t n,
                                OutOfRange mode, Key* __restrict__ keys,
                                int32_t* __restrict__ index) {
  grid_stride(n, [&](int64_t p) {
    const PointSample<T> s = points(p);
    keys[p] = static_cast<Key>(point_sort_key<T>(shape, s.h, s.k, s.l, mode));
    index[p] = static_cast<int32_t>(p);
  });
}

// Steps 2 and 3: each key's run, the samples in sorted order, and the marks
// of the long pieces' rows.
template <typename T, bool kSecondOrder, typename Key>
__global__ void sorted_samples_kernel(
    GridShape shape, StridedPoints<T> points, int64_t n, OutOfRange mode, int64_t max_key,
    const Key* __restrict__ sorted_keys, const int32_t* __restrict__ order,
    int32_t* __restrict__ run_begin, int32_t* __restrict__ run_end, int32_t* __restrict__ row_marks,
    SortedSample<T, kSecondOrder>* __restrict__ samples) {
  grid_stride(n, [&](int64_t i) {
    mark_run(sorted_keys, n, i, run_begin, run_end);
    mark_long_piece<kSecondOrder>(sorted_keys, n, i, max_key, row_marks);
    samples[i] = make_sorted_sample<T, kSecondOrder>(shape, points(order[i]), mode);
  });
}

// Step 4: one warp per 32 table rows; their marks, one per lane, say which
// rows' long pieces to sum (most rows start none). The warp sums each into
// its row: the 64 tap sums of a stencil piece (lane L writes taps 2L,
// 2L + 1), the gradient sum of a nearest piece.
template <typename T, bool kSecondOrder, typename Key>
__global__ void piece_table_kernel(const Key* __restrict__ sorted_keys, int64_t rows,
                                   const int32_t* __restrict__ row_marks,
                                   const int32_t* __restrict__ run_end,
                                   const SortedSample<T, kSecondOrder>* __restrict__ samples,
                                   T* __restrict__ table) {
  static_assert(kLongPiece == cuda::kWarp, "a long piece gives each lane a position");
  const unsigned all = 0xffffffffu;
  cuda::warp_stride((rows + cuda::kWarp - 1) / cuda::kWarp, [&](int64_t group, int lane) {
    const int64_t lane_row = group * cuda::kWarp + lane;
    const int32_t lane_mark = lane_row < rows ? row_marks[lane_row] : 0;
    for (unsigned marked = __ballot_sync(all, lane_mark != 0); marked != 0; marked &= marked - 1) {
      const int src = __ffs(marked) - 1;
      const int64_t row = group * cuda::kWarp + src;
      const Piece piece = marked_piece(sorted_keys, row, __shfl_sync(all, lane_mark, src), run_end);
      T* out = table + row * kTaps;
      if (sorted_keys[piece.begin] % 2 == 0) {  // a stencil piece
        T acc[kTaps];
        piece_lane_taps<T, kSecondOrder>(samples, piece, lane, acc);
        warp_transpose_step<32>(acc, lane);
        warp_transpose_halves(acc, lane);
        out[2 * lane] = acc[0];
        out[2 * lane + 1] = acc[1];
      } else {  // nearest points (first order only)
        T v = piece_lane_grads<T, kSecondOrder>(samples, piece, lane);
        for (int offset = cuda::kWarp / 2; offset > 0; offset /= 2) {
          v += __shfl_xor_sync(all, v, offset);
        }
        if (lane == 0) out[0] = v;
      }
    }
  });
}

// Step 5: one warp per grid node; its lanes' sums added in the fixed tree of
// xor shuffles (what lane_tree_sum reproduces on the host).
template <typename T, bool kSecondOrder>
__global__ void grid_grad_gather_kernel(GridShape shape, const int32_t* __restrict__ run_begin,
                                        const int32_t* __restrict__ run_end,
                                        const SortedSample<T, kSecondOrder>* __restrict__ samples,
                                        const T* __restrict__ table, T* __restrict__ grad_grid) {
  const int64_t g_numel = shape.size[0] * shape.size[1] * shape.size[2];
  cuda::warp_stride(g_numel, [&](int64_t node, int lane) {
    T v = gather_node_lane<T, kSecondOrder>(shape, node, lane, run_begin, run_end, samples, table);
    for (int offset = cuda::kWarp / 2; offset > 0; offset /= 2) {
      v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    if (lane == 0) grad_grid[node] = v;
  });
}

// Double backward: d/dg and d/dhkl, one thread per point.
template <typename T>
__global__ void double_backward_point_kernel(GridView<T> grid, GridView<T> gg,
                                             StridedPoints<T> points, int64_t n, OutOfRange mode,
                                             T* __restrict__ grad_grad_output,
                                             T* __restrict__ grad_hkl) {
  grid_stride(n, [&](int64_t p) {
    const PointSample<T> s = points(p);
    T d_g, d_hkl[3];
    tricubic_double_backward_point<T>(grid, gg, s.h, s.k, s.l, mode, s.grad, s.v, d_g, d_hkl);
    if (grad_grad_output != nullptr) grad_grad_output[p] = d_g;
    if (grad_hkl != nullptr) {
      for (int d = 0; d < 3; ++d) grad_hkl[3 * p + d] = d_hkl[d];
    }
  });
}

// Double backward: d/dgrid by atomics.
template <typename T>
__global__ void double_backward_grid_atomic_kernel(GridShape shape, StridedPoints<T> points,
                                                   int64_t n, OutOfRange mode, T* grad_grid) {
  AtomicAdd<T> add{grad_grid};
  grid_stride(n, [&](int64_t p) {
    const PointSample<T> s = points(p);
    tricubic_double_backward_grid_scatter<T>(shape.size, shape.lo, s.h, s.k, s.l, mode, s.grad, s.v,
                                             add);
  });
}

// Scratch memory that the path writes before it reads: from the caching
// allocator like at::empty, but without the fill that at::empty adds under
// torch.use_deterministic_algorithms (fill_uninitialized_memory), the one
// mode in which this path runs (hundreds of MB of fills per call otherwise).
at::Tensor scratch(int64_t size, const at::TensorOptions& options) {
  return at::detail::empty_cuda({size}, options);
}

// A grid gradient in the deterministic order (tricubic_math.h): sort, runs
// and samples, piece table, then gather per node. Writes every node of
// grad_grid. Sort keys are int32 where the grid allows (2 x its nodes below
// 2^31), which halves the sort's traffic.
template <typename T, bool kSecondOrder, typename Key>
void deterministic_grid_grad_keyed(const GridShape& shape, const StridedPoints<T>& points,
                                   int64_t n, OutOfRange mode, at::Tensor& grad_grid,
                                   cudaStream_t stream) {
  const auto key_opts = grad_grid.options().dtype(c10::CppTypeToScalarType<Key>::value);
  const auto pos_opts = grad_grid.options().dtype(at::kInt);
  at::Tensor keys = scratch(n, key_opts);
  at::Tensor index = scratch(n, pos_opts);
  sort_key_kernel<T, Key><<<blocks_for(n), kThreads, 0, stream>>>(
      shape, points, n, mode, keys.mutable_data_ptr<Key>(), index.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // A radix sort is stable (equal keys keep point order: a fixed sum order)
  // and needs only the bits the largest key has.
  const int64_t max_key = max_sort_key(shape.size);
  at::Tensor sorted_keys = scratch(n, key_opts);
  at::Tensor order = scratch(n, pos_opts);
  at::cuda::cub::radix_sort_pairs<Key, int32_t>(
      keys.const_data_ptr<Key>(), sorted_keys.mutable_data_ptr<Key>(),
      index.const_data_ptr<int32_t>(), order.mutable_data_ptr<int32_t>(), n,
      /*descending=*/false, /*begin_bit=*/0,
      /*end_bit=*/at::cuda::cub::get_num_bits(static_cast<uint64_t>(max_key)));
  keys.reset();
  index.reset();
  at::Tensor run_begin = at::zeros({max_key + 1}, pos_opts);
  at::Tensor run_end = at::zeros({max_key + 1}, pos_opts);
  const int64_t rows = piece_table_rows(n);
  at::Tensor row_marks = at::zeros({rows}, pos_opts);
  using Sample = SortedSample<T, kSecondOrder>;
  at::Tensor samples =
      scratch(n * static_cast<int64_t>(sizeof(Sample)), grad_grid.options().dtype(at::kByte));
  Sample* sample_ptr = reinterpret_cast<Sample*>(samples.mutable_data_ptr<uint8_t>());
  sorted_samples_kernel<T, kSecondOrder, Key><<<blocks_for(n), kThreads, 0, stream>>>(
      shape, points, n, mode, max_key, sorted_keys.const_data_ptr<Key>(),
      order.const_data_ptr<int32_t>(), run_begin.mutable_data_ptr<int32_t>(),
      run_end.mutable_data_ptr<int32_t>(), row_marks.mutable_data_ptr<int32_t>(), sample_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  order.reset();
  // Only the rows of long pieces are written, and only they are read.
  at::Tensor table = scratch(rows * kTaps, grad_grid.options());
  piece_table_kernel<T, kSecondOrder, Key><<<blocks_for(rows), kThreads, 0, stream>>>(
      sorted_keys.const_data_ptr<Key>(), rows, row_marks.const_data_ptr<int32_t>(),
      run_end.const_data_ptr<int32_t>(), sample_ptr, table.mutable_data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t g_numel = grad_grid.numel();
  grid_grad_gather_kernel<T, kSecondOrder>
      <<<blocks_for(g_numel * cuda::kWarp), kThreads, 0, stream>>>(
          shape, run_begin.const_data_ptr<int32_t>(), run_end.const_data_ptr<int32_t>(), sample_ptr,
          table.const_data_ptr<T>(), grad_grid.mutable_data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool kSecondOrder>
void deterministic_grid_grad(const char* op, const GridShape& shape, const StridedPoints<T>& points,
                             int64_t n, OutOfRange mode, at::Tensor& grad_grid,
                             cudaStream_t stream) {
  // cub's radix sort takes an int count, and sorted positions are int32
  // (docs/CONTRACT.md §3, determinism).
  TORCH_CHECK(n <= std::numeric_limits<int>::max(), op,
              ": the deterministic grid gradient on CUDA sorts at most 2^31 - 1 points, got ", n,
              "; split the points into several calls, or leave "
              "torch.use_deterministic_algorithms off for the atomic path");
  if (max_sort_key(shape.size) <= std::numeric_limits<int32_t>::max()) {
    deterministic_grid_grad_keyed<T, kSecondOrder, int32_t>(shape, points, n, mode, grad_grid,
                                                            stream);
  } else {
    deterministic_grid_grad_keyed<T, kSecondOrder, int64_t>(shape, points, n, mode, grad_grid,
                                                            stream);
  }
}

}  // namespace

at::Tensor tricubic_interp_cuda(const at::Tensor& grid, const at::Tensor& hkl_in,
                                c10::IntArrayRef index_min, double default_value,
                                c10::string_view out_of_range) {
  const OutOfRange mode =
      checks::check_tricubic_args(kForward, grid, hkl_in, index_min, out_of_range);
  const c10::cuda::CUDAGuard guard(grid.device());
  at::Tensor hkl = hkl_in;
  const auto point_shape = point_shape_of(hkl).vec();
  at::Tensor out = at::empty(point_shape, grid.options());
  const int64_t n = out.numel();
  if (n == 0) {
    return out;
  }
  const auto offsets = offsets_or_contiguous<1>(point_shape, {&hkl}, {0});
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(grid.scalar_type(), "tricubic_interp_cuda", [&] {
    forward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        make_grid_view<scalar_t>(grid, index_min), hkl.const_data_ptr<scalar_t>(), hkl.stride(-1),
        offsets, n, mode, static_cast<scalar_t>(default_value), out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> tricubic_interp_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& grid, const at::Tensor& hkl_in,
    c10::IntArrayRef index_min, c10::string_view out_of_range, std::array<bool, 2> output_mask) {
  const OutOfRange mode =
      checks::check_tricubic_args(kBackward, grid, hkl_in, index_min, out_of_range);
  checks::check_tricubic_grad_output(kBackward, grad_output, grid, hkl_in);
  const c10::cuda::CUDAGuard guard(grid.device());
  at::Tensor grad_grid, grad_hkl;  // (not a structured binding: lambdas capture them)
  std::tie(grad_grid, grad_hkl) = allocate_backward_outputs(grid, hkl_in, output_mask);
  if (hkl_in.numel() == 0) {
    return {grad_grid, grad_hkl};
  }
  at::Tensor hkl = hkl_in;
  at::Tensor grad = grad_output;
  const auto point_shape = point_shape_of(hkl);
  const int64_t n = c10::multiply_integers(point_shape);
  const auto offsets = offsets_or_contiguous<2>(point_shape, {&hkl, &grad}, {0, 0});
  const auto stream = at::cuda::getCurrentCUDAStream();
  const GridShape shape = make_grid_shape(grid.sizes(), index_min);
  AT_DISPATCH_FLOATING_TYPES(grid.scalar_type(), "tricubic_interp_backward_cuda", [&] {
    const scalar_t* x = hkl.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const int64_t last = hkl.stride(-1);
    if (output_mask[1]) {
      hkl_grad_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
          make_grid_view<scalar_t>(grid, index_min), x, last, g, offsets, n, mode,
          grad_hkl.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (output_mask[0] && grid.numel() > 0) {
      if (!at::globalContext().deterministicAlgorithms()) {
        grid_grad_atomic_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
            shape, x, last, g, offsets, n, mode, grad_grid.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        // (grad stands in for the absent third operand, v.)
        const auto offsets3 =
            offsets_or_contiguous<3>(point_shape, {&hkl, &grad, &grad}, {0, 0, 0});
        const StridedPoints<scalar_t> points{hkl.const_data_ptr<scalar_t>(),
                                             hkl.stride(-1),
                                             grad.const_data_ptr<scalar_t>(),
                                             nullptr,
                                             0,
                                             offsets3};
        deterministic_grid_grad<scalar_t, false>(kBackward, shape, points, n, mode, grad_grid,
                                                 stream);
      }
    }
  });
  return {grad_grid, grad_hkl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tricubic_interp_double_backward_cuda(
    const std::optional<at::Tensor>& grad_grad_grid, const std::optional<at::Tensor>& grad_grad_hkl,
    const at::Tensor& grad_output, const at::Tensor& grid, const at::Tensor& hkl_in,
    c10::IntArrayRef index_min, c10::string_view out_of_range, std::array<bool, 3> output_mask) {
  const DoubleBackwardCall call =
      prepare_double_backward(kDoubleBackward, grad_grad_grid, grad_grad_hkl, grad_output, grid,
                              hkl_in, index_min, out_of_range, output_mask);
  const c10::cuda::CUDAGuard guard(grid.device());
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
  const auto stream = at::cuda::getCurrentCUDAStream();
  const GridShape shape = make_grid_shape(grid.sizes(), index_min);
  AT_DISPATCH_FLOATING_TYPES(grid.scalar_type(), "tricubic_interp_double_backward_cuda", [&] {
    using T = scalar_t;
    const StridedPoints<T> points{hkl.const_data_ptr<T>(), hkl.stride(-1), grad.const_data_ptr<T>(),
                                  v.const_data_ptr<T>(),   v.stride(-1),   offsets};
    if (output_mask[0] || output_mask[2]) {
      double_backward_point_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(
          make_grid_view<T>(grid, index_min), make_cotangent_view<T>(call.gg_grid, index_min),
          points, n, call.mode, output_mask[0] ? grad_grad_output.mutable_data_ptr<T>() : nullptr,
          output_mask[2] ? grad_hkl.mutable_data_ptr<T>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (output_mask[1] && call.has_gg_hkl && grid.numel() > 0) {
      if (!at::globalContext().deterministicAlgorithms()) {
        double_backward_grid_atomic_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(
            shape, points, n, call.mode, grad_grid.mutable_data_ptr<T>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        deterministic_grid_grad<T, true>(kDoubleBackward, shape, points, n, call.mode, grad_grid,
                                         stream);
      }
    }
  });
  return {grad_grad_output, grad_grid, grad_hkl};
}

}  // namespace tricubic
}  // namespace nanobragg

NANOBRAGG_LIBRARY_IMPL(CUDA, m) {
  m.impl("tricubic_interp", TORCH_FN(nanobragg::tricubic::tricubic_interp_cuda));
  m.impl("tricubic_interp_backward", TORCH_FN(nanobragg::tricubic::tricubic_interp_backward_cuda));
  m.impl("tricubic_interp_double_backward",
         TORCH_FN(nanobragg::tricubic::tricubic_interp_double_backward_cuda));
}
