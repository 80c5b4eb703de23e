// CUDA kernels of nanobragg::detector_absorption and its backward. The
// per-pixel math is absorption_math.h, the code the CPU kernels run.
// One thread per pixel; every pixel writes only its own gradient slots, and
// the scalar gradients (odet, thickness, attenuation length) are reduced per
// block in a fixed tree, then over blocks by at::sum: deterministic.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>

#include "absorption/absorption_layout.h"
#include "absorption/absorption_math.h"
#include "checks.h"
#include "common/cuda_launch.h"
#include "common/point_offsets.h"

namespace nanobragg {
namespace absorption {
namespace {

constexpr const char* kForward = "nanobragg::detector_absorption";
constexpr const char* kBackward = "nanobragg::detector_absorption_backward";
constexpr const char* kDoubleBackward = "nanobragg::detector_absorption_double_backward";
using cuda::kThreads;

// The backward's block count also sizes its partial-sums buffer.
int64_t blocks_for(int64_t n) { return cuda::blocks_for(n, int64_t(1) << 16); }

// Sums acc over the block in a fixed tree and writes the K sums to
// partials[K * block ..].
template <int K>
__device__ void store_block_sums(const double (&acc)[K], double* __restrict__ partials) {
  __shared__ double shared[K][kThreads];
  for (int k = 0; k < K; ++k) {
    shared[k][threadIdx.x] = acc[k];
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
  if (threadIdx.x == 0) {
    for (int k = 0; k < K; ++k) {
      partials[K * blockIdx.x + k] = shared[k][0];
    }
  }
}

template <typename T>
__global__ void forward_kernel(AbsorptionParams<T> prm, PixelSource<T> source,
                               PointOffsets<3> offsets, int64_t n, T* __restrict__ out) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < n;
       p += int64_t(blockDim.x) * gridDim.x) {
    int64_t off[3];
    offsets.get(p, off);
    out[p] = absorbed_pixel(prm, source.at(off[0], off[1]));
  }
}

template <typename T>
__global__ void backward_kernel(AbsorptionParams<T> prm, PixelSource<T> source,
                                const T* __restrict__ grad, PointOffsets<3> offsets,
                                int64_t n, T* grad_intensity, T* grad_coords,
                                double* __restrict__ partials) {
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < n;
       p += int64_t(blockDim.x) * gridDim.x) {
    int64_t off[3];
    offsets.get(p, off);
    PixelGrads<T> out = pixel_grads_at(grad_intensity, grad_coords, p, n);
    absorbed_pixel_backward(prm, source.at(off[0], off[1]), grad[off[2]], out);
    acc[0] += static_cast<double>(out.d_step);
    for (int d = 0; d < 3; ++d) {
      acc[1 + d] += static_cast<double>(out.odet[d]);
    }
  }
  store_block_sums<4>(acc, partials);
}

template <typename T>
__global__ void double_backward_kernel(AbsorptionParams<Dual<T>> prm, PixelSource<T> source,
                                       PixelSource<T> tangent, const T* __restrict__ grad,
                                       PointOffsets<5> offsets, int64_t n, bool input_grads,
                                       T* grad_grad_output, T* grad_intensity, T* grad_coords,
                                       double* __restrict__ partials) {
  double acc[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < n;
       p += int64_t(blockDim.x) * gridDim.x) {
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
  }
  store_block_sums<5>(acc, partials);
}

}  // namespace

at::Tensor detector_absorption_cuda(const at::Tensor& intensity,
                                    const at::Tensor& pixel_coords,
                                    const at::Tensor& odet,
                                    const at::Tensor& thickness,
                                    const at::Tensor& attenuation_length,
                                    int64_t thicksteps, bool oversample_thick,
                                    bool per_layer) {
  PreparedCall call = prepare_call(kForward, nullptr, intensity, pixel_coords, odet, thickness,
                                    attenuation_length, thicksteps, per_layer);
  const HostScalars& scalars = call.scalars;  // (lambdas cannot capture bindings)
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
        make_params<scalar_t>(scalars, thicksteps, oversample_thick),
        in.source<scalar_t>(), offsets, n, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
detector_absorption_backward_cuda(const at::Tensor& grad_output,
                                  const at::Tensor& intensity,
                                  const at::Tensor& pixel_coords,
                                  const at::Tensor& odet,
                                  const at::Tensor& thickness,
                                  const at::Tensor& attenuation_length,
                                  int64_t thicksteps, bool oversample_thick,
                                  bool per_layer, std::array<bool, 5> output_mask) {
  PreparedCall call = prepare_call(kBackward, &grad_output, intensity, pixel_coords, odet,
                                    thickness, attenuation_length, thicksteps, per_layer);
  const HostScalars& scalars = call.scalars;  // (lambdas cannot capture bindings)
  ExpandedInputs& in = call.in;
  const c10::cuda::CUDAGuard guard(intensity.device());
  const auto opts = intensity.options();
  FullGrads full = allocate_full_grads(in, output_mask, opts);
  const int64_t n = in.num_pixels;
  std::array<double, 4> total = {0, 0, 0, 0};
  if (n > 0) {
    const int64_t blocks = blocks_for(n);
    at::Tensor partials = at::empty({blocks, 4}, opts.dtype(at::kDouble));
    const auto offsets = in.pixel_offsets(grad_output);
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(intensity.scalar_type(), "detector_absorption_backward_cuda", [&] {
      backward_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          make_params<scalar_t>(scalars, thicksteps, oversample_thick),
          in.source<scalar_t>(), grad_output.const_data_ptr<scalar_t>(), offsets, n,
          full.intensity_ptr<scalar_t>(),
          full.coords_ptr<scalar_t>(),
          partials.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const at::Tensor sums = partials.sum(0).cpu();
    const double* s = sums.const_data_ptr<double>();
    total = {s[0], s[1], s[2], s[3]};
  }
  return finish_backward(in, full, total, scalars, thicksteps, output_mask, opts);
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
  // (named references: lambdas cannot capture structured bindings)
  const HostScalars& scalars = c.call.scalars;
  ExpandedInputs& in = c.call.in;
  const DualDirection& dir = c.dir;
  at::Tensor& grad_grad_output = c.grad_grad_output;
  FullGrads& full = c.full;
  const bool input_grads = c.input_grads;
  const c10::cuda::CUDAGuard guard(intensity.device());
  const auto opts = intensity.options();
  const int64_t n = in.num_pixels;
  DualTotals total = {0, 0, 0, 0, 0};
  if (n > 0) {
    const int64_t blocks = blocks_for(n);
    at::Tensor partials = at::empty({blocks, 5}, opts.dtype(at::kDouble));
    const auto offsets = dual_pixel_offsets(in, dir.tangent, grad_output);
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(intensity.scalar_type(), "detector_absorption_double_backward_cuda",
                               [&] {
      double_backward_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          make_dual_params<scalar_t>(scalars, dir, thicksteps, oversample_thick),
          in.source<scalar_t>(), dir.tangent.source<scalar_t>(),
          grad_output.const_data_ptr<scalar_t>(), offsets, n, input_grads,
          output_mask[0] ? grad_grad_output.mutable_data_ptr<scalar_t>() : nullptr,
          full.intensity_ptr<scalar_t>(), full.coords_ptr<scalar_t>(),
          partials.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const at::Tensor sums = partials.sum(0).cpu();
    const double* s = sums.const_data_ptr<double>();
    total = {s[0], s[1], s[2], s[3], s[4]};
  }
  return finish_double_backward(in, grad_grad_output, full, total, scalars, dir, thicksteps,
                                output_mask, opts);
}

}  // namespace absorption
}  // namespace nanobragg

TORCH_LIBRARY_IMPL(nanobragg, CUDA, m) {
  m.impl("detector_absorption",
         TORCH_FN(nanobragg::absorption::detector_absorption_cuda));
  m.impl("detector_absorption_backward",
         TORCH_FN(nanobragg::absorption::detector_absorption_backward_cuda));
  m.impl("detector_absorption_double_backward",
         TORCH_FN(nanobragg::absorption::detector_absorption_double_backward_cuda));
}
