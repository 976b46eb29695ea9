// Dispatch of the fused logprobs / PPO-loss row kernels to the best instruction set this CPU has.
#include <atomic>
#include <stdexcept>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "dtypes.h"
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

// The out-of-place backward writes a fresh [N, V] dlogits buffer that nothing has touched yet: with 4 KiB pages
// the kernel spends more time taking page faults (and zeroing pages) than computing. Ask Linux for transparent
// huge pages on that range (a hint; THP "madvise" mode, the usual default, honours it; no effect otherwise).
void advise_huge_pages(const void* out, const LogitsView& x, int64_t out_sB, int64_t out_sT) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (out == x.data || x.B <= 0 || x.T <= 0) return;  // in place: the pages exist already
  const int64_t elem = x.dtype == kFloat32 ? 4 : 2;
  const int64_t extent = ((x.B - 1) * out_sB + (x.T - 1) * out_sT + x.V) * elem;
  if (extent < int64_t(8) << 20) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(out) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(out) + uintptr_t(extent)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)out, (void)x, (void)out_sB, (void)out_sT;
#endif
}

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
  advise_huge_pages(a.out, a.x, a.out_sB, a.out_sT);
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
