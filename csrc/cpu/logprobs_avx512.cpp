// The row kernels compiled for AVX-512F (+ AVX2, FMA, F16C). Everything this file defines lives in
// fastppo::cpu::avx512 (or is static), so no AVX-512 instruction reaches code that other CPUs run;
// logprobs.cpp checks the CPU before calling in.
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 flags the deliberately undefined pass-through operand inside its own AVX-512 intrinsics
// (avx512fintrin.h, _mm512_undefined_*) as maybe-uninitialized: a false positive of the headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <immintrin.h>

#include "kernels.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma,f16c"))), apply_to = function)
#endif

#include "simd_avx512.h"
#define FASTPPO_ISA avx512
#include "logprobs_impl.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__clang__)
#pragma clang attribute pop
#endif
