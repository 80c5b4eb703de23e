// CUDA kernels of nanobragg::detector_absorption and its backward. The
// per-pixel math is absorption_math.h, the code the CPU kernels run, and the
// scalar chain rule is absorption_scalars.h, the CPU's too.
//
// Nothing here waits for the host: scalars on the GPU are read by the
// kernels themselves (ScalarArgs), and the scalar gradients are reduced on
// the GPU: per block in a fixed tree, then over blocks by one block in a
// fixed order (deterministic, over a number of blocks set by the pixel count
// alone, so the same on GPUs of any SM count), which also applies the chain
// rule to thickness and attenuation length. So the ops can be captured in CUDA
// graphs. One thread per pixel; every pixel writes only its own gradient
// slots.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "common/library_init.h"

#include <algorithm>
#include <array>
#include <tuple>

#include "absorption/absorption_layout.h"
#include "absorption/absorption_math.h"
#include "absorption/absorption_scalars.h"
#include "common/checks.h"
#include "common/cuda_launch.h"
#include "common/point_offsets.h"

namespace nanobragg {
namespace absorption {
namespace {

constexpr const char* kForward = "nanobragg::detector_absorption";
constexpr const char* kBackward = "nanobragg::detector_absorption_backward";
constexpr const char* kDoubleBackward = "nanobragg::detector_absorption_double_backward";
using cuda::blocks_for;
using cuda::grid_stride;
using cuda::kThreads;

// Sums v over the block's threads in a fixed tree; the result is valid in
// thread 0. `shared` holds K * kThreads doubles.
template <int K>
__device__ void block_sums(double (&v)[K], double (*shared)[kThreads]) {
  for (int k = 0; k < K; ++k) {
    shared[k][threadIdx.x] = v[k];
  }
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      for (int k = 0; k < K; ++k) {
        shared[k][threadIdx.x] += shared[k][threadIdx.x + half];
      }
    }
    __syncthreads();
  }
  for (int k = 0; k < K; ++k) {
    v[k] = shared[k][0];
  }
}

// Writes the block's sums of acc to partials[K * blockIdx.x ..].
template <int K>
__device__ void store_block_sums(double (&acc)[K], double* __restrict__ partials) {
  __shared__ double shared[K][kThreads];
  block_sums<K>(acc, shared);
  if (threadIdx.x == 0) {
    for (int k = 0; k < K; ++k) {
      partials[K * blockIdx.x + k] = acc[k];
    }
  }
}

// One block: sums the partials of `blocks` blocks (thread i takes blocks
// i, i + kThreads, ... in order, then the fixed tree), and turns the totals
// into the five scalar gradients (float64; odet x, y, z, thickness, att).
template <int K, typename Finish>
__global__ void finish_scalar_grads_kernel(const double* __restrict__ partials, int64_t blocks,
                                           Finish finish, double* __restrict__ out) {
  __shared__ double shared[K][kThreads];
  double acc[K];
  for (int k = 0; k < K; ++k) acc[k] = 0.0;
  for (int64_t b = threadIdx.x; b < blocks; b += kThreads) {
    for (int k = 0; k < K; ++k) acc[k] += partials[K * b + k];
  }
  block_sums<K>(acc, shared);
  if (threadIdx.x == 0) {
    double grads[5];
    finish(acc, grads);
    for (int i = 0; i < 5; ++i) out[i] = grads[i];
  }
}

struct FinishBackward {
  ScalarArgs scalars;
  int64_t layers;
  __device__ void operator()(const double (&total)[kBackwardTotals], double (&out)[5]) const {
    backward_scalar_grads(total, scalars.get(), layers, out);
  }
};

struct FinishDoubleBackward {
  ScalarArgs scalars, dir;
  int64_t layers;
  __device__ void operator()(const double (&total)[kDoubleBackwardTotals], double (&out)[5]) const {
    double_backward_scalar_grads(total, scalars.get(), dir.get(), layers, out);
  }
};

// The per-block partials and their reduction into the scalar gradients, all
// on the stream; the [5] float64 result is handed to scalar_grad_tensors.
template <int K, typename Finish>
at::Tensor reduce_scalar_grads(const at::Tensor& partials, int64_t blocks, const Finish& finish,
                               cudaStream_t stream) {
  at::Tensor out = at::empty({5}, partials.options());
  finish_scalar_grads_kernel<K, Finish><<<1, kThreads, 0, stream>>>(
      partials.const_data_ptr<double>(), blocks, finish, out.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

template <typename T>
__global__ void forward_kernel(ScalarArgs scalars, int64_t layers, bool oversample,
                               PixelSource<T> source, PointOffsets<3> offsets, int64_t n,
                               T* __restrict__ out) {
  const AbsorptionParams<T> prm = params_from<T>(scalars.get(), layers, oversample);
  grid_stride(n, [&](int64_t p) {
    int64_t off[3];
    offsets.get(p, off);
    out[p] = absorbed_pixel(prm, source.at(off[0], off[1]));
  });
}

template <typename T>
__global__ void backward_kernel(ScalarArgs scalars, int64_t layers, bool oversample,
                                PixelSource<T> source, const T* __restrict__ grad,
                                PointOffsets<3> offsets, int64_t n, T* grad_intensity,
                                T* grad_coords, double* __restrict__ partials) {
  const AbsorptionParams<T> prm = params_from<T>(scalars.get(), layers, oversample);
  double acc[kBackwardTotals] = {0.0, 0.0, 0.0, 0.0};
  grid_stride(n, [&](int64_t p) {
    int64_t off[3];
    offsets.get(p, off);
    PixelGrads<T> out = pixel_grads_at(grad_intensity, grad_coords, p, n);
    absorbed_pixel_backward(prm, source.at(off[0], off[1]), grad[off[2]], out);
    acc[0] += static_cast<double>(out.d_step);
    for (int d = 0; d < 3; ++d) {
      acc[1 + d] += static_cast<double>(out.odet[d]);
    }
  });
  store_block_sums<kBackwardTotals>(acc, partials);
}

template <typename T>
__global__ void double_backward_kernel(ScalarArgs scalars, ScalarArgs dir, int64_t layers,
                                       bool oversample, PixelSource<T> source,
                                       PixelSource<T> tangent, const T* __restrict__ grad,
                                       PointOffsets<5> offsets, int64_t n, bool input_grads,
                                       T* grad_grad_output, T* grad_intensity, T* grad_coords,
                                       double* __restrict__ partials) {
  const AbsorptionParams<Dual<T>> prm =
      dual_params_from<T>(scalars.get(), dir.get(), layers, oversample);
  double acc[kDoubleBackwardTotals] = {0.0, 0.0, 0.0, 0.0, 0.0};
  grid_stride(n, [&](int64_t p) {
    int64_t off[5];
    offsets.get(p, off);
    const DualPixel<T> px(source.at(off[0], off[1]), tangent.at(off[3], off[4]));
    DualPixelGrads<T> out(pixel_grads_at(grad_intensity, grad_coords, p, n));
    const T d_g = absorbed_pixel_double_backward(prm, px, grad[off[2]], input_grads, out);
    if (grad_grad_output != nullptr) grad_grad_output[p] = d_g;
    acc[0] += static_cast<double>(out.d_step.v);
    acc[1] += static_cast<double>(out.d_step.d);
    for (int d = 0; d < 3; ++d) {
      acc[2 + d] += static_cast<double>(out.odet[d].d);
    }
  });
  store_block_sums<kDoubleBackwardTotals>(acc, partials);
}

// Whether any of the scalar gradients (the last three of `mask`) is wanted.
template <size_t N>
bool any_scalar_grad(const std::array<bool, N>& mask) {
  return mask[N - 3] || mask[N - 2] || mask[N - 1];
}

}  // namespace

at::Tensor detector_absorption_cuda(const at::Tensor& intensity, const at::Tensor& pixel_coords,
                                    const at::Tensor& odet, const at::Tensor& thickness,
                                    const at::Tensor& attenuation_length, int64_t thicksteps,
                                    bool oversample_thick, bool per_layer) {
  PreparedCall call = prepare_call(kForward, nullptr, intensity, pixel_coords, odet, thickness,
                                   attenuation_length, thicksteps, per_layer);
  const ScalarArgs scalars = device_scalars(kForward, odet, thickness, attenuation_length);
  ExpandedInputs& in = call.in;
  const c10::cuda::CUDAGuard guard(intensity.device());
  at::Tensor out = at::empty(in.pixel_shape, intensity.options());
  const int64_t n = in.num_pixels;
  if (n == 0) {
    return out;
  }
  const auto offsets = in.pixel_offsets(out);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(intensity.scalar_type(), "detector_absorption_cuda", [&] {
    forward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        scalars, thicksteps, oversample_thick, in.source<scalar_t>(), offsets, n,
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
detector_absorption_backward_cuda(const at::Tensor& grad_output, const at::Tensor& intensity,
                                  const at::Tensor& pixel_coords, const at::Tensor& odet,
                                  const at::Tensor& thickness, const at::Tensor& attenuation_length,
                                  int64_t thicksteps, bool oversample_thick, bool per_layer,
                                  std::array<bool, 5> output_mask) {
  PreparedCall call = prepare_call(kBackward, &grad_output, intensity, pixel_coords, odet,
                                   thickness, attenuation_length, thicksteps, per_layer);
  const ScalarArgs scalars = device_scalars(kBackward, odet, thickness, attenuation_length);
  ExpandedInputs& in = call.in;
  const c10::cuda::CUDAGuard guard(intensity.device());
  const auto opts = intensity.options();
  FullGrads full = allocate_full_grads(in, output_mask, opts);
  const int64_t n = in.num_pixels;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = cuda::reduction_blocks_for(n);  // (fixed sum order)
  // (With no pixels, one block writes zero partials: the scalar gradients
  // are then zero, through the same code.)
  at::Tensor partials = at::empty({blocks, kBackwardTotals}, opts.dtype(at::kDouble));
  at::Tensor grad = grad_output;  // (or a contiguous copy: pixel_offsets)
  const auto offsets = in.pixel_offsets(grad);
  AT_DISPATCH_FLOATING_TYPES(intensity.scalar_type(), "detector_absorption_backward_cuda", [&] {
    backward_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        scalars, thicksteps, oversample_thick, in.source<scalar_t>(),
        grad.const_data_ptr<scalar_t>(), offsets, n, full.intensity_ptr<scalar_t>(),
        full.coords_ptr<scalar_t>(), partials.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const at::Tensor values = any_scalar_grad(output_mask)
                                ? reduce_scalar_grads<kBackwardTotals>(
                                      partials, blocks, FinishBackward{scalars, thicksteps}, stream)
                                : at::Tensor();
  const auto scalar_grads =
      scalar_grad_tensors(values, {output_mask[2], output_mask[3], output_mask[4]}, odet, thickness,
                          attenuation_length);
  return finish_backward(in, full, scalar_grads, output_mask, opts);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
detector_absorption_double_backward_cuda(
    const std::optional<at::Tensor>& gg_intensity, const std::optional<at::Tensor>& gg_coords,
    const std::optional<at::Tensor>& gg_odet, const std::optional<at::Tensor>& gg_thickness,
    const std::optional<at::Tensor>& gg_att, const at::Tensor& grad_output,
    const at::Tensor& intensity, const at::Tensor& pixel_coords, const at::Tensor& odet,
    const at::Tensor& thickness, const at::Tensor& attenuation_length, int64_t thicksteps,
    bool oversample_thick, bool per_layer, std::array<bool, 6> output_mask) {
  DoubleBackwardCall c = prepare_double_backward(
      kDoubleBackward, {gg_intensity, gg_coords, gg_odet, gg_thickness, gg_att}, grad_output,
      intensity, pixel_coords, odet, thickness, attenuation_length, thicksteps, per_layer,
      output_mask);
  const ScalarArgs scalars = device_scalars(kDoubleBackward, odet, thickness, attenuation_length);
  const ScalarArgs dir_scalars = device_direction(c.dir);
  // (named references: lambdas cannot capture structured bindings)
  ExpandedInputs& in = c.call.in;
  DualDirection& dir = c.dir;
  at::Tensor& grad_grad_output = c.grad_grad_output;
  FullGrads& full = c.full;
  const bool input_grads = c.input_grads;
  const c10::cuda::CUDAGuard guard(intensity.device());
  const auto opts = intensity.options();
  const int64_t n = in.num_pixels;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = cuda::reduction_blocks_for(n);  // (fixed sum order)
  at::Tensor partials = at::empty({blocks, kDoubleBackwardTotals}, opts.dtype(at::kDouble));
  at::Tensor grad = grad_output;  // (or a contiguous copy: dual_pixel_offsets)
  const auto offsets = dual_pixel_offsets(in, dir.tangent, grad);
  AT_DISPATCH_FLOATING_TYPES(
      intensity.scalar_type(), "detector_absorption_double_backward_cuda", [&] {
        double_backward_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
            scalars, dir_scalars, thicksteps, oversample_thick, in.source<scalar_t>(),
            dir.tangent.source<scalar_t>(), grad.const_data_ptr<scalar_t>(), offsets, n,
            input_grads, output_mask[0] ? grad_grad_output.mutable_data_ptr<scalar_t>() : nullptr,
            full.intensity_ptr<scalar_t>(), full.coords_ptr<scalar_t>(),
            partials.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  const at::Tensor values =
      any_scalar_grad(output_mask)
          ? reduce_scalar_grads<kDoubleBackwardTotals>(
                partials, blocks, FinishDoubleBackward{scalars, dir_scalars, thicksteps}, stream)
          : at::Tensor();
  const auto scalar_grads =
      scalar_grad_tensors(values, {output_mask[3], output_mask[4], output_mask[5]}, odet, thickness,
                          attenuation_length);
  return finish_double_backward(in, grad_grad_output, full, scalar_grads, output_mask, opts);
}

}  // namespace absorption
}  // namespace nanobragg

NANOBRAGG_LIBRARY_IMPL(CUDA, m) {
  m.impl("detector_absorption", TORCH_FN(nanobragg::absorption::detector_absorption_cuda));
  m.impl("detector_absorption_backward",
         TORCH_FN(nanobragg::absorption::detector_absorption_backward_cuda));
  m.impl("detector_absorption_double_backward",
         TORCH_FN(nanobragg::absorption::detector_absorption_double_backward_cuda));
}
