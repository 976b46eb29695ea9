// GAE as a reverse scan over time (fastppo.reference.gae semantics), a few sequences at a time per thread.
//
// Carry-forward over masked positions: the recursion runs over valid tokens only, so a masked token
// inside a sequence neither resets the advantage nor the "next value"; the value after the last valid
// token is bootstrap[b] (0 without bootstrap); outputs are 0 where mask is 0. fp32 like the reference.
//
// Each step of one sequence waits on the previous one (an add/FMA chain of ~4 cycles), so a thread walks
// kRows independent sequences in lockstep to overlap their chains: 2-2.5x faster than one at a time on
// this machine class. More rows lose again when rows are 4 KiB apart (T a multiple of 1024, fp32): their
// streams then fall into the same L1 sets. The mask test stays a branch: for padded responses it is
// perfectly predictable, and a select would put it on the dependency chain.
#include "kernels.h"

namespace fastppo {
namespace cpu {

namespace {

constexpr int kRows = 3;

template <int N>
void scan_rows(const GaeArgs& a, int64_t b0, float gamma, float gl) {
  const int64_t T = a.T;
  const float* r[N];
  const float* v[N];
  const uint8_t* m[N];
  float* adv[N];
  float* ret[N];
  float next_v[N], next_a[N];
  for (int k = 0; k < N; ++k) {
    const int64_t o = (b0 + k) * T;  // 64-bit row offsets
    r[k] = a.rewards + o;
    v[k] = a.values + o;
    m[k] = a.mask + o;
    adv[k] = a.advantages + o;
    ret[k] = a.returns + o;
    next_v[k] = a.bootstrap != nullptr ? a.bootstrap[b0 + k] : 0.0f;
    next_a[k] = 0.0f;
  }
  for (int64_t t = T - 1; t >= 0; --t) {
#pragma GCC unroll 4
    for (int k = 0; k < N; ++k) {
      if (m[k][t]) {
        const float vt = v[k][t];
        const float at = (r[k][t] + gamma * next_v[k] - vt) + gl * next_a[k];
        adv[k][t] = at;
        ret[k][t] = at + vt;
        next_a[k] = at;
        next_v[k] = vt;
      } else {
        adv[k][t] = 0.0f;
        ret[k][t] = 0.0f;
      }
    }
  }
}

}  // namespace

void gae_forward(const GaeArgs& a) {
  const float gamma = static_cast<float>(a.gamma);
  const float gl = static_cast<float>(a.gamma * a.lam);
  const int64_t groups = (a.B + kRows - 1) / kRows;
  const int team = groups > 1 ? team_size(a.B * a.T, a.threads) : 1;  // small scans: the calling thread only
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t b0 = g * kRows;
    const int64_t n = a.B - b0 < kRows ? a.B - b0 : kRows;
    if (n == 3) {
      scan_rows<3>(a, b0, gamma, gl);
    } else if (n == 2) {
      scan_rows<2>(a, b0, gamma, gl);
    } else {
      scan_rows<1>(a, b0, gamma, gl);
    }
  }
}

}  // namespace cpu
}  // namespace fastppo
