// 16 floats in an AVX-512 register: the row kernels of logprobs_impl.h for AVX-512F CPUs (AVX512F only,
// plus the AVX2/FMA/F16C of every such CPU). Only included from logprobs_avx512.cpp, compiled for that
// target; logprobs.cpp checks the CPU (and that the OS saves the zmm state) before calling in.
#pragma once

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "dtypes.h"

namespace fastppo {
namespace cpu {
namespace avx512 {

struct Isa {
  using vec = __m512;
  using mask = __mmask16;
  static constexpr int W = 16;

  static inline vec set1(float a) { return _mm512_set1_ps(a); }
  static inline vec zero() { return _mm512_setzero_ps(); }

  static inline vec load(const float* p) { return _mm512_loadu_ps(p); }
  static inline vec load(const BF16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static inline vec load(const F16* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static inline vec load_tail(const float* p, int64_t n, float fill) {
    // masked-off lanes are not read, so the load cannot run past the row
    return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), static_cast<__mmask16>((1u << n) - 1u), p);
  }
  template <class E>
  static inline vec load_tail(const E* p, int64_t n, float fill) {
    alignas(64) float buf[W];
    for (int i = 0; i < W; ++i) buf[i] = i < n ? conv::to_float(p[i]) : fill;
    return _mm512_load_ps(buf);
  }

  static inline void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
  static inline void store(BF16* p, vec v) {
    // round to nearest even, NaN -> quiet NaN (as torch's cast), then narrow 32 -> 16 bits
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __m512i qnan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), qnan);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static inline void store(F16* p, vec v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static inline void store_tail(float* p, vec v, int64_t n) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1u), v);
  }
  template <class E>
  static inline void store_tail(E* p, vec v, int64_t n) {
    alignas(64) float buf[W];
    _mm512_store_ps(buf, v);
    for (int64_t i = 0; i < n; ++i) conv::put(p + i, buf[i]);
  }

  static inline vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  static inline vec sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
  static inline vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
  static inline vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static inline vec fmsub(vec a, vec b, vec c) { return _mm512_fmsub_ps(a, b, c); }
  static inline vec max(vec a, vec b) { return _mm512_max_ps(a, b); }  // NaN is tracked apart (isnan)

  // exp as simd_avx2.h (same polynomial and edge cases); 2^n is applied with scalef.
  static inline vec exp(vec x, vec& xc) {
    const vec lo = _mm512_set1_ps(-87.33654475f);
    xc = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(lo, x));  // NaN flows through (2nd operand)
    const vec n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vec r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    vec p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const vec y = _mm512_scalef_ps(p, n);
    // keep lanes with x >= lo or NaN; -inf and underflow -> 0
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ), y);
  }
  static inline vec exp(vec x) {
    vec xc;
    return exp(x, xc);
  }

  static inline mask isnan(vec x) { return _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q); }
  static inline mask mask_none() { return 0; }
  static inline mask mask_or(mask a, mask b) { return static_cast<mask>(a | b); }
  static inline bool any(mask m) { return m != 0; }
  static inline float hsum(vec v) { return _mm512_reduce_add_ps(v); }
  static inline float hmax(vec v) { return _mm512_reduce_max_ps(v); }
};

}  // namespace avx512
}  // namespace cpu
}  // namespace fastppo
