// The row kernels compiled for AVX2 + FMA + F16C. Everything this file defines lives in
// fastppo::cpu::avx2 (or is static), so no AVX2 instruction reaches code that scalar CPUs run;
// logprobs.cpp checks the CPU before calling in.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <immintrin.h>

#include "kernels.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#endif

#include "simd_avx2.h"
#define FASTPPO_ISA avx2
#include "logprobs_impl.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__clang__)
#pragma clang attribute pop
#endif
