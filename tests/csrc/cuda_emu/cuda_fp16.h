// Emulated half of CUDA's cuda_fp16.h for tests: storage and the conversions csrc/cuda uses (GCC's _Float16
// does the IEEE round-to-nearest-even conversions).
#pragma once

#include <stdint.h>
#include <string.h>

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 v;
  memcpy(&v, &h.bits, 2);
  return static_cast<float>(v);
}

inline __half __float2half_rn(float f) {
  const _Float16 v = static_cast<_Float16>(f);
  __half h;
  memcpy(&h.bits, &v, 2);
  return h;
}
