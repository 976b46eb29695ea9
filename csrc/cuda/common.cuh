// Device helpers shared by the CUDA kernels: element conversions, a device guard, 16-byte vector access.
// CUDA's own headers only (no torch).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace fastppo {
namespace cuda {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <class E>
__device__ __forceinline__ E from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_f<__half>(float x) {
  return __float2half_rn(x);
}

// 16 bytes of elements: one 128-bit load/store moves VEC of them.
template <class E>
struct Pack {
  static constexpr int VEC = 16 / sizeof(E);
  union {
    uint4 raw;
    E e[VEC];
  };
};

// Number of leading elements before `p` reaches 16-byte alignment (p is at least element aligned).
template <class E>
__device__ __forceinline__ int64_t head_to_aligned(const E* p, int64_t n) {
  const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) & 15u);
  const int64_t h = mis == 0 ? 0 : (16 - mis) / static_cast<int64_t>(sizeof(E));
  return h < n ? h : n;
}

// Sets the current device for the scope of a launch and restores the caller's.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cudaGetDevice(&prev_);
    if (device >= 0 && device != prev_) cudaSetDevice(device);
  }
  ~DeviceGuard() {
    int cur = -1;
    cudaGetDevice(&cur);
    if (cur != prev_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

}  // namespace cuda
}  // namespace fastppo
