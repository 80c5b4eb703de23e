// CPU kernels of nanobragg::detector_absorption and its backward. The
// per-pixel math is absorption_math.h, the same code the CUDA kernels run.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

#include "absorption/absorption_layout.h"
#include "absorption/absorption_math.h"
#include "checks.h"
#include "common/point_offsets.h"

namespace nanobragg {
namespace absorption {
namespace {

constexpr const char* kForward = "nanobragg::detector_absorption";
constexpr const char* kBackward = "nanobragg::detector_absorption_backward";

// Pixels per task: a few exps each.
constexpr int64_t kPixelGrain = 1024;
// Pixels per block of the scalar reductions (thickness, attenuation length,
// odet). Fixed, so the summation order never depends on the thread count.
constexpr int64_t kReduceBlock = 4096;

}  // namespace

at::Tensor detector_absorption_cpu(const at::Tensor& intensity,
                                   const at::Tensor& pixel_coords,
                                   const at::Tensor& odet,
                                   const at::Tensor& thickness,
                                   const at::Tensor& attenuation_length,
                                   int64_t thicksteps, bool oversample_thick,
                                   bool per_layer) {
  const auto layout = checks::check_absorption_args(
      kForward, intensity, pixel_coords, odet, thickness, attenuation_length,
      thicksteps, per_layer);
  const HostScalars scalars = read_scalars(kForward, odet, thickness, attenuation_length);
  ExpandedInputs in = expand_inputs(intensity, pixel_coords, layout, per_layer);
  at::Tensor out = at::empty(in.pixel_shape, intensity.options());
  if (in.num_pixels == 0) {
    return out;
  }
  const auto offsets = in.pixel_offsets(out);  // out's own offsets unused
  AT_DISPATCH_FLOATING_TYPES(intensity.scalar_type(), "detector_absorption_cpu", [&] {
    const auto prm = make_params<scalar_t>(scalars, thicksteps, oversample_thick);
    const auto source = in.source<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, in.num_pixels, kPixelGrain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        int64_t off[3];
        offsets.get(p, off);
        o[p] = absorbed_pixel(prm, source.at(off[0], off[1]));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
detector_absorption_backward_cpu(const at::Tensor& grad_output,
                                 const at::Tensor& intensity,
                                 const at::Tensor& pixel_coords,
                                 const at::Tensor& odet,
                                 const at::Tensor& thickness,
                                 const at::Tensor& attenuation_length,
                                 int64_t thicksteps, bool oversample_thick,
                                 bool per_layer, std::array<bool, 5> output_mask) {
  const auto layout = checks::check_absorption_args(
      kBackward, intensity, pixel_coords, odet, thickness, attenuation_length,
      thicksteps, per_layer);
  checks::check_absorption_grad_output(kBackward, grad_output, intensity, layout);
  const HostScalars scalars = read_scalars(kBackward, odet, thickness, attenuation_length);
  ExpandedInputs in = expand_inputs(intensity, pixel_coords, layout, per_layer);

  // Gradients of the expanded inputs: one slot per pixel (and per layer when
  // the input has a layer dimension), so no two pixels write the same slot.
  at::Tensor grad_intensity_full, grad_coords_full;
  if (output_mask[0]) {
    grad_intensity_full = at::zeros(in.intensity.sizes(), intensity.options());
  }
  if (output_mask[1]) {
    grad_coords_full = at::zeros(in.coords.sizes(), pixel_coords.options());
  }
  const int64_t n = in.num_pixels;
  const int64_t blocks = (n + kReduceBlock - 1) / kReduceBlock;
  std::vector<std::array<double, 4>> partial(static_cast<size_t>(blocks), {0, 0, 0, 0});
  if (n > 0) {
    const auto offsets = in.pixel_offsets(grad_output);
    AT_DISPATCH_FLOATING_TYPES(intensity.scalar_type(), "detector_absorption_backward_cpu", [&] {
      const auto prm = make_params<scalar_t>(scalars, thicksteps, oversample_thick);
      const auto source = in.source<scalar_t>();
      const scalar_t* g = grad_output.const_data_ptr<scalar_t>();
      scalar_t* gI = output_mask[0] ? grad_intensity_full.mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* gP = output_mask[1] ? grad_coords_full.mutable_data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
        for (int64_t b = block_begin; b < block_end; ++b) {
          std::array<double, 4> acc = {0, 0, 0, 0};
          const int64_t end = std::min(n, (b + 1) * kReduceBlock);
          for (int64_t p = b * kReduceBlock; p < end; ++p) {
            int64_t off[3];
            offsets.get(p, off);
            // The full gradients are contiguous: [layers, *P] and [layers, *P, 3].
            PixelGrads<scalar_t> out{gI == nullptr ? nullptr : gI + p, n,
                                     gP == nullptr ? nullptr : gP + 3 * p, 3 * n, 1,
                                     scalar_t(0), {scalar_t(0), scalar_t(0), scalar_t(0)}};
            absorbed_pixel_backward(prm, source.at(off[0], off[1]), g[off[2]], out);
            acc[0] += static_cast<double>(out.d_step);
            for (int d = 0; d < 3; ++d) {
              acc[1 + d] += static_cast<double>(out.odet[d]);
            }
          }
          partial[static_cast<size_t>(b)] = acc;
        }
      });
    });
  }
  std::array<double, 4> total = {0, 0, 0, 0};
  for (const auto& block : partial) {  // fixed order
    for (int k = 0; k < 4; ++k) {
      total[k] += block[k];
    }
  }

  const auto opts = intensity.options();
  at::Tensor grad_intensity = output_mask[0] ? in.reduce_to_intensity(grad_intensity_full)
                                             : at::empty({0}, opts);
  at::Tensor grad_coords = output_mask[1] ? in.reduce_to_coords(grad_coords_full)
                                          : at::empty({0}, opts);
  auto [grad_odet, grad_thickness, grad_att] =
      scalar_grads(total, scalars, thicksteps, output_mask, opts);
  return {grad_intensity, grad_coords, grad_odet, grad_thickness, grad_att};
}

}  // namespace absorption
}  // namespace nanobragg

TORCH_LIBRARY_IMPL(nanobragg, CPU, m) {
  m.impl("detector_absorption",
         TORCH_FN(nanobragg::absorption::detector_absorption_cpu));
  m.impl("detector_absorption_backward",
         TORCH_FN(nanobragg::absorption::detector_absorption_backward_cpu));
}
