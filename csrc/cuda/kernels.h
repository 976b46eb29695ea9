// Host launchers of the CUDA kernels (logprobs.cu, gae.cu), declared without any CUDA or torch header so
// that the pybind11 binding (bindings_cuda.cpp) compiles with a plain C++ compiler. Pointers are device
// pointers, strides are in elements (64-bit), `stream` is a cudaStream_t, `device` the CUDA device index.
// Every launcher returns a cudaError_t as int (0 = success); error_string() turns it into text.
// Shapes and semantics are those of the launcher contract in fastppo/autograd.py.
#pragma once

#include <stdint.h>

#include "common/contract.h"  // DType, KlKind, Term

namespace fastppo {
namespace cuda {

// `dtype` is a DType code, `kl_kind` a KlKind, `terms` is [kNumTerms, B*T] in Term order (common/contract.h).
int logprobs_forward(const void* logits, int dtype, int64_t B, int64_t T, int64_t V, int64_t sB, int64_t sT,
                     const int64_t* labels, float inv_temp, float* logp, float* entropy, float* lse, int device,
                     void* stream);

int logprobs_backward(const void* logits, int dtype, int64_t B, int64_t T, int64_t V, int64_t sB, int64_t sT,
                      const int64_t* labels, const float* lse, const float* entropy, const float* g_logp,
                      const float* g_entropy, float inv_temp, void* out, int64_t out_sB, int64_t out_sT, int device,
                      void* stream);

int ppo_loss_forward(const void* logits, int dtype, int64_t B, int64_t T, int64_t V, int64_t sB, int64_t sT,
                     const int64_t* labels, const float* old_logp, const float* adv, const float* ref_logp,
                     const float* mask, float inv_temp, float clip_low, float clip_high, float dual_clip,
                     int kl_kind, float kl_coef, float entropy_coef, float* terms, int device, void* stream);

int gae_forward(const float* rewards, const float* values, const uint8_t* mask, const float* bootstrap, int64_t B,
                int64_t T, double gamma, double lam, float* advantages, float* returns, int device, void* stream);

const char* error_string(int code);

}  // namespace cuda
}  // namespace fastppo
