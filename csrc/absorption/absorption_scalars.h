// The scalar inputs of detector_absorption (odet, thickness,
// attenuation_length) and the chain rule between them and the per-pixel
// parameters, for host and device alike. The CPU kernels evaluate these on
// the host from values read there; the CUDA kernels evaluate them on the
// device from values they read themselves (ScalarArgs), so no CUDA call waits
// for the host. Only c10 headers and <cmath>.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#include "absorption/absorption_math.h"
#include "common/dual.h"
#include "common/macros.h"

namespace nanobragg {
namespace absorption {

// odet x, y, z, thickness, attenuation_length, as doubles.
struct ScalarValues {
  double odet[3];
  double thickness;
  double attenuation_length;
};

// What the contract accepts: thickness finite and >= 0, attenuation length
// > 0 (inf: nothing is absorbed). NaN fails both.
NANOBRAGG_INLINE bool thickness_valid(double thickness) {
  return thickness >= 0.0 && thickness < INFINITY;
}
NANOBRAGG_INLINE bool attenuation_length_valid(double attenuation_length) {
  return attenuation_length > 0.0;
}
NANOBRAGG_INLINE bool lengths_valid(const ScalarValues& s) {
  return thickness_valid(s.thickness) && attenuation_length_valid(s.attenuation_length);
}

// Per-pixel parameters. Invalid scalars only get here when they live on the
// GPU, where reading them for an error would stall the stream: then every
// output (and gradient) is NaN rather than a plausible number.
template <typename T>
NANOBRAGG_INLINE AbsorptionParams<T> params_from(const ScalarValues& s, int64_t layers,
                                                 bool oversample) {
  AbsorptionParams<T> prm;
  for (int d = 0; d < 3; ++d) {
    prm.odet[d] = static_cast<T>(s.odet[d]);
  }
  const bool valid = lengths_valid(s);
  prm.step =
      valid ? static_cast<T>(s.thickness / (static_cast<double>(layers) * s.attenuation_length))
            : static_cast<T>(NAN);
  prm.layers = layers;
  prm.thick = !valid || s.thickness > 0.0;
  prm.oversample = oversample;
  return prm;
}

// The scalar chain rule below is written with ratios (thickness / (L att),
// datt / att) rather than mu = 1 / att and its square, which overflows for
// att < 1e-154 where the ratios do not; and a gradient sum that is exactly 0
// contributes 0, not 0 * inf = NaN, where a ratio does overflow (a huge
// thickness over a tiny attenuation length: every capture saturated). A NaN
// factor stays NaN.
NANOBRAGG_INLINE double zero_stays_zero(double gradient, double factor) {
  return gradient == 0.0 && factor == factor ? 0.0 : gradient * factor;
}

// Invalid lengths reach the kernels only from the GPU (params_from): then the
// scalars' gradients are NaN too, whatever the pixel sums (an empty image's
// are 0).
NANOBRAGG_INLINE bool nan_if_invalid(const ScalarValues& s, double (&out)[5]) {
  if (lengths_valid(s)) {
    return false;
  }
  for (double& v : out) v = NAN;
  return true;
}

// The same on duals whose derivative part is the direction `dir` (the
// double backward's cotangents of the scalar gradients). s = thickness /
// (L att), so ds = (dthickness - thickness datt / att) / (L att) (0 for
// att = inf).
template <typename T>
NANOBRAGG_INLINE AbsorptionParams<Dual<T>> dual_params_from(const ScalarValues& s,
                                                            const ScalarValues& dir, int64_t layers,
                                                            bool oversample) {
  const AbsorptionParams<T> v = params_from<T>(s, layers, oversample);
  const double L = static_cast<double>(layers);
  const double att = s.attenuation_length;
  const double ds = (dir.thickness - s.thickness * (dir.attenuation_length / att)) / (L * att);
  AbsorptionParams<Dual<T>> prm;
  for (int d = 0; d < 3; ++d) {
    prm.odet[d] = Dual<T>(v.odet[d], static_cast<T>(dir.odet[d]));
  }
  prm.step = Dual<T>(v.step, static_cast<T>(ds));
  prm.layers = v.layers;
  prm.thick = v.thick;
  prm.oversample = v.oversample;
  return prm;
}

// Pixel sums of the backward: dL/ds, dL/dodet (x, y, z).
constexpr int kBackwardTotals = 4;
// Of the double backward: dL/ds (value, derivative), d(dL/dodet) (x, y, z).
constexpr int kDoubleBackwardTotals = 5;

// The backward's gradients of (odet x, y, z, thickness, att) from its pixel
// sums: s = thickness / (L att), so ds/dT = 1 / (L att) and
// ds/datt = -s / att, both 0 for att = inf.
NANOBRAGG_INLINE void backward_scalar_grads(const double (&total)[kBackwardTotals],
                                            const ScalarValues& s, int64_t layers,
                                            double (&out)[5]) {
  const double L = static_cast<double>(layers);
  const double att = s.attenuation_length;
  const double D = total[0];  // dL/ds
  if (nan_if_invalid(s, out)) return;
  out[0] = total[1];
  out[1] = total[2];
  out[2] = total[3];
  out[3] = D / (L * att);
  out[4] = -zero_stays_zero(D, s.thickness / (L * att)) / att;
}

// The double backward's: the chain rule above differentiated too. With
// D = dL/ds, grad_thickness = D / (L att) and grad_att = -D s / att, their
// derivatives along dir are (dD - D datt / att) / (L att) and
// -(dD s + D dthickness / (L att) - 2 D s datt / att) / att.
NANOBRAGG_INLINE void double_backward_scalar_grads(const double (&total)[kDoubleBackwardTotals],
                                                   const ScalarValues& s, const ScalarValues& dir,
                                                   int64_t layers, double (&out)[5]) {
  const double L = static_cast<double>(layers);
  const double att = s.attenuation_length;
  const double step = s.thickness / (L * att);
  const double att_ratio = dir.attenuation_length / att;
  const double D = total[0], dD = total[1];
  if (nan_if_invalid(s, out)) return;
  out[0] = total[2];
  out[1] = total[3];
  out[2] = total[4];
  out[3] = (dD - zero_stays_zero(D, att_ratio)) / (L * att);
  out[4] = -(zero_stays_zero(dD, step) + zero_stays_zero(D, dir.thickness / (L * att)) -
             2.0 * zero_stays_zero(zero_stays_zero(D, step), att_ratio)) /
           att;
}

// The dtypes a scalar argument may have in device memory (odet, thickness
// and attenuation_length follow PyTorch's scalar rules: any floating dtype).
enum class ScalarDtype : uint8_t { Float32, Float64, Float16, BFloat16 };

// One scalar as a kernel receives it: a value read on the host (from a CPU
// tensor, or absent: 0), or the address of an element of `dtype` in device
// memory, read by the kernel itself. c10::Half / c10::BFloat16 convert to
// float on host and device alike.
struct ScalarArg {
  const void* device = nullptr;
  ScalarDtype dtype = ScalarDtype::Float32;
  double host = 0.0;

  NANOBRAGG_INLINE double get() const {
    if (device == nullptr) return host;
    switch (dtype) {
      case ScalarDtype::Float64:
        return *static_cast<const double*>(device);
      case ScalarDtype::Float16:
        return static_cast<double>(static_cast<float>(*static_cast<const c10::Half*>(device)));
      case ScalarDtype::BFloat16:
        return static_cast<double>(static_cast<float>(*static_cast<const c10::BFloat16*>(device)));
      case ScalarDtype::Float32:
      default:
        return static_cast<double>(*static_cast<const float*>(device));
    }
  }
};

// The five scalars of a call (odet x, y, z, thickness, attenuation_length).
struct ScalarArgs {
  ScalarArg arg[5];

  NANOBRAGG_INLINE ScalarValues get() const {
    return ScalarValues{{arg[0].get(), arg[1].get(), arg[2].get()}, arg[3].get(), arg[4].get()};
  }
};

}  // namespace absorption
}  // namespace nanobragg
