// The vectorised kernels of the common absorption case (intensity and
// position shared by every layer, contiguous [P] and [P, 3]): the formulas of
// absorption_math.h on at::vec::Vectorized, W pixels at a time (AVX2: 8
// float / 4 double; AVX-512: 16 / 8), with SLEEF's vectorised exp/expm1.
// Included only by absorption_cpu.cpp in its AVX2 and AVX-512 builds
// (common/cpu_capability.h); the default build runs the scalar loops.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "absorption/absorption_math.h"

namespace nanobragg {
namespace absorption {

// The primitives of absorption_math.h for vectors.
#define NANOBRAGG_VEC_PRIMITIVES(T)                                                  \
  template <>                                                                        \
  NANOBRAGG_INLINE at::vec::Vectorized<T> sqrt_(at::vec::Vectorized<T> x) {          \
    return x.sqrt();                                                                 \
  }                                                                                  \
  template <>                                                                        \
  NANOBRAGG_INLINE at::vec::Vectorized<T> abs_(at::vec::Vectorized<T> x) {           \
    return x.abs();                                                                  \
  }                                                                                  \
  template <>                                                                        \
  NANOBRAGG_INLINE at::vec::Vectorized<T> max_(at::vec::Vectorized<T> a,             \
                                               at::vec::Vectorized<T> b) {           \
    return at::vec::maximum(a, b);                                                   \
  }                                                                                  \
  template <>                                                                        \
  NANOBRAGG_INLINE at::vec::Vectorized<T> select_(at::vec::Vectorized<T> condition,  \
                                                  at::vec::Vectorized<T> if_true,    \
                                                  at::vec::Vectorized<T> if_false) { \
    return at::vec::Vectorized<T>::blendv(if_false, if_true, condition);             \
  }                                                                                  \
  template <>                                                                        \
  NANOBRAGG_INLINE at::vec::Vectorized<T> exp_(at::vec::Vectorized<T> x) {           \
    return x.exp();                                                                  \
  }                                                                                  \
  template <>                                                                        \
  NANOBRAGG_INLINE at::vec::Vectorized<T> expm1_(at::vec::Vectorized<T> x) {         \
    return x.expm1();                                                                \
  }

NANOBRAGG_VEC_PRIMITIVES(float)
NANOBRAGG_VEC_PRIMITIVES(double)
#undef NANOBRAGG_VEC_PRIMITIVES

namespace CPU_CAPABILITY {
namespace vec {

// Lane buffers of one step: W pixels, de-interleaved; a partial last step is
// padded with a harmless pixel (on the axis, zero intensity and gradient).
template <typename T>
struct Lanes {
  using V = at::vec::Vectorized<T>;
  static constexpr int64_t W = V::size();
  T x[W], y[W], z[W], value[W], grad[W];

  int64_t load(const T* intensity, int64_t intensity_stride, const T* coords, const T* g,
               int64_t g_stride, int64_t p, int64_t end) {
    const int64_t n = std::min(W, end - p);
    for (int64_t j = 0; j < W; ++j) {
      const bool in = j < n;
      x[j] = in ? coords[3 * (p + j)] : T(0);
      y[j] = in ? coords[3 * (p + j) + 1] : T(0);
      z[j] = in ? coords[3 * (p + j) + 2] : T(1);
      value[j] = in ? intensity[(p + j) * intensity_stride] : T(0);
      grad[j] = (in && g != nullptr) ? g[(p + j) * g_stride] : T(0);
    }
    return n;
  }
};

// W consecutive values of stride `stride`: one load (1), a broadcast (0, the
// expanded gradient of .sum()), else element by element.
template <typename T>
inline at::vec::Vectorized<T> load_strided(const T* p, int64_t stride) {
  using V = at::vec::Vectorized<T>;
  if (stride == 1) return V::loadu(p);
  if (stride == 0) return V(*p);
  T buf[V::size()];
  for (int64_t j = 0; j < V::size(); ++j) buf[j] = p[j * stride];
  return V::loadu(buf);
}

// x, y, z of W consecutive pixels of a contiguous [P, 3] array (a full
// step; partial steps go through Lanes). Any width: through lane buffers.
template <typename T>
inline void load_xyz(const T* c, at::vec::Vectorized<T> xyz[3]) {
  constexpr int64_t W = at::vec::Vectorized<T>::size();
  T lanes[3][W];
  for (int64_t j = 0; j < W; ++j) {
    for (int d = 0; d < 3; ++d) lanes[d][j] = c[3 * j + d];
  }
  for (int d = 0; d < 3; ++d) xyz[d] = at::vec::Vectorized<T>::loadu(lanes[d]);
}
// ... and back: x, y, z of W pixels written interleaved.
template <typename T>
inline void store_xyz(const at::vec::Vectorized<T> xyz[3], T* c) {
  constexpr int64_t W = at::vec::Vectorized<T>::size();
  T lanes[3][W];
  for (int d = 0; d < 3; ++d) xyz[d].store(lanes[d]);
  for (int64_t j = 0; j < W; ++j) {
    for (int d = 0; d < 3; ++d) c[3 * j + d] = lanes[d][j];
  }
}

#if defined(CPU_CAPABILITY_AVX2)
// AVX2, float: three contiguous loads, two blends and a lane permute per
// component (cheaper than gathers); double: gathers.
inline void load_xyz(const float* c, at::vec::Vectorized<float> xyz[3]) {
  const __m256 v0 = _mm256_loadu_ps(c), v1 = _mm256_loadu_ps(c + 8), v2 = _mm256_loadu_ps(c + 16);
  // x_j sits in v0 at 0, 3, 6; v1 at 1, 4, 7; v2 at 2, 5 (and y, z shifted by one).
  const __m256 x = _mm256_blend_ps(_mm256_blend_ps(v0, v1, 0x92), v2, 0x24);
  const __m256 y = _mm256_blend_ps(_mm256_blend_ps(v0, v1, 0x24), v2, 0x49);
  const __m256 z = _mm256_blend_ps(_mm256_blend_ps(v0, v1, 0x49), v2, 0x92);
  xyz[0] = _mm256_permutevar8x32_ps(x, _mm256_setr_epi32(0, 3, 6, 1, 4, 7, 2, 5));
  xyz[1] = _mm256_permutevar8x32_ps(y, _mm256_setr_epi32(1, 4, 7, 2, 5, 0, 3, 6));
  xyz[2] = _mm256_permutevar8x32_ps(z, _mm256_setr_epi32(2, 5, 0, 3, 6, 1, 4, 7));
}
inline void load_xyz(const double* c, at::vec::Vectorized<double> xyz[3]) {
  const __m128i idx = _mm_setr_epi32(0, 3, 6, 9);
  for (int d = 0; d < 3; ++d) {
    xyz[d] = _mm256_mask_i32gather_pd(_mm256_setzero_pd(), c + d, idx,
                                      _mm256_castsi256_pd(_mm256_set1_epi64x(-1)), 8);
  }
}

// The inverse of load_xyz: x, y, z of W pixels written interleaved to a
// contiguous [W, 3] array (float: three permutes, six blends, three stores).
inline void store_xyz(const at::vec::Vectorized<float> xyz[3], float* c) {
  const __m256 x = _mm256_permutevar8x32_ps(xyz[0], _mm256_setr_epi32(0, 3, 6, 1, 4, 7, 2, 5));
  const __m256 y = _mm256_permutevar8x32_ps(xyz[1], _mm256_setr_epi32(5, 0, 3, 6, 1, 4, 7, 2));
  const __m256 z = _mm256_permutevar8x32_ps(xyz[2], _mm256_setr_epi32(2, 5, 0, 3, 6, 1, 4, 7));
  _mm256_storeu_ps(c, _mm256_blend_ps(_mm256_blend_ps(x, y, 0x92), z, 0x24));
  _mm256_storeu_ps(c + 8, _mm256_blend_ps(_mm256_blend_ps(x, y, 0x24), z, 0x49));
  _mm256_storeu_ps(c + 16, _mm256_blend_ps(_mm256_blend_ps(x, y, 0x49), z, 0x92));
}
#endif  // CPU_CAPABILITY_AVX2

#if defined(CPU_CAPABILITY_AVX512)
// AVX-512: two two-register permutes per register (x, y, z of W pixels from
// three loaded registers, and back into three to store), where the generic
// lane buffers above take 3 W scalar moves and make each vector load wait on
// scalar stores. The same values: a data movement.
template <typename Index, int W>
struct XyzPermutes {
  // Loading: component d of lane j is element 3 j + d of (v0, v1, v2).
  // first[d]: the lanes found in (v0, v1); second[d]: those, and v2's.
  Index first[3][W], second[3][W];
  // Storing: element i of register r is component (r W + i) % 3 of lane
  // (r W + i) / 3. to_first[r]: from (x, y); to_second[r]: those, and z's.
  Index to_first[3][W], to_second[3][W];
  constexpr XyzPermutes() : first(), second(), to_first(), to_second() {
    for (int d = 0; d < 3; ++d) {
      for (int j = 0; j < W; ++j) {
        const int e = 3 * j + d;
        first[d][j] = e < 2 * W ? e : 0;
        second[d][j] = e < 2 * W ? j : W + e - 2 * W;
      }
    }
    for (int r = 0; r < 3; ++r) {
      for (int i = 0; i < W; ++i) {
        const int e = r * W + i, j = e / 3, d = e % 3;
        to_first[r][i] = d == 0 ? j : d == 1 ? W + j : 0;
        to_second[r][i] = d < 2 ? i : W + j;
      }
    }
  }
};
inline constexpr XyzPermutes<int32_t, 16> kXyzFloat{};
inline constexpr XyzPermutes<int64_t, 8> kXyzDouble{};

template <typename Index>
inline __m512i index_of(const Index* i) {
  return _mm512_loadu_si512(i);
}

inline void load_xyz(const float* c, at::vec::Vectorized<float> xyz[3]) {
  const __m512 v0 = _mm512_loadu_ps(c), v1 = _mm512_loadu_ps(c + 16), v2 = _mm512_loadu_ps(c + 32);
  for (int d = 0; d < 3; ++d) {
    const __m512 t = _mm512_permutex2var_ps(v0, index_of(kXyzFloat.first[d]), v1);
    xyz[d] = _mm512_permutex2var_ps(t, index_of(kXyzFloat.second[d]), v2);
  }
}
inline void load_xyz(const double* c, at::vec::Vectorized<double> xyz[3]) {
  const __m512d v0 = _mm512_loadu_pd(c), v1 = _mm512_loadu_pd(c + 8), v2 = _mm512_loadu_pd(c + 16);
  for (int d = 0; d < 3; ++d) {
    const __m512d t = _mm512_permutex2var_pd(v0, index_of(kXyzDouble.first[d]), v1);
    xyz[d] = _mm512_permutex2var_pd(t, index_of(kXyzDouble.second[d]), v2);
  }
}
inline void store_xyz(const at::vec::Vectorized<float> xyz[3], float* c) {
  for (int r = 0; r < 3; ++r) {
    const __m512 t = _mm512_permutex2var_ps(xyz[0], index_of(kXyzFloat.to_first[r]), xyz[1]);
    _mm512_storeu_ps(c + 16 * r,
                     _mm512_permutex2var_ps(t, index_of(kXyzFloat.to_second[r]), xyz[2]));
  }
}
inline void store_xyz(const at::vec::Vectorized<double> xyz[3], double* c) {
  for (int r = 0; r < 3; ++r) {
    const __m512d t = _mm512_permutex2var_pd(xyz[0], index_of(kXyzDouble.to_first[r]), xyz[1]);
    _mm512_storeu_pd(c + 8 * r,
                     _mm512_permutex2var_pd(t, index_of(kXyzDouble.to_second[r]), xyz[2]));
  }
}
#endif  // CPU_CAPABILITY_AVX512

template <typename T>
inline void shared_forward(const AbsorptionParams<T>& prm, const T* value, int64_t value_stride,
                           const T* coords, T* out, int64_t begin, int64_t end) {
  using V = at::vec::Vectorized<T>;
  const V ox(prm.odet[0]), oy(prm.odet[1]), oz(prm.odet[2]), step(prm.step);
  constexpr int64_t W = Lanes<T>::W;
  int64_t p = begin;
  for (; p + W <= end; p += W) {
    V xyz[3];
    load_xyz(coords + 3 * p, xyz);
    shared_pixel_value<V>(ox, oy, oz, step, prm.layers, prm.oversample,
                          load_strided(value + p * value_stride, value_stride), xyz[0], xyz[1],
                          xyz[2])
        .store(out + p);
  }
  Lanes<T> lanes;
  for (; p < end; p += W) {
    const int64_t n = lanes.load(value, value_stride, coords, nullptr, 0, p, end);
    const V v =
        shared_pixel_value<V>(ox, oy, oz, step, prm.layers, prm.oversample, V::loadu(lanes.value),
                              V::loadu(lanes.x), V::loadu(lanes.y), V::loadu(lanes.z));
    v.store(out + p, n);
  }
}

template <typename T>
inline void shared_backward(const AbsorptionParams<T>& prm, const T* intensity, const T* coords,
                            const T* grad, int64_t grad_stride, T* grad_intensity, T* grad_coords,
                            int64_t count, double* sums) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t W = Lanes<T>::W;
  const V ox(prm.odet[0]), oy(prm.odet[1]), oz(prm.odet[2]), step(prm.step);
  V acc[4] = {V(T(0)), V(T(0)), V(T(0)), V(T(0))};
  Lanes<T> lanes;
  T gp_lanes[3][W];
  for (int64_t p = 0; p < count; p += W) {
    const bool full = p + W <= count;
    const int64_t n = full ? W : lanes.load(intensity, 1, coords, grad, grad_stride, p, count);
    V xyz[3], value, g;
    if (full) {
      load_xyz(coords + 3 * p, xyz);
      value = V::loadu(intensity + p);
      g = load_strided(grad + p * grad_stride, grad_stride);
    } else {
      xyz[0] = V::loadu(lanes.x);
      xyz[1] = V::loadu(lanes.y);
      xyz[2] = V::loadu(lanes.z);
      value = V::loadu(lanes.value);
      g = V::loadu(lanes.grad);
    }
    V grad_I, gp[3], d_step, go[3];
    shared_pixel_grad<V>(ox, oy, oz, step, prm.layers, prm.oversample, value, xyz[0], xyz[1],
                         xyz[2], g, grad_I, gp, d_step, go);
    if (grad_intensity != nullptr) {
      grad_I.store(grad_intensity + p, n);
    }
    if (grad_coords != nullptr) {
      if (full) {
        store_xyz(gp, grad_coords + 3 * p);
      } else {
        for (int d = 0; d < 3; ++d) {
          gp[d].store(gp_lanes[d]);
        }
        for (int64_t j = 0; j < n; ++j) {
          for (int d = 0; d < 3; ++d) {
            grad_coords[3 * (p + j) + d] = gp_lanes[d][j];
          }
        }
      }
    }
    acc[0] = acc[0] + d_step;
    for (int d = 0; d < 3; ++d) {
      acc[1 + d] = acc[1 + d] + go[d];
    }
  }
  if (sums == nullptr) {
    return;
  }
  T lane_sums[W];
  for (int k = 0; k < 4; ++k) {
    acc[k].store(lane_sums);
    for (int64_t j = 0; j < W; ++j) {  // fixed lane order
      sums[k] += static_cast<double>(lane_sums[j]);
    }
  }
}

}  // namespace vec
}  // namespace CPU_CAPABILITY
}  // namespace absorption
}  // namespace nanobragg
