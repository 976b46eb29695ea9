// Fused token sampling over [B, V] logits: temperature, top-k, top-p and the inverse-CDF draw, one row per task.
//
// Semantics: fastppo/reference/sampling.py. Per row: (1) the max of z = x * inv_temp; (2) p = exp(z - max) into a
// thread-local buffer (one exp per element, the only transcendental work); (3) only when filtering, the top-k
// and top-p thresholds by bisection over the bit patterns of p (non-negative floats order like their bits), each
// step one pass over the buffer; (4) target = u * (sum of kept p), then the first kept token whose running sum
// reaches it. Sums are double. Given the same uniform, the token equals the reference's except when the target
// falls within rounding distance of a CDF boundary.
// Lets GCC turn the selects below into vector blends (no result changes: no FP exceptions are inspected here).
// Before the includes, so the inline helpers of dtypes.h get the same options and can still be inlined.
#pragma GCC optimize("no-trapping-math")

#include <math.h>
#include <string.h>

#include <vector>

#include "dtypes.h"
#include "kernels.h"

namespace fastppo {
namespace cpu {

namespace {

// exp(x) for x <= 0 in plain arithmetic (so `omp simd` vectorises it): x = n ln2 + r, |r| <= ln2/2, degree-6
// Taylor polynomial of exp(r) (relative error < 2e-7), times 2^n built in the exponent bits. Below -87 (where
// the result would be subnormal, < 2^-126) and at -inf it returns 0: such tokens are never drawn.
__attribute__((always_inline)) static inline float exp_nonpos(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low mantissa bits
  const float t = xc * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  const float r = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln2 split hi/lo
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  memcpy(&scale, &e, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

static inline uint32_t bits_of(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

// Number of p with bits >= t (p >= 0, so bit order = value order).
int64_t count_at_least(const float* p, int64_t V, uint32_t t) {
  int64_t c = 0;
#pragma omp simd reduction(+ : c)
  for (int64_t j = 0; j < V; ++j) c += bits_of(p[j]) >= t ? 1 : 0;
  return c;
}

// Sum of p with bits > gt and bits >= lo.
double mass_above(const float* p, int64_t V, uint32_t gt, uint32_t lo) {
  double s = 0.0;
  for (int64_t j = 0; j < V; ++j) {
    const uint32_t b = bits_of(p[j]);
    if (b > gt && b >= lo) s += p[j];
  }
  return s;
}

template <class E>
int64_t sample_row(const E* x, int64_t V, float inv_temp, int top_k, double top_p, double u, float* p) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < V; ++j) {
    const float z = conv::to_float(x[j]) * inv_temp;
    m = z > m ? z : m;
  }
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) p[j] = exp_nonpos(conv::to_float(x[j]) * inv_temp - m);
  uint32_t lo = 1;  // kept: bits(p) >= lo, i.e. p > 0 when nothing is filtered
  if (top_k > 0 && top_k < V) {
    // the k-th largest p: the largest t with count(bits >= t) >= k (count(0) = V >= k; count(bits(1)+1) = 0)
    int64_t a = 0, b = int64_t(bits_of(1.0f)) + 1;
    while (b - a > 1) {
      const int64_t mid = a + (b - a) / 2;
      if (count_at_least(p, V, uint32_t(mid)) >= top_k) a = mid; else b = mid;
    }
    lo = a > 1 ? uint32_t(a) : 1u;
  }
  if (top_p < 1.0) {
    // the smallest t with mass(bits > t, kept) < top_p * mass(kept): tokens with bits >= t stay
    const double limit = top_p * mass_above(p, V, 0, lo);
    int64_t a = int64_t(lo) - 1, b = int64_t(bits_of(1.0f));  // g(a) false (mass = all kept), g(b) true (0)
    while (b - a > 1) {
      const int64_t mid = a + (b - a) / 2;
      if (mass_above(p, V, uint32_t(mid), lo) < limit) b = mid; else a = mid;
    }
    lo = uint32_t(b);
  }
  if (lo > 1) {  // filtered: zero the dropped tokens so the draw below needs no test
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) p[j] = bits_of(p[j]) >= lo ? p[j] : 0.0f;
  }
  double total = 0.0;
  int64_t last = -1;
#pragma omp simd reduction(+ : total) reduction(max : last)
  for (int64_t j = 0; j < V; ++j) {
    total += p[j];
    last = p[j] > 0.0f && j > last ? j : last;
  }
  // the first token whose running sum reaches u * total: skip whole chunks by their sums, then scan one
  const double target = u * total;
  constexpr int64_t kChunk = 256;
  double run = 0.0;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t c1 = c0 + kChunk < V ? c0 + kChunk : V;
    double cs = 0.0;
#pragma omp simd reduction(+ : cs)
    for (int64_t j = c0; j < c1; ++j) cs += p[j];
    if (run + cs < target) {
      run += cs;
      continue;
    }
    for (int64_t j = c0; j < c1; ++j) {
      run += p[j];
      if (run >= target && p[j] > 0.0f) return j < last ? j : last;
    }
  }
  return last;
}

}  // namespace

void sample_forward(const SampleArgs& a) {
  const int64_t B = a.B, V = a.V;
  const int team = B > 1 ? team_size(B * V, a.threads) : 1;  // small batches: the calling thread (kernels.h)
#pragma omp parallel num_threads(team) if (team > 1)
  {
    std::vector<float> buf(static_cast<size_t>(V));
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < B; ++r) {
      const int64_t off = r * a.sB;  // 64-bit element offsets
      int64_t tok;
      switch (a.dtype) {
        case kFloat32:
          tok = sample_row(static_cast<const float*>(a.logits) + off, V, a.inv_temp, a.top_k, a.top_p,
                           a.uniforms[r], buf.data());
          break;
        case kBFloat16:
          tok = sample_row(static_cast<const BF16*>(a.logits) + off, V, a.inv_temp, a.top_k, a.top_p,
                           a.uniforms[r], buf.data());
          break;
        default:
          tok = sample_row(static_cast<const F16*>(a.logits) + off, V, a.inv_temp, a.top_k, a.top_p,
                           a.uniforms[r], buf.data());
      }
      a.out[r] = tok;
    }
  }
}

}  // namespace cpu
}  // namespace fastppo
