// Element types of the logits as the CPU kernels see them, and exact scalar conversions to/from float.
//
// The kernels never link libtorch: Python passes a dtype code (DType, common/contract.h) next to each raw pointer.
// bf16/fp16 are plain 16-bit payloads here; the vector paths convert 8 at a time (simd_avx2.h).
#pragma once

#include <stdint.h>
#include <string.h>

#include "common/contract.h"  // DType

namespace fastppo {

struct BF16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

namespace conv {

static inline float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}
static inline uint32_t float_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

static inline float to_float(float x) { return x; }
static inline float to_float(BF16 x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }
static inline float to_float(F16 x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0) {
    // zero or subnormal: man * 2^-24, exact in float
    const float mag = static_cast<float>(man) * 5.9604644775390625e-8f;
    return bits_to_float(float_to_bits(mag) | sign);
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN (payload kept)
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

// Round to nearest even, NaN stays a (quiet) NaN: the same results as torch's float->bf16 cast.
static inline BF16 to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BF16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return BF16{static_cast<uint16_t>(u >> 16)};
}

// Round to nearest even with overflow to inf and gradual underflow (IEEE binary16).
static inline F16 to_f16(float f) {
  uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u >= 0x7f800000u) return F16{static_cast<uint16_t>(sign | 0x7c00u | (u > 0x7f800000u ? 0x200u : 0u))};
  if (u >= 0x477ff000u) return F16{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (u < 0x38800000u) {
    // below the smallest normal half (2^-14): adding 0.5f puts round-to-nearest-even(|f| * 2^24) in the
    // low mantissa bits (0.5 has an ulp of 2^-24), done by the FPU's own rounding.
    const float shifted = bits_to_float(u) + 0.5f;
    return F16{static_cast<uint16_t>(sign | (float_to_bits(shifted) - 0x3f000000u))};
  }
  const uint32_t odd = (u >> 13) & 1u;
  u += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + odd;
  return F16{static_cast<uint16_t>(sign | (u >> 13))};
}

// Stores of one float into an element of each type (static: internal linkage, so each ISA's translation
// unit keeps its own copy and no instruction set leaks into another through the linker).
static inline void put(float* p, float v) { *p = v; }
static inline void put(BF16* p, float v) { *p = to_bf16(v); }
static inline void put(F16* p, float v) { *p = to_f16(v); }

}  // namespace conv
}  // namespace fastppo
