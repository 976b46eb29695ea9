// Dispatch of the fused logprobs / PPO-loss row kernels to the best instruction set this CPU has.
#include <atomic>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace fastppo {
namespace cpu {

namespace {

enum Level : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

int cpu_level() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  // libgcc's check also asks the OS (XGETBV) whether it saves the ymm/zmm state
  __builtin_cpu_init();
  const bool avx2 =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512f")) return kAvx512;
  return avx2 ? kAvx2 : kScalar;
#else
  return kScalar;
#endif
}

const int kCpuLevel = cpu_level();
std::atomic<int> g_level{kCpuLevel};

const char* level_name(int level) { return level == kAvx512 ? "avx512" : (level == kAvx2 ? "avx2" : "scalar"); }

}  // namespace

std::string simd_level() { return level_name(g_level.load(std::memory_order_relaxed)); }

std::string set_simd_level(const std::string& level) {
  int want;
  if (level == "avx512") {
    want = kAvx512;
  } else if (level == "avx2") {
    want = kAvx2;
  } else if (level == "scalar") {
    want = kScalar;
  } else {
    throw std::invalid_argument("simd level must be 'avx512', 'avx2' or 'scalar', got '" + level + "'");
  }
  g_level.store(want < kCpuLevel ? want : kCpuLevel);
  return simd_level();
}

void logprobs_forward(const LogprobsFwdArgs& a) {
  switch (g_level.load(std::memory_order_relaxed)) {
    case kAvx512: return avx512::logprobs_forward(a);
    case kAvx2: return avx2::logprobs_forward(a);
    default: return scalar::logprobs_forward(a);
  }
}

void logprobs_backward(const LogprobsBwdArgs& a) {
  switch (g_level.load(std::memory_order_relaxed)) {
    case kAvx512: return avx512::logprobs_backward(a);
    case kAvx2: return avx2::logprobs_backward(a);
    default: return scalar::logprobs_backward(a);
  }
}

void ppo_loss_forward(const PpoFwdArgs& a) {
  switch (g_level.load(std::memory_order_relaxed)) {
    case kAvx512: return avx512::ppo_loss_forward(a);
    case kAvx2: return avx2::ppo_loss_forward(a);
    default: return scalar::ppo_loss_forward(a);
  }
}

}  // namespace cpu
}  // namespace fastppo
