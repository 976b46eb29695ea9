// Emulated CUDA runtime for tests (see simt.h): the declarations csrc/cuda uses, host-only.
#pragma once

#include <math.h>

#include "simt.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Every __shared__ variable lands in one linker section, which the scheduler fills with NaN bytes before each block
// (simt.cpp), so a read of shared memory that the block did not write first shows up as NaN / -1.
#define __shared__ static __attribute__((section("fastppo_emu_shared")))

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

inline cudaError_t cudaGetLastError() { return static_cast<cudaError_t>(fastppo_emu::take_last_error()); }
inline const char* cudaGetErrorString(cudaError_t code) { return fastppo_emu::error_text(code); }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidValue; }
