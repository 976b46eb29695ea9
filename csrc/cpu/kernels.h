// Entry points of the CPU kernels (fastppo._C_cpu). Raw pointers, sizes and strides only: no libtorch.
//
// Logits are a [B, T, V] view: element (b, t, j) lives at data + b*sB + t*sT + j (element strides, 64-bit),
// so any row stride works (e.g. logits[:, :-1, :] of a bigger buffer). Per-row vectors are contiguous
// float32 [N], N = B*T, row r = b*T + t. See fastppo/autograd.py for the launcher contract.
#pragma once

#include <stdint.h>

#include <string>

#include "common/contract.h"

namespace fastppo {
namespace cpu {

struct LogitsView {
  const void* data;
  int dtype;  // DType (common/contract.h)
  int64_t B, T, V;
  int64_t sB, sT;
};

struct LogprobsFwdArgs {
  LogitsView x;
  const int64_t* labels;  // [N]
  float inv_temp;
  float* logp;     // [N]
  float* entropy;  // [N] or nullptr
  float* lse;      // [N]
  int threads;
};

struct LogprobsBwdArgs {
  LogitsView x;
  const int64_t* labels;    // [N]
  const float* lse;         // [N]
  const float* entropy;     // [N] or nullptr (then g_entropy must be nullptr)
  const float* g_logp;      // [N] or nullptr (= zeros)
  const float* g_entropy;   // [N] or nullptr (= zeros)
  float inv_temp;
  void* out;                // [B, T, V] in x's dtype; may equal x.data (in-place)
  int64_t out_sB, out_sT;
  int threads;
};

struct PpoFwdArgs {
  LogitsView x;
  const int64_t* labels;    // [N]
  const float* old_logp;    // [N]
  const float* adv;         // [N]
  const float* ref_logp;    // [N] or nullptr (kl = 0)
  const float* mask;        // [N], 0/1
  float inv_temp;
  float clip_low, clip_high;
  float dual_clip;          // 0 = off
  int kl_kind;              // KlKind (common/contract.h)
  float kl_coef, entropy_coef;
  float* terms;             // [kNumTerms, N], Term order
  int threads;
};

struct GaeArgs {
  const float* rewards;    // [B, T]
  const float* values;     // [B, T]
  const uint8_t* mask;     // [B, T] (bool)
  const float* bootstrap;  // [B] or nullptr (= zeros)
  int64_t B, T;
  double gamma, lam;
  float* advantages;       // [B, T]
  float* returns;          // [B, T]
  int threads;
};

// Token sampling (sampling.cpp): one token per row of logits [B, V] (row r at logits + r*sB, unit stride on V).
struct SampleArgs {
  const void* logits;
  int dtype;  // DType (dtypes.h)
  int64_t B, V, sB;
  const double* uniforms;  // [B], each in (0, 1)
  float inv_temp;
  int top_k;               // 0 = off
  double top_p;            // 1 = off
  int64_t* out;            // [B]
  int threads;
};

void sample_forward(const SampleArgs& a);

// Threads for a parallel loop over `work` elements (logits, or GAE tokens) when `threads` are allowed (the
// caller passes torch.get_num_threads()). Small problems run on the calling thread: an OpenMP region is only
// as fast as its slowest thread, and on a loaded machine (another process busy on every core) a descheduled
// worker holds the region and its closing barrier for a scheduler time slice, milliseconds, where a problem
// below kParallelMinWork takes under ~2 ms on one thread (measured: GAE at 256x1024 went from 0.1-0.3 ms to
// 16 ms with a busy process on every core). Above it the parallel gain is worth that risk.
constexpr int64_t kParallelMinWork = int64_t(1) << 21;
inline int team_size(int64_t work, int threads) { return work >= kParallelMinWork && threads > 1 ? threads : 1; }

void logprobs_forward(const LogprobsFwdArgs& a);
void logprobs_backward(const LogprobsBwdArgs& a);
void ppo_loss_forward(const PpoFwdArgs& a);
void gae_forward(const GaeArgs& a);

// Which row-kernel instruction set runs: "avx512" (AVX-512F), "avx2" (AVX2+FMA+F16C) or "scalar",
// the best this CPU supports (checked at run time) unless capped by set_simd_level.
std::string simd_level();
// Cap the instruction set ("avx512", "avx2" or "scalar"; tests and benchmarks). Returns the level in use.
std::string set_simd_level(const std::string& level);

// One instruction set's row kernels (logprobs_avx512.cpp, logprobs_avx2.cpp, logprobs_scalar.cpp).
namespace avx512 {
void logprobs_forward(const LogprobsFwdArgs& a);
void logprobs_backward(const LogprobsBwdArgs& a);
void ppo_loss_forward(const PpoFwdArgs& a);
}  // namespace avx512
namespace avx2 {
void logprobs_forward(const LogprobsFwdArgs& a);
void logprobs_backward(const LogprobsBwdArgs& a);
void ppo_loss_forward(const PpoFwdArgs& a);
}  // namespace avx2
namespace scalar {
void logprobs_forward(const LogprobsFwdArgs& a);
void logprobs_backward(const LogprobsBwdArgs& a);
void ppo_loss_forward(const PpoFwdArgs& a);
}  // namespace scalar

}  // namespace cpu
}  // namespace fastppo
