// Per-pixel math of nanobragg::detector_absorption, shared by the CPU and
// CUDA kernels. Only c10 macros and <cmath>.
//
// Contract: docs/CONTRACT.md §2. Per pixel and layer t = 0..L-1:
//   rho_t = dot(odet, p_t / max(|p_t|, 1e-10)), then |rho_t| >= 1e-10 kept
//   a_t   = dz * mu / rho_t  with dz = thickness / L, mu = 1 / attenuation_length
//   c_t   = exp(-t a_t) - exp(-(t+1) a_t)       capture fraction of layer t
//   oversample_thick: out = sum_t c_t I_t;  else out = c_{L-1} * mean_t I_t
// Intensity and position either vary per layer (a leading layer dimension of
// size L) or are shared by all layers (size 1); the kernels pass a layer
// stride of 0 for a shared one.
#pragma once

#include <c10/macros/Macros.h>

#include "common/dual.h"
#include "common/macros.h"

#include <cmath>
#include <cstdint>
#include <cstring>

namespace nanobragg {
namespace absorption {

// Smallest |p| and |rho| the references allow (both clamp at 1e-10).
constexpr double kMinLength = 1e-10;
constexpr double kMinParallax = 1e-10;
// Largest a (a = step / rho, the layer's optical depth along the ray) the
// derivatives see. Past it exp(-a) is 0 in float and double alike, so every
// capture derivative, and dL/da * a, takes the value it has at the cap:
// capping changes no result, but turns an infinite a (a float32 step beyond
// 3.4e38, or a huge step over a grazing parallax) from NaN (0 * inf) into
// that limit. The values need no cap: each capture formula gives its limit
// at a = +-inf (layer 0's by its own branch).
constexpr double kMaxExponent = 1e4;

// ---------------------------------------------------------------------------
// exp and expm1. The device uses CUDA's. On the host, libm's are out-of-line
// calls that cost more than the rest of a pixel and stop loops from
// vectorising, so these are inline and branch-free, in double (for float
// too): range reduction x = k ln2 + r, |r| <= ln2/2, and degree-13 Taylor
// polynomials (truncation below 1e-17 relative); expm1 uses its own series
// near 0, where exp(x) - 1 would cancel. Overflow gives inf, underflow 0,
// NaN stays NaN.

namespace detail {

// 2^k for k in [-1022, 1023], from the exponent bits. (32-bit k: AVX2 has
// packed double <-> int32 conversions but none for int64.)
NANOBRAGG_INLINE double pow2i(int32_t k) {
  const uint64_t bits = static_cast<uint64_t>(static_cast<uint32_t>(k + 1023)) << 52;
  double out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// sum_{n=0..13} r^n / n!, Horner.
NANOBRAGG_INLINE double exp_series(double r) {
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  return p * r + 1.0;
}

NANOBRAGG_INLINE double host_exp(double x) {
  const double xc = x < -746.0 ? -746.0 : (x > 710.0 ? 710.0 : x);  // NaN passes
  // Round to nearest through the 1.5 * 2^52 trick (|x / ln2| < 2^51).
  const double shift = 6755399441055744.0;
  double k = (xc * 1.4426950408889634 + shift) - shift;
  k = k == k ? k : 0.0;  // NaN: any k, the polynomial carries the NaN
  const double r = (xc - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10;
  const int32_t ki = static_cast<int32_t>(k);
  const int32_t k1 = ki >> 1;  // two factors keep each 2^k in range
  return exp_series(r) * pow2i(k1) * pow2i(ki - k1);
}

NANOBRAGG_INLINE double host_expm1(double x) {
  // x + x^2/2! + ... + x^14/14! for |x| < ln2/2.
  double p = 1.0 / 87178291200.0;  // 1/14!
  p = p * x + 1.0 / 6227020800.0;
  p = p * x + 1.0 / 479001600.0;
  p = p * x + 1.0 / 39916800.0;
  p = p * x + 1.0 / 3628800.0;
  p = p * x + 1.0 / 362880.0;
  p = p * x + 1.0 / 40320.0;
  p = p * x + 1.0 / 5040.0;
  p = p * x + 1.0 / 720.0;
  p = p * x + 1.0 / 120.0;
  p = p * x + 1.0 / 24.0;
  p = p * x + 1.0 / 6.0;
  p = p * x + 0.5;
  const double small = (p * x + 1.0) * x;
  const double large = host_exp(x) - 1.0;
  return std::abs(x) < 0.34657359027997264 ? small : large;
}

}  // namespace detail

template <typename T>
NANOBRAGG_INLINE T exp_(T x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return static_cast<T>(detail::host_exp(static_cast<double>(x)));
#endif
}

template <typename T>
NANOBRAGG_INLINE T expm1_(T x) {
#if defined(__CUDA_ARCH__)
  return ::expm1(x);
#else
  return static_cast<T>(detail::host_expm1(static_cast<double>(x)));
#endif
}

// Elementwise primitives of the formulas below. T is a scalar here; the
// CPU's vector path (absorption_cpu_vec.h) overloads them for
// at::vec::Vectorized, so that the same formulas run a register of pixels
// at a time. Hence the style: no branches, comparisons only as
// select_ conditions, constants as T(...).
template <typename T>
NANOBRAGG_INLINE T sqrt_(T x) {
  return std::sqrt(x);
}
template <typename T>
NANOBRAGG_INLINE T abs_(T x) {
  return std::abs(x);
}
template <typename T>
NANOBRAGG_INLINE T max_(T a, T b) {
  return a > b ? a : b;
}
template <typename C, typename T>
NANOBRAGG_INLINE T select_(C condition, T if_true, T if_false) {
  return condition ? if_true : if_false;
}

// The primitives on dual numbers (common/dual.h), so that the formulas below
// also give their own directional derivatives (the double backward).
template <typename T>
NANOBRAGG_INLINE Dual<T> exp_(Dual<T> x) {
  const T e = exp_(x.v);
  return {e, e * x.d};
}
template <typename T>
NANOBRAGG_INLINE Dual<T> expm1_(Dual<T> x) {
  return {expm1_(x.v), exp_(x.v) * x.d};
}
template <typename T>
NANOBRAGG_INLINE Dual<T> sqrt_(Dual<T> x) {
  const T s = sqrt_(x.v);
  return {s, x.d / (T(2) * s)};  // inf at 0, where callers select the clamp
}
template <typename T>
NANOBRAGG_INLINE Dual<T> abs_(Dual<T> x) {
  return x.v < T(0) ? -x : x;
}

// ---------------------------------------------------------------------------

// Parallax of the pixel at (px, py, pz): rho = odet . p / max(|p|, 1e-10),
// with |rho| < 1e-10 replaced by sign(rho) 1e-10 (sign(0) = +1).
template <typename T>
NANOBRAGG_INLINE T parallax(T ox, T oy, T oz, T px, T py, T pz) {
  const T norm = sqrt_(px * px + py * py + pz * pz);
  const T inv = T(1) / max_(norm, T(kMinLength));
  const T rho = (ox * px + oy * py + oz * pz) * inv;
  const T clamped = select_(rho < T(0), T(-kMinParallax), T(kMinParallax));
  return select_(abs_(rho) < T(kMinParallax), clamped, rho);
}

// Parallax of a pixel's position at `layer` (see PixelData).
template <typename T, typename Pixel>
NANOBRAGG_INLINE T pixel_parallax(const T odet[3], const Pixel& px, int64_t layer) {
  return parallax(odet[0], odet[1], odet[2], px.coord(layer, 0), px.coord(layer, 1),
                  px.coord(layer, 2));
}

// The gradient of parallax(): given g_rho = dL/drho, dL/dp = g (o - r p) and
// dL/dodet = g p with g = g_rho / max(|p|, 1e-10) and r = rho / |p| (0 where
// |p| is clamped); both zero where rho was clamped.
template <typename T>
NANOBRAGG_INLINE void parallax_grad(T ox, T oy, T oz, T px, T py, T pz, T g_rho, T grad_p[3],
                                    T grad_odet[3]) {
  const T norm = sqrt_(px * px + py * py + pz * pz);
  const T inv = T(1) / max_(norm, T(kMinLength));
  const T rho = (ox * px + oy * py + oz * pz) * inv;
  const T g = select_(abs_(rho) < T(kMinParallax), T(0), g_rho * inv);
  const T r = select_(norm > T(kMinLength), rho * inv, T(0));
  grad_odet[0] = g * px;
  grad_odet[1] = g * py;
  grad_odet[2] = g * pz;
  grad_p[0] = g * (ox - r * px);
  grad_p[1] = g * (oy - r * py);
  grad_p[2] = g * (oz - r * pz);
}

// a capped above at kMaxExponent, for the derivatives; NaN stays NaN.
template <typename T>
NANOBRAGG_INLINE T capped_exponent(T a) {
  return select_(a > T(kMaxExponent), T(kMaxExponent), a);
}

// a = step / rho of one layer's position, as the derivatives take it.
template <typename T>
NANOBRAGG_INLINE T layer_exponent(T step, T rho) {
  return capped_exponent(step / rho);
}

// a as the value formulas take it: as it is (no cost in the forward's
// vector loop), but capped on dual numbers, whose derivative parts multiply
// a and its derivative by zeros.
template <typename T>
NANOBRAGG_INLINE T value_exponent(T a) {
  return a;
}
template <typename T>
NANOBRAGG_INLINE Dual<T> value_exponent(Dual<T> a) {
  return capped_exponent(a);
}

// c_t(a) = exp(-t a) (1 - exp(-a)), without the cancellation of the plain
// difference when a is small. Layer 0 skips its factor exp(-0 a) = 1, which
// is NaN at a = +-inf.
template <typename T>
NANOBRAGG_INLINE T layer_capture(T a, int64_t t) {
  if (t == 0) return T(0) - expm1_(T(0) - a);
  return exp_(T(-static_cast<double>(t)) * a) * (T(0) - expm1_(T(0) - a));
}

// dc_t/da = -t exp(-t a) + (t+1) exp(-(t+1) a) = exp(-t a) (1 + (t+1) expm1(-a)).
template <typename T>
NANOBRAGG_INLINE T layer_capture_da(T a, int64_t t) {
  if (t == 0) return T(1) + expm1_(T(0) - a);
  return exp_(T(-static_cast<double>(t)) * a) *
         (T(1) + T(static_cast<double>(t + 1)) * expm1_(T(0) - a));
}

// sum_t c_t(a) over L layers telescopes to 1 - exp(-L a).
template <typename T>
NANOBRAGG_INLINE T total_capture(T a, int64_t layers) {
  return T(0) - expm1_(T(-static_cast<double>(layers)) * a);
}

template <typename T>
NANOBRAGG_INLINE T total_capture_da(T a, int64_t layers) {
  return T(static_cast<double>(layers)) * exp_(T(-static_cast<double>(layers)) * a);
}

// Capture fraction of a pixel whose position serves every layer: all layers
// (the telescoped sum) or the last one; and its derivative in a.
template <typename T>
NANOBRAGG_INLINE T shared_position_capture(T a, int64_t layers, bool oversample) {
  return oversample ? total_capture(a, layers) : layer_capture(a, layers - 1);
}
template <typename T>
NANOBRAGG_INLINE T shared_position_capture_da(T a, int64_t layers, bool oversample) {
  return oversample ? total_capture_da(a, layers) : layer_capture_da(a, layers - 1);
}

// The whole computation for a pixel whose intensity and position serve every
// layer (per_layer=false): out = I * capture(a), a = s / rho.
template <typename T>
NANOBRAGG_INLINE T shared_pixel_value(T ox, T oy, T oz, T step, int64_t layers, bool oversample,
                                      T I, T px, T py, T pz) {
  // a = step / rho with rho = dot / |p|, in one division: a = step |p| / dot;
  // |rho| < 1e-10 is |dot| < 1e-10 |p| (|p| clamped as in parallax()).
  const T norm = max_(sqrt_(px * px + py * py + pz * pz), T(kMinLength));
  const T dot = ox * px + oy * py + oz * pz;
  const T clamped_a = step * select_(dot < T(0), T(-1.0 / kMinParallax), T(1.0 / kMinParallax));
  const T a =
      value_exponent(select_(abs_(dot) < T(kMinParallax) * norm, clamped_a, step * norm / dot));
  return I * shared_position_capture(a, layers, oversample);
}

// Its gradients: dL/dI, dL/dp, and the contributions to dL/ds and dL/dodet.
template <typename T>
NANOBRAGG_INLINE void shared_pixel_grad(T ox, T oy, T oz, T step, int64_t layers, bool oversample,
                                        T I, T px, T py, T pz, T g, T& grad_I, T grad_p[3],
                                        T& d_step, T grad_odet[3]) {
  const T rho = parallax(ox, oy, oz, px, py, pz);
  const T a = layer_exponent(step, rho);
  grad_I = g * shared_position_capture(a, layers, oversample);
  const T d_a = g * I * shared_position_capture_da(a, layers, oversample);
  d_step = d_a / rho;
  parallax_grad(ox, oy, oz, px, py, pz, T(0) - d_a * a / rho, grad_p, grad_odet);
}

// Scalars of one call.
template <typename T>
struct AbsorptionParams {
  T odet[3];
  T step;           // s = dz * mu = thickness / (L * attenuation_length)
  int64_t layers;   // L = thicksteps
  bool thick;       // thickness > 0; else out = mean_t I_t
  bool oversample;  // oversample_thick
};

// One pixel's intensities (layer stride 0 when shared by every layer) and
// positions (likewise; comp_stride between x, y, z).
template <typename T>
struct PixelData {
  const T* intensity;
  int64_t intensity_layer_stride;
  int64_t intensity_layers;  // 1 or L
  const T* coords;
  int64_t coords_layer_stride;
  int64_t coords_layers;  // 1 or L
  int64_t comp_stride;

  // Intensity of intensity-layer t (< intensity_layers).
  NANOBRAGG_INLINE T intensity_at(int64_t t) const { return intensity[t * intensity_layer_stride]; }
  // Component d of the position of coords-layer `layer` (< coords_layers).
  NANOBRAGG_INLINE T coord(int64_t layer, int d) const {
    return coords[layer * coords_layer_stride + d * comp_stride];
  }
};

// A pixel of dual numbers: values from one PixelData, derivatives (the
// direction) from another laid out alike.
template <typename T>
struct DualPixel {
  PixelData<T> value, tangent;
  int64_t intensity_layers, coords_layers;

  NANOBRAGG_INLINE DualPixel(const PixelData<T>& v, const PixelData<T>& t)
      : value(v),
        tangent(t),
        intensity_layers(v.intensity_layers),
        coords_layers(v.coords_layers) {}
  NANOBRAGG_INLINE Dual<T> intensity_at(int64_t t) const {
    return {value.intensity_at(t), tangent.intensity_at(t)};
  }
  NANOBRAGG_INLINE Dual<T> coord(int64_t layer, int d) const {
    return {value.coord(layer, d), tangent.coord(layer, d)};
  }
};

// The expanded inputs of a call: PixelData of a pixel from its offsets in
// intensity and pixel_coords (at layer 0).
template <typename T>
struct PixelSource {
  const T* intensity;
  int64_t intensity_layer_stride;
  int64_t intensity_layers;
  const T* coords;
  int64_t coords_layer_stride;
  int64_t coords_layers;
  int64_t comp_stride;

  NANOBRAGG_INLINE PixelData<T> at(int64_t intensity_offset, int64_t coords_offset) const {
    return PixelData<T>{intensity + intensity_offset,
                        intensity_layer_stride,
                        intensity_layers,
                        coords + coords_offset,
                        coords_layer_stride,
                        coords_layers,
                        comp_stride};
  }
};

template <typename T, typename Pixel>
NANOBRAGG_INLINE T mean_intensity(const Pixel& px) {
  T sum = T(0);
  for (int64_t t = 0; t < px.intensity_layers; ++t) {
    sum += px.intensity_at(t);
  }
  return sum / T(px.intensity_layers);
}

// out of one pixel. Pixel is PixelData<T> (or DualPixel for T = Dual).
template <typename T, typename Pixel>
NANOBRAGG_INLINE T absorbed_pixel(const AbsorptionParams<T>& prm, const Pixel& px) {
  if (!prm.thick) {
    return mean_intensity<T>(px);
  }
  const int64_t L = prm.layers;
  if (px.coords_layers == 1 && px.intensity_layers == 1) {
    // One intensity and position for every layer: the formula the CPU's
    // vector loops run, so that every backend rounds alike.
    return shared_pixel_value(prm.odet[0], prm.odet[1], prm.odet[2], prm.step, L, prm.oversample,
                              px.intensity_at(0), px.coord(0, 0), px.coord(0, 1), px.coord(0, 2));
  }
  if (!prm.oversample) {
    const T rho = pixel_parallax(prm.odet, px, px.coords_layers == 1 ? 0 : L - 1);
    return layer_capture(value_exponent(prm.step / rho), L - 1) * mean_intensity<T>(px);
  }
  if (px.coords_layers == 1) {
    const T a = value_exponent(prm.step / pixel_parallax(prm.odet, px, 0));
    if (px.intensity_layers == 1) {
      return px.intensity_at(0) * total_capture(a, L);  // one exp per pixel
    }
    T sum = T(0);
    for (int64_t t = 0; t < L; ++t) {
      sum += layer_capture(a, t) * px.intensity_at(t);
    }
    return sum;
  }
  T sum = T(0);
  for (int64_t t = 0; t < L; ++t) {
    const T a = value_exponent(prm.step / pixel_parallax(prm.odet, px, t));
    sum += layer_capture(a, t) * px.intensity_at(px.intensity_layers == 1 ? 0 : t);
  }
  return sum;
}

// Where one pixel's gradients go. grad_intensity / grad_coords are laid out
// like PixelData (layer stride 0 = shared: contributions of all layers add
// up); either may be null when not asked for. d_step and grad_odet are
// accumulated: the caller reduces them over pixels.
template <typename T>
struct PixelGrads {
  T* intensity;
  int64_t intensity_layer_stride;
  T* coords;
  int64_t coords_layer_stride;
  int64_t comp_stride;
  T d_step;   // dL/ds
  T odet[3];  // dL/dodet

  NANOBRAGG_INLINE void add_intensity(int64_t t, T v) {
    if (intensity != nullptr) intensity[t * intensity_layer_stride] += v;
  }
  NANOBRAGG_INLINE void add_coords(int64_t layer, const T g[3]) {
    if (coords == nullptr) return;
    for (int d = 0; d < 3; ++d) coords[layer * coords_layer_stride + d * comp_stride] += g[d];
  }
};

// Pixel p's slots in contiguous full-shape gradients [layers, *P] and
// [layers, *P, 3] of n pixels (either base may be null: not asked for).
template <typename T>
NANOBRAGG_INLINE PixelGrads<T> pixel_grads_at(T* grad_intensity, T* grad_coords, int64_t p,
                                              int64_t n) {
  return PixelGrads<T>{grad_intensity == nullptr ? nullptr : grad_intensity + p,
                       n,
                       grad_coords == nullptr ? nullptr : grad_coords + 3 * p,
                       3 * n,
                       1,
                       T(0),
                       {T(0), T(0), T(0)}};
}

// The same slots for a backward run on dual numbers: what is stored is the
// derivative part (the double backward's gradient); dL/ds and dL/dodet are
// kept whole, since the caller's chain rule to thickness and attenuation
// length needs both parts.
template <typename T>
struct DualPixelGrads {
  PixelGrads<T> slots;
  Dual<T> d_step;
  Dual<T> odet[3];

  NANOBRAGG_INLINE explicit DualPixelGrads(const PixelGrads<T>& s) : slots(s) {}
  NANOBRAGG_INLINE void add_intensity(int64_t t, Dual<T> v) { slots.add_intensity(t, v.d); }
  NANOBRAGG_INLINE void add_coords(int64_t layer, const Dual<T> g[3]) {
    const T d[3] = {g[0].d, g[1].d, g[2].d};
    slots.add_coords(layer, d);
  }
};

// Adds the gradient of g * absorbed_pixel(prm, px) to `out`. Entries of
// out's intensity / coords slots must start at zero for this pixel. Grads is
// PixelGrads<T> (or DualPixelGrads for T = Dual).
template <typename T, typename Pixel, typename Grads>
NANOBRAGG_INLINE void absorbed_pixel_backward(const AbsorptionParams<T>& prm, const Pixel& px, T g,
                                              Grads& out) {
  const int64_t L = prm.layers;
  const int64_t LI = px.intensity_layers;
  auto add_intensity = [&](int64_t t, T v) { out.add_intensity(LI == 1 ? 0 : t, v); };
  // dL/drho of one layer's position -> dL/dp of that layer, dL/dodet.
  auto add_rho = [&](int64_t layer, T g_rho) {
    T gp[3], go[3];
    parallax_grad(prm.odet[0], prm.odet[1], prm.odet[2], px.coord(layer, 0), px.coord(layer, 1),
                  px.coord(layer, 2), g_rho, gp, go);
    for (int d = 0; d < 3; ++d) {
      out.odet[d] += go[d];
    }
    out.add_coords(layer, gp);
  };
  if (!prm.thick) {
    for (int64_t t = 0; t < LI; ++t) {
      add_intensity(t, g / T(LI));
    }
    return;
  }
  if (px.coords_layers == 1 && LI == 1) {  // as absorbed_pixel: the shared formula
    T grad_I, gp[3], d_step, go[3];
    shared_pixel_grad(prm.odet[0], prm.odet[1], prm.odet[2], prm.step, L, prm.oversample,
                      px.intensity_at(0), px.coord(0, 0), px.coord(0, 1), px.coord(0, 2), g, grad_I,
                      gp, d_step, go);
    out.add_intensity(0, grad_I);
    out.add_coords(0, gp);
    out.d_step += d_step;
    for (int d = 0; d < 3; ++d) {
      out.odet[d] += go[d];
    }
    return;
  }
  if (!prm.oversample) {
    const int64_t pl = px.coords_layers == 1 ? 0 : L - 1;
    const T rho = pixel_parallax(prm.odet, px, pl);
    const T a = layer_exponent(prm.step, rho);
    const T c = layer_capture(a, L - 1);
    for (int64_t t = 0; t < LI; ++t) {
      add_intensity(t, g * c / T(LI));
    }
    const T d_a = g * mean_intensity<T>(px) * layer_capture_da(a, L - 1);
    out.d_step += d_a / rho;
    add_rho(pl, T(0) - d_a * a / rho);
    return;
  }
  if (px.coords_layers == 1) {
    const T rho = pixel_parallax(prm.odet, px, 0);
    const T a = layer_exponent(prm.step, rho);
    T d_a = T(0);
    if (LI == 1) {
      add_intensity(0, g * total_capture(a, L));
      d_a = g * px.intensity_at(0) * total_capture_da(a, L);
    } else {
      for (int64_t t = 0; t < L; ++t) {
        add_intensity(t, g * layer_capture(a, t));
        d_a += g * px.intensity_at(t) * layer_capture_da(a, t);
      }
    }
    out.d_step += d_a / rho;
    add_rho(0, T(0) - d_a * a / rho);
    return;
  }
  for (int64_t t = 0; t < L; ++t) {
    const T rho = pixel_parallax(prm.odet, px, t);
    const T a = layer_exponent(prm.step, rho);
    const T I = px.intensity_at(LI == 1 ? 0 : t);
    add_intensity(t, g * layer_capture(a, t));
    const T d_a = g * I * layer_capture_da(a, t);
    out.d_step += d_a / rho;
    add_rho(t, T(0) - d_a * a / rho);
  }
}

// Double backward of one pixel, on duals whose direction is the cotangents
// of the backward's outputs (prm, px). Returns d/dg, the derivative of out
// along that direction; when `grads` is set, runs the backward on the duals,
// which adds g H v (the derivative of the gradient along the direction) to
// the slots and accumulates dL/ds and dL/dodet with their derivatives.
template <typename T>
NANOBRAGG_INLINE T absorbed_pixel_double_backward(const AbsorptionParams<Dual<T>>& prm,
                                                  const DualPixel<T>& px, T g, bool grads,
                                                  DualPixelGrads<T>& out) {
  if (grads) {
    absorbed_pixel_backward(prm, px, Dual<T>(g, T(0)), out);
  }
  return absorbed_pixel(prm, px).d;
}

}  // namespace absorption
}  // namespace nanobragg
