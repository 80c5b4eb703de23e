// CPU kernels of nanobragg::detector_absorption and its backward. The
// per-pixel math is absorption_math.h, the same code the CUDA kernels run.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "absorption/absorption_layout.h"
#include "absorption/absorption_math.h"
#include "absorption/absorption_scalars.h"
#include "common/checks.h"
#include "common/cpu_kernels.h"
#include "common/cpu_capability.h"
#include "common/point_offsets.h"

#ifndef CPU_CAPABILITY
#error "compiled once per CPU capability by CMakeLists.txt (nanobragg_cpu_kernels), never alone"
#endif
#if !defined(CPU_CAPABILITY_DEFAULT)
#include "absorption/absorption_cpu_vec.h"
#endif

NANOBRAGG_DECLARE_CPU_KERNELS(CPU_CAPABILITY)

namespace nanobragg {
namespace absorption {
namespace CPU_CAPABILITY {
namespace {

constexpr const char* kForward = "nanobragg::detector_absorption";
constexpr const char* kBackward = "nanobragg::detector_absorption_backward";
constexpr const char* kDoubleBackward = "nanobragg::detector_absorption_double_backward";

// Pixels per task: a few exps each.
constexpr int64_t kPixelGrain = 1024;
// Pixels per block of the scalar reductions (thickness, attenuation length,
// odet). Fixed, so the summation order never depends on the thread count.
constexpr int64_t kReduceBlock = 4096;
// Pixels whose incoming gradients one step of the intensity-only backward
// gathers (gather_grad) when their layout has no one stride: 16 rows of a
// 512-pixel detector, a whole cache line of a transposed gradient's column.
constexpr int64_t kGatherBlock = 8192;

// The common case, with its own loops: one intensity and position for all
// layers, contiguous [P] and [P, 3] (pixel strides 1 and 3).
bool contiguous_shared(const ExpandedInputs& in, const PointOffsets<3>& offsets, bool thick) {
  return thick && in.intensity_layers == 1 && in.coords_layers == 1 && offsets.ndim == 1 &&
         offsets.strides[0][0] == 1 && offsets.strides[1][0] == 3 && in.coords.stride(-1) == 1;
}

// Pixels [begin, end) of the common case: out[p] = value[p * value_stride]
// * capture (the forward with value = intensity; the intensity-only backward
// with value = the incoming gradient).
template <typename T>
void shared_forward_range(const AbsorptionParams<T>& prm, const T* value, int64_t value_stride,
                          const T* C, T* out, int64_t begin, int64_t end) {
#if !defined(CPU_CAPABILITY_DEFAULT)
  vec::shared_forward(prm, value, value_stride, C, out, begin, end);
  return;
#endif
  for (int64_t p = begin; p < end; ++p) {
    const T* c = C + 3 * p;
    out[p] = shared_pixel_value(prm.odet[0], prm.odet[1], prm.odet[2], prm.step, prm.layers,
                                prm.oversample, value[p * value_stride], c[0], c[1], c[2]);
  }
}

// Gradients of pixels [0, count) of the common case (incoming gradient of
// pixel p at g[p * g_stride]; callers pass a block's pointers); adds the
// block's dL/ds and dL/dodet to acc when it is not null.
template <typename T>
void shared_backward_block(const AbsorptionParams<T>& prm, const PixelSource<T>& source, const T* g,
                           int64_t g_stride, T* gI, T* gP, int64_t count, double* acc) {
  const T* I = source.intensity;
  const T* C = source.coords;
#if !defined(CPU_CAPABILITY_DEFAULT)
  vec::shared_backward(prm, I, C, g, g_stride, gI, gP, count, acc);
  return;
#endif
  for (int64_t p = 0; p < count; ++p) {
    const T* c = C + 3 * p;
    T grad_I, gp[3], d_step, go[3];
    shared_pixel_grad(prm.odet[0], prm.odet[1], prm.odet[2], prm.step, prm.layers, prm.oversample,
                      I[p], c[0], c[1], c[2], g[p * g_stride], grad_I, gp, d_step, go);
    if (gI != nullptr) gI[p] = grad_I;
    if (gP != nullptr) {
      for (int d = 0; d < 3; ++d) gP[3 * p + d] = gp[d];
    }
    if (acc != nullptr) {
      acc[0] += static_cast<double>(d_step);
      for (int d = 0; d < 3; ++d) acc[1 + d] += static_cast<double>(go[d]);
    }
  }
}

// The incoming gradients of pixels [begin, end) into buf[0, end - begin),
// read through their offsets (operand 2), for a layout that does not merge
// with the inputs' into one stride (a transposed gradient, a slice): each
// task gathers what it needs, in parallel, instead of a serial copy of the
// whole tensor. Runs of the innermost pixel dimension are read one after
// the other; but where, in two dimensions, rows lie closer together in
// memory than a row's elements (a transposed gradient), the block's whole
// rows are read column by column, so that the reads follow memory (read
// row by row, each element is a cache line of its own, and at a
// power-of-two stride the lines all compete for a few cache sets).
template <typename T>
void gather_grad(const T* g, const PointOffsets<3>& offsets, int64_t begin, int64_t end, T* buf) {
  const int64_t inner = offsets.sizes[0], stride = offsets.strides[2][0];
  auto runs = [&](int64_t from, int64_t to) {
    for (int64_t p = from; p < to;) {
      const int64_t run_end = std::min(to, (p / inner + 1) * inner);
      const T* src = g + offsets.get_one(p, 2);
      for (int64_t q = p; q < run_end; ++q) buf[q - begin] = src[(q - p) * stride];
      p = run_end;
    }
  };
  const int64_t row_stride = offsets.ndim == 2 ? offsets.strides[2][1] : 0;
  const int64_t first_row = (begin + inner - 1) / inner, end_row = end / inner;
  if (offsets.ndim != 2 || std::abs(row_stride) >= std::abs(stride) || end_row - first_row < 2) {
    runs(begin, end);
    return;
  }
  runs(begin, first_row * inner);  // a partial first row
  const T* src = g + offsets.get_one(first_row * inner, 2);
  T* dst = buf + (first_row * inner - begin);
  const int64_t rows = end_row - first_row;  // at most a block's
  bool transposed = false;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    if (row_stride == 1 && inner <= std::numeric_limits<int>::max()) {
      // A plain transpose: ATen's, 16 x 16 in AVX-512 registers (its other
      // builds walk column by column, slower than the tiles below).
      at::vec::transpose_mxn<float>(src, stride, dst, inner, static_cast<int>(inner),
                                    static_cast<int>(rows));
      transposed = true;
    }
  }
#endif
  constexpr int64_t kTile = 16;  // columns per tile: its reads and writes stay in L1
  for (int64_t c0 = 0; !transposed && c0 < inner; c0 += kTile) {
    const int64_t c1 = std::min(inner, c0 + kTile);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = c0; c < c1; ++c) dst[r * inner + c] = src[c * stride + r * row_stride];
    }
  }
  runs(end_row * inner, end);  // a partial last row
}

}  // namespace

at::Tensor detector_absorption_cpu(const at::Tensor& intensity, const at::Tensor& pixel_coords,
                                   const at::Tensor& odet, const at::Tensor& thickness,
                                   const at::Tensor& attenuation_length, int64_t thicksteps,
                                   bool oversample_thick, bool per_layer) {
  PreparedCall call = prepare_call(kForward, nullptr, intensity, pixel_coords, odet, thickness,
                                   attenuation_length, thicksteps, per_layer);
  const ScalarValues scalars = read_host_scalars(kForward, odet, thickness, attenuation_length);
  ExpandedInputs& in = call.in;
  at::Tensor out = at::empty(in.pixel_shape, intensity.options());
  if (in.num_pixels == 0) {
    return out;
  }
  const auto offsets = in.pixel_offsets(out);  // out's own offsets unused
  AT_DISPATCH_FLOATING_TYPES(intensity.scalar_type(), "detector_absorption_cpu", [&] {
    const auto prm = params_from<scalar_t>(scalars, thicksteps, oversample_thick);
    const auto source = in.source<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    if (contiguous_shared(in, offsets, prm.thick)) {
      const scalar_t* I = source.intensity;
      const scalar_t* C = source.coords;
      at::parallel_for(0, in.num_pixels, kPixelGrain, [&](int64_t begin, int64_t end) {
        shared_forward_range(prm, I, 1, C, o, begin, end);
      });
      return;
    }
    at::parallel_for(0, in.num_pixels, kPixelGrain, [&](int64_t begin, int64_t end) {
      cpu::for_each_index(
          [&](int64_t p) NANOBRAGG_LAMBDA_INLINE {
            int64_t off[3];
            offsets.get(p, off);
            o[p] = absorbed_pixel(prm, source.at(off[0], off[1]));
          },
          begin, end);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
detector_absorption_backward_cpu(const at::Tensor& grad_output, const at::Tensor& intensity,
                                 const at::Tensor& pixel_coords, const at::Tensor& odet,
                                 const at::Tensor& thickness, const at::Tensor& attenuation_length,
                                 int64_t thicksteps, bool oversample_thick, bool per_layer,
                                 std::array<bool, 5> output_mask) {
  PreparedCall call = prepare_call(kBackward, &grad_output, intensity, pixel_coords, odet,
                                   thickness, attenuation_length, thicksteps, per_layer);
  const ScalarValues scalars = read_host_scalars(kBackward, odet, thickness, attenuation_length);
  ExpandedInputs& in = call.in;

  // Gradients of the expanded inputs: one slot per pixel (and per layer when
  // the input has a layer dimension), so no two pixels write the same slot.
  const auto opts = intensity.options();
  const int64_t n = in.num_pixels;
  // The common case has its own loops for any layout of the incoming
  // gradient: read through its one stride (1; 0 when expanded, as .sum()
  // gives it; any other), or, when its layout does not merge into one
  // dimension with the inputs', gathered block by block (gather_grad) and
  // read with stride 1. Either way each pixel's arithmetic, and each
  // block's sums, are the same, so the gradients do not depend on the
  // incoming gradient's layout.
  at::Tensor layer0 = in.intensity.select(0, 0);
  const bool fast =
      n > 0 && contiguous_shared(in, in.pixel_offsets(layer0), scalars.thickness > 0.0);
  at::Tensor grad = grad_output;  // (or a contiguous copy: pixel_offsets)
  const PointOffsets<3> offsets = in.pixel_offsets(grad);
  const bool gather = fast && offsets.ndim != 1;
  const int64_t g_stride = gather ? 1 : offsets.strides[2][0];
  // What is asked for: only intensity's gradient is g * capture, the
  // forward's formula with g for the intensity; the others need the whole
  // gradient, and the scalar sums only for odet, thickness or the
  // attenuation length.
  const bool need_sums = output_mask[2] || output_mask[3] || output_mask[4];
  const bool intensity_only = !output_mask[1] && !need_sums;
  // The common case writes every slot once: no zeroing needed.
  FullGrads full = allocate_full_grads(in, output_mask, opts, /*zeroed=*/!fast);
  const int64_t blocks = (n + kReduceBlock - 1) / kReduceBlock;
  std::vector<std::array<double, 4>> partial(static_cast<size_t>(blocks), {0, 0, 0, 0});
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES(intensity.scalar_type(), "detector_absorption_backward_cpu", [&] {
      const auto prm = params_from<scalar_t>(scalars, thicksteps, oversample_thick);
      const auto source = in.source<scalar_t>();
      using T = scalar_t;
      const T* g = grad.const_data_ptr<T>();
      T* gI = full.intensity_ptr<T>();
      T* gP = full.coords_ptr<T>();
      // The incoming gradients of pixels [begin, end), from pixel begin on:
      // read in place, or gathered into buf (the same values either way).
      auto grads_of = [&](int64_t begin, int64_t end, std::vector<T>& buf) -> const T* {
        if (!gather) return g + begin * g_stride;
        gather_grad(g, offsets, begin, end, buf.data());
        return buf.data();
      };
      if (fast && intensity_only) {
        if (gI != nullptr) {
          at::parallel_for(0, n, kPixelGrain, [&](int64_t begin, int64_t end) {
            std::vector<T> buf(gather ? static_cast<size_t>(std::min(kGatherBlock, end - begin))
                                      : 0);
            for (int64_t p = begin; p < end; p += kGatherBlock) {
              const int64_t stop = std::min(end, p + kGatherBlock);
              shared_forward_range(prm, grads_of(p, stop, buf), g_stride, source.coords + 3 * p,
                                   gI + p, 0, stop - p);
            }
          });
        }
        return;
      }
      at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
        std::vector<T> buf(gather ? static_cast<size_t>(kReduceBlock) : 0);
        for (int64_t b = block_begin; b < block_end; ++b) {
          std::array<double, 4> acc = {0, 0, 0, 0};
          const int64_t begin = b * kReduceBlock, end = std::min(n, begin + kReduceBlock);
          if (fast) {
            // The block from its own start (the same lanes and sums whether
            // its gradients are read in place or gathered).
            PixelSource<T> block = source;
            block.intensity += begin;
            block.coords += 3 * begin;
            shared_backward_block(prm, block, grads_of(begin, end, buf), g_stride,
                                  gI ? gI + begin : nullptr, gP ? gP + 3 * begin : nullptr,
                                  end - begin, need_sums ? acc.data() : nullptr);
            partial[static_cast<size_t>(b)] = acc;
            continue;
          }
          cpu::for_each_index(
              [&](int64_t p) NANOBRAGG_LAMBDA_INLINE {
                int64_t off[3];
                offsets.get(p, off);
                PixelGrads<scalar_t> out = pixel_grads_at(gI, gP, p, n);
                absorbed_pixel_backward(prm, source.at(off[0], off[1]), g[off[2]], out);
                acc[0] += static_cast<double>(out.d_step);
                for (int d = 0; d < 3; ++d) {
                  acc[1 + d] += static_cast<double>(out.odet[d]);
                }
              },
              begin, end);
          partial[static_cast<size_t>(b)] = acc;
        }
      });
    });
  }
  double total[kBackwardTotals] = {0, 0, 0, 0};
  for (const auto& block : partial) {  // fixed order
    for (int k = 0; k < kBackwardTotals; ++k) {
      total[k] += block[k];
    }
  }
  double grads[5];
  backward_scalar_grads(total, scalars, thicksteps, grads);
  return finish_backward(
      in, full,
      scalar_grad_tensors(grads, {output_mask[2], output_mask[3], output_mask[4]}, odet, thickness,
                          attenuation_length),
      output_mask, opts);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
detector_absorption_double_backward_cpu(
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
  const ScalarValues scalars =
      read_host_scalars(kDoubleBackward, odet, thickness, attenuation_length);
  const ScalarValues dir_scalars = read_host_direction(c.dir);
  // (named references: lambdas cannot capture structured bindings)
  ExpandedInputs& in = c.call.in;
  DualDirection& dir = c.dir;
  at::Tensor& grad_grad_output = c.grad_grad_output;
  FullGrads& full = c.full;
  const bool input_grads = c.input_grads;
  const auto opts = intensity.options();
  const int64_t n = in.num_pixels;
  const int64_t blocks = (n + kReduceBlock - 1) / kReduceBlock;
  std::vector<std::array<double, kDoubleBackwardTotals>> partial(static_cast<size_t>(blocks),
                                                                 {0, 0, 0, 0, 0});
  if (n > 0) {
    at::Tensor grad = grad_output;  // (or a contiguous copy: dual_pixel_offsets)
    const auto offsets = dual_pixel_offsets(in, dir.tangent, grad);
    AT_DISPATCH_FLOATING_TYPES(
        intensity.scalar_type(), "detector_absorption_double_backward_cpu", [&] {
          using T = scalar_t;
          const auto prm = dual_params_from<T>(scalars, dir_scalars, thicksteps, oversample_thick);
          const auto source = in.source<T>();
          const auto tangent = dir.tangent.source<T>();
          const T* g = grad.const_data_ptr<T>();
          T* ggo = output_mask[0] ? grad_grad_output.mutable_data_ptr<T>() : nullptr;
          T* gI = full.intensity_ptr<T>();
          T* gP = full.coords_ptr<T>();
          at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
            for (int64_t b = block_begin; b < block_end; ++b) {
              std::array<double, kDoubleBackwardTotals> acc = {0, 0, 0, 0, 0};
              cpu::for_each_index(
                  [&](int64_t p) NANOBRAGG_LAMBDA_INLINE {
                    int64_t off[5];
                    offsets.get(p, off);
                    const DualPixel<T> px(source.at(off[0], off[1]), tangent.at(off[3], off[4]));
                    DualPixelGrads<T> out(pixel_grads_at(gI, gP, p, n));
                    const T d_g =
                        absorbed_pixel_double_backward(prm, px, g[off[2]], input_grads, out);
                    if (ggo != nullptr) ggo[p] = d_g;
                    acc[0] += static_cast<double>(out.d_step.v);
                    acc[1] += static_cast<double>(out.d_step.d);
                    for (int d = 0; d < 3; ++d) {
                      acc[2 + d] += static_cast<double>(out.odet[d].d);
                    }
                  },
                  b * kReduceBlock, std::min(n, (b + 1) * kReduceBlock));
              partial[static_cast<size_t>(b)] = acc;
            }
          });
        });
  }
  double total[kDoubleBackwardTotals] = {0, 0, 0, 0, 0};
  for (const auto& block : partial) {  // fixed order
    for (int k = 0; k < kDoubleBackwardTotals; ++k) {
      total[k] += block[k];
    }
  }
  double grads[5];
  double_backward_scalar_grads(total, scalars, dir_scalars, thicksteps, grads);
  return finish_double_backward(
      in, grad_grad_output, full,
      scalar_grad_tensors(grads, {output_mask[3], output_mask[4], output_mask[5]}, odet, thickness,
                          attenuation_length),
      output_mask, opts);
}

}  // namespace CPU_CAPABILITY
}  // namespace absorption
}  // namespace nanobragg
