// The row kernels for any x86-64 / other CPU (one float per "vector"): the fallback when AVX2 is missing.
#include "simd_scalar.h"
#define FASTPPO_ISA scalar
#include "logprobs_impl.h"
