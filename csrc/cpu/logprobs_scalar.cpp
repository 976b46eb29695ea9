// The row kernels for any CPU (one float per "vector"): the fallback when neither AVX-512F nor AVX2 is there.
#include "simd_scalar.h"
#define FASTPPO_ISA scalar
#include "logprobs_impl.h"
