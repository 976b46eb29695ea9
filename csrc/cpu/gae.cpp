// GAE as a reverse scan over time, one sequence per OpenMP work item (fastppo.reference.gae semantics).
//
// Carry-forward over masked positions: the recursion runs over valid tokens only, so a masked token
// inside a sequence neither resets the advantage nor the "next value"; the value after the last valid
// token is bootstrap[b] (0 without bootstrap); outputs are 0 where mask is 0. fp32 like the reference.
#include "kernels.h"

namespace fastppo {
namespace cpu {

void gae_forward(const GaeArgs& a) {
  const float gamma = static_cast<float>(a.gamma);
  const float gl = static_cast<float>(a.gamma * a.lam);
  const int64_t T = a.T;
#pragma omp parallel for num_threads(a.threads) schedule(static) if (a.B * T >= (int64_t(1) << 16))
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t o = b * T;  // 64-bit row offset
    const float* r = a.rewards + o;
    const float* v = a.values + o;
    const uint8_t* m = a.mask + o;
    float* adv = a.advantages + o;
    float* ret = a.returns + o;
    float next_v = a.bootstrap != nullptr ? a.bootstrap[b] : 0.0f;
    float next_a = 0.0f;
    for (int64_t t = T - 1; t >= 0; --t) {
      if (m[t]) {
        const float delta = r[t] + gamma * next_v - v[t];
        const float at = delta + gl * next_a;
        adv[t] = at;
        ret[t] = at + v[t];
        next_a = at;
        next_v = v[t];
      } else {
        adv[t] = 0.0f;
        ret[t] = 0.0f;
      }
    }
  }
}

}  // namespace cpu
}  // namespace fastppo
