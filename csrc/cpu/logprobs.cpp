// Dispatch of the fused logprobs / PPO-loss row kernels to the best instruction set this CPU has.
#include <atomic>
#include <string>

#include "kernels.h"

namespace fastppo {
namespace cpu {

namespace {

bool cpu_has_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

const bool kHasAvx2 = cpu_has_avx2();
std::atomic<bool> g_simd_enabled{true};

bool use_avx2() { return kHasAvx2 && g_simd_enabled.load(std::memory_order_relaxed); }

}  // namespace

std::string simd_level() { return use_avx2() ? "avx2" : "scalar"; }

void set_simd_enabled(bool enabled) { g_simd_enabled.store(enabled); }

void logprobs_forward(const LogprobsFwdArgs& a) {
  if (use_avx2()) return avx2::logprobs_forward(a);
  return scalar::logprobs_forward(a);
}

void logprobs_backward(const LogprobsBwdArgs& a) {
  if (use_avx2()) return avx2::logprobs_backward(a);
  return scalar::logprobs_backward(a);
}

void ppo_loss_forward(const PpoFwdArgs& a) {
  if (use_avx2()) return avx2::ppo_loss_forward(a);
  return scalar::ppo_loss_forward(a);
}

}  // namespace cpu
}  // namespace fastppo
