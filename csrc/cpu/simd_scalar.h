// The portable "vector" of one float: the row kernels of logprobs_impl.h compiled for CPUs without AVX2.
#pragma once

#include <math.h>
#include <stdint.h>

#include "dtypes.h"

namespace fastppo {
namespace cpu {
namespace scalar {

struct Isa {
  using vec = float;
  using mask = bool;
  static constexpr int W = 1;

  static inline vec set1(float a) { return a; }
  static inline vec zero() { return 0.0f; }
  template <class E>
  static inline vec load(const E* p) {
    return conv::to_float(*p);
  }
  template <class E>
  static inline vec load_tail(const E* p, int64_t, float) {
    return conv::to_float(*p);
  }
  template <class E>
  static inline void store(E* p, vec v) {
    conv::put(p, v);
  }
  template <class E>
  static inline void store_tail(E* p, vec v, int64_t) {
    conv::put(p, v);
  }
  static inline vec add(vec a, vec b) { return a + b; }
  static inline vec sub(vec a, vec b) { return a - b; }
  static inline vec mul(vec a, vec b) { return a * b; }
  static inline vec fmadd(vec a, vec b, vec c) { return a * b + c; }
  static inline vec fmsub(vec a, vec b, vec c) { return a * b - c; }
  static inline vec max(vec a, vec b) { return a > b ? a : b; }
  static inline vec exp(vec x) { return expf(x); }
  // exp(x) and x clamped below at ln(FLT_MIN) (NaN kept): see simd_avx2.h
  static inline vec exp(vec x, vec& xc) {
    xc = x < -87.33654475f ? -87.33654475f : x;
    return expf(x);
  }
  static inline mask isnan(vec x) { return x != x; }
  static inline mask mask_none() { return false; }
  static inline mask mask_or(mask a, mask b) { return a || b; }
  static inline bool any(mask m) { return m; }
  static inline float hsum(vec v) { return v; }
  static inline float hmax(vec v) { return v; }
};

}  // namespace scalar
}  // namespace cpu
}  // namespace fastppo
