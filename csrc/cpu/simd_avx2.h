// 8 floats in an AVX2 register: the row kernels of logprobs_impl.h for AVX2 + FMA + F16C CPUs.
//
// Only included from a translation unit compiled for that target (logprobs_avx2.cpp); the dispatcher in
// logprobs.cpp checks the CPU at run time before calling in.
#pragma once

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "dtypes.h"

namespace fastppo {
namespace cpu {
namespace avx2 {

struct Isa {
  using vec = __m256;
  using mask = __m256;
  static constexpr int W = 8;

  static inline vec set1(float a) { return _mm256_set1_ps(a); }
  static inline vec zero() { return _mm256_setzero_ps(); }

  static inline vec load(const float* p) { return _mm256_loadu_ps(p); }
  static inline vec load(const BF16* p) {
    // bf16 is the top half of a float: widen to 32 bits and shift into place.
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static inline vec load(const F16* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  // n < W elements, the rest of the lanes = fill.
  template <class E>
  static inline vec load_tail(const E* p, int64_t n, float fill) {
    alignas(32) float buf[W];
    for (int i = 0; i < W; ++i) buf[i] = i < n ? conv::to_float(p[i]) : fill;
    return _mm256_load_ps(buf);
  }

  static inline void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
  static inline void store(BF16* p, vec v) {
    // Round to nearest even (add 0x7fff + lsb of the kept half), NaN -> quiet NaN: as torch's cast.
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    const __m256i isnan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, qnan, isnan);
    // 8 x u32 (each < 2^16) -> 8 x u16: packus works per 128-bit lane, then gather qwords 0 and 2.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  static inline void store(F16* p, vec v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  template <class E>
  static inline void store_tail(E* p, vec v, int64_t n) {
    alignas(32) float buf[W];
    _mm256_store_ps(buf, v);
    for (int64_t i = 0; i < n; ++i) conv::put(p + i, buf[i]);
  }

  static inline vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
  static inline vec sub(vec a, vec b) { return _mm256_sub_ps(a, b); }
  static inline vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
  static inline vec fmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static inline vec fmsub(vec a, vec b, vec c) { return _mm256_fmsub_ps(a, b, c); }
  static inline vec max(vec a, vec b) { return _mm256_max_ps(a, b); }  // NaN is tracked apart (isnan)

  // exp(x) to ~1-2 ulp for x <= 88 (the kernels take exp of x - max <= 0 and of log-probs <= ~0):
  // exp(x) = 2^n * exp(r), n = round(x / ln2), |r| <= ln2/2, exp(r) by a degree-7 polynomial (Horner, FMA).
  // Exact edge cases without -ffast-math: exp(-inf) = 0, exp(NaN) = NaN (max/min take NaN from their second
  // operand, so it flows through), x < ln(FLT_MIN) flushes to 0. `xc` returns x clamped to
  // [ln(FLT_MIN), 88]: equal to x wherever exp(x) != 0, and finite where x = -inf, so e * xc is the
  // p*log(p)-style product with 0 (not 0 * -inf = NaN) at masked entries, without a compare.
  static inline vec exp(vec x, vec& xc) {
    const vec lo = _mm256_set1_ps(-87.33654475f);  // ln(FLT_MIN): below, the result would be subnormal
    xc = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(lo, x));
    const vec n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // r = x - n*ln2 with ln2 split in two so n*ln2_hi is exact
    vec r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    // exp(r) - 1 - r = r^2 * P(r); coefficients of the classic single-precision minimax fit
    vec p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    const vec r2 = _mm256_mul_ps(r, r);
    p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    // 2^n through the exponent field; n is in [-126, 127] after the clamp (NaN: p is NaN already)
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const vec y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), y);  // -inf and underflow -> 0
  }
  static inline vec exp(vec x) {
    vec xc;
    return exp(x, xc);
  }

  static inline mask isnan(vec x) { return _mm256_cmp_ps(x, x, _CMP_UNORD_Q); }
  static inline mask mask_none() { return _mm256_setzero_ps(); }
  static inline mask mask_or(mask a, mask b) { return _mm256_or_ps(a, b); }
  static inline bool any(mask m) { return _mm256_movemask_ps(m) != 0; }
  static inline float hsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static inline float hmax(vec v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

}  // namespace avx2
}  // namespace cpu
}  // namespace fastppo
