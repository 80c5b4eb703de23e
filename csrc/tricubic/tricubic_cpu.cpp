// CPU kernels of nanobragg::tricubic_interp and its backward. The per-point
// math is tricubic_math.h, the same code the CUDA kernels run.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <array>
#include <tuple>

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

// Adds scatter(p, add) of every point p < n into grad_grid (contiguous,
// zeroed), in grid_grad_lane_count partial grids reduced in a fixed order.
template <typename T, typename ScatterFn>
void accumulate_grid_grad(int64_t n, at::Tensor& grad_grid, const ScatterFn& scatter) {
  const int64_t g_numel = grad_grid.numel();
  const int64_t lanes = grid_grad_lane_count(n, g_numel, sizeof(T));
  at::Tensor partials;
  if (lanes > 1) {
    partials = at::zeros({lanes - 1, g_numel}, grad_grid.options());
  }
  T* out = grad_grid.mutable_data_ptr<T>();
  T* partial_data = lanes > 1 ? partials.mutable_data_ptr<T>() : nullptr;

  // Each lane owns a contiguous range of points and its own partial grid.
  at::parallel_for(0, lanes, 1, [&](int64_t lane_begin, int64_t lane_end) {
    for (int64_t lane = lane_begin; lane < lane_end; ++lane) {
      T* dest = lane == 0 ? out : partial_data + (lane - 1) * g_numel;
      auto add = [dest](int64_t i, T v) { dest[i] += v; };
      cpu::for_each_index([&](int64_t p) NANOBRAGG_LAMBDA_INLINE { scatter(p, add); },
                          n * lane / lanes, n * (lane + 1) / lanes);
    }
  });
  if (lanes > 1) {
    // Fixed order lane 0, 1, 2, ... for every node.
    at::parallel_for(0, g_numel, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        T sum = out[i];
        for (int64_t lane = 1; lane < lanes; ++lane) {
          sum += partial_data[(lane - 1) * g_numel + i];
        }
        out[i] = sum;
      }
    });
  }
}

template <typename T>
void grid_grad_kernel(const at::Tensor& grad_output, const at::Tensor& hkl_in,
                      c10::IntArrayRef index_min, OutOfRange mode, at::Tensor& grad_grid) {
  at::Tensor hkl = hkl_in;
  at::Tensor grad = grad_output;
  const auto point_shape = point_shape_of(hkl);
  const auto offsets = point_offsets_or_contiguous<2>(point_shape, {&hkl, &grad});
  const GridShape shape = make_grid_shape(grad_grid.sizes(), index_min);
  const T* hkl_data = hkl.const_data_ptr<T>();
  const T* grad_data = grad.const_data_ptr<T>();
  const int64_t hkl_last = hkl.stride(-1);
  accumulate_grid_grad<T>(c10::multiply_integers(point_shape), grad_grid,
                          [&](int64_t p, auto& add) NANOBRAGG_LAMBDA_INLINE {
                            int64_t off[2];
                            offsets.get(p, off);
                            const T* x = hkl_data + off[0];
                            tricubic_grid_grad_scatter<T>(shape.size, shape.lo, x[0], x[hkl_last],
                                                          x[2 * hkl_last], mode, grad_data[off[1]],
                                                          add);
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

  with_unit_l_stride(view.stride[2] == 1, [&](auto unit_l) {
    at::parallel_for(0, n, kPointGrain, [&](int64_t begin, int64_t end) {
      cpu::for_each_index(
          [&](int64_t p) NANOBRAGG_LAMBDA_INLINE {
            int64_t off[2];
            offsets.get(p, off);
            const T* x = hkl_data + off[0];
            tricubic_hkl_grad<T, decltype(unit_l)::value>(view, x[0], x[hkl_last], x[2 * hkl_last],
                                                          mode, grad_data[off[1]], out + 3 * p);
          },
          begin, end);
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
  with_unit_l_stride(view.stride[2] == 1, [&](auto unit_l) {
    accumulate_grid_grad<T>(c10::multiply_integers(point_shape), grad_grid,
                            [&](int64_t p, auto& add) NANOBRAGG_LAMBDA_INLINE {
                              int64_t off[2];
                              offsets.get(p, off);
                              const T* x = hkl_data + off[0];
                              tricubic_backward_point<T, decltype(unit_l)::value>(
                                  view, x[0], x[hkl_last], x[2 * hkl_last], mode, grad_data[off[1]],
                                  out + 3 * p, add);
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
    with_unit_l_stride(view.stride[2] == 1, [&](auto unit_l) {
      at::parallel_for(0, n, kPointGrain, [&](int64_t begin, int64_t end) {
        cpu::for_each_index(
            [&](int64_t p) NANOBRAGG_LAMBDA_INLINE {
              int64_t off[1];
              offsets.get(p, off);
              const scalar_t* x = hkl_data + off[0];
              out_data[p] = tricubic_value<scalar_t, decltype(unit_l)::value>(
                  view, x[0], x[hkl_last], x[2 * hkl_last], mode, fill);
            },
            begin, end);
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
      accumulate_grid_grad<T>(n, grad_grid, [&](int64_t p, auto& add) NANOBRAGG_LAMBDA_INLINE {
        T x[3], g, vp[3];
        point(p, x, g, vp);
        tricubic_double_backward_grid_scatter<T>(shape.size, shape.lo, x[0], x[1], x[2], mode, g,
                                                 vp, add);
      });
    }
  });
  return {grad_grad_output, grad_grid, grad_hkl};
}

}  // namespace CPU_CAPABILITY
}  // namespace tricubic
}  // namespace nanobragg
