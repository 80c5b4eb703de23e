// Forward-mode dual numbers x + x' e with e^2 = 0. Evaluating a formula on
// inputs x + v e gives f(x) + (grad f . v) e exactly (no step size), so
// running a hand-written first derivative on duals gives its directional
// derivative: the Hessian-vector product a double backward needs, from the
// same source as the first derivative. Host and device.
#pragma once

#include <c10/macros/Macros.h>

#include "common/macros.h"

namespace nanobragg {

template <typename T>
struct Dual {
  T v;  // value
  T d;  // derivative along the chosen direction

  NANOBRAGG_INLINE constexpr Dual() : v(T(0)), d(T(0)) {}
  // A constant (also what formulas' T(1.5)-style literals become).
  NANOBRAGG_INLINE constexpr Dual(double value) : v(static_cast<T>(value)), d(T(0)) {}
  NANOBRAGG_INLINE constexpr Dual(T value, T derivative) : v(value), d(derivative) {}

  NANOBRAGG_INLINE Dual& operator+=(const Dual& o) {
    v += o.v;
    d += o.d;
    return *this;
  }
};

template <typename T>
NANOBRAGG_INLINE Dual<T> operator+(const Dual<T>& a, const Dual<T>& b) {
  return {a.v + b.v, a.d + b.d};
}
template <typename T>
NANOBRAGG_INLINE Dual<T> operator-(const Dual<T>& a, const Dual<T>& b) {
  return {a.v - b.v, a.d - b.d};
}
template <typename T>
NANOBRAGG_INLINE Dual<T> operator-(const Dual<T>& a) {
  return {-a.v, -a.d};
}
template <typename T>
NANOBRAGG_INLINE Dual<T> operator*(const Dual<T>& a, const Dual<T>& b) {
  return {a.v * b.v, a.d * b.v + a.v * b.d};
}
// (a/b)' = (a' - (a/b) b') / b: finite for b = inf, where the textbook
// (a' b - a b') / b^2 is inf/inf.
template <typename T>
NANOBRAGG_INLINE Dual<T> operator/(const Dual<T>& a, const Dual<T>& b) {
  const T q = a.v / b.v;
  return {q, (a.d - q * b.d) / b.v};
}
// Comparisons look at values only: a branch picks a formula, and the
// derivative is that formula's.
template <typename T>
NANOBRAGG_INLINE bool operator<(const Dual<T>& a, const Dual<T>& b) {
  return a.v < b.v;
}
template <typename T>
NANOBRAGG_INLINE bool operator>(const Dual<T>& a, const Dual<T>& b) {
  return a.v > b.v;
}

}  // namespace nanobragg
