// Row kernels of the fused logprobs / entropy / PPO-loss op, written once over an instruction-set struct
// `Isa` (simd_scalar.h, simd_avx2.h, simd_avx512.h) and compiled once per instruction set (logprobs_<isa>.cpp, which
// defines FASTPPO_ISA to the namespace name and includes this file after its Isa header).
//
// Forward of a row x[0..V) at temperature T (y = x / T), all accumulation in fp32/fp64:
//   m = max y, s = sum exp(y - m), w = sum exp(y - m) * (y - m)
//   lse = m + log s,  logp = y_label - lse,  entropy = log s - w / s
// The row is walked in L1-sized blocks: a max pass over the block (no exp), then one exp per element;
// s and w are rescaled only when a block raises the max ("online" softmax at block granularity), so each
// element costs one exp and the row is read from memory once.
// -inf logits contribute exactly 0 (exp gives 0 and the entropy term multiplies by the clamped, finite
// argument, not 0 * -inf = NaN); a NaN logit makes the row's lse/logp/entropy NaN and +inf makes lse NaN,
// which the ops layer turns into a ValueError. No -ffast-math anywhere: these cases rely on IEEE inf/NaN.
#pragma once

#ifndef FASTPPO_ISA
#error "define FASTPPO_ISA (the instruction-set namespace) before including logprobs_impl.h"
#endif

#include <math.h>
#include <stdint.h>

#include "common/ppo_epilogue.h"
#include "dtypes.h"
#include "kernels.h"

namespace fastppo {
namespace cpu {
namespace FASTPPO_ISA {

namespace {

constexpr int64_t kBlock = 2048;  // elements per block: 8 KiB of fp32 stays in L1 between the two passes

struct RowStats {
  float lse, logp, entropy;
};

template <class E>
inline const E* row_ptr(const void* base, int64_t sB, int64_t sT, int64_t T, int64_t r) {
  const int64_t b = r / T, t = r - (r / T) * T;
  return static_cast<const E*>(base) + b * sB + t * sT;  // 64-bit offsets
}

// y - c with y = x / T rounded to float first (a mul, then a sub; not one fused multiply-subtract): the row max
// m is itself a rounded y, so the max element gets exactly 0 and every other element <= 0. A fused x*inv_t - m
// keeps the product's rounding error, which at |y| ~ 1e20 (temperature 1e-20) is ~1e12 and sends exp to
// inf or 0 (the ops layer then saw a non-finite lse on finite logits).
template <class V8>
inline V8 scaled_minus(V8 x, V8 inv_t, V8 c) {
  return Isa::sub(Isa::mul(x, inv_t), c);
}

template <class E>
RowStats row_forward(const E* x, int64_t V, int64_t label, float inv_t, bool want_entropy) {
  using V8 = typename Isa::vec;
  constexpr int64_t W = Isa::W;
  const V8 vit = Isa::set1(inv_t);
  float m = -INFINITY;
  double s = 0.0, w = 0.0;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t n = V - b0 < kBlock ? V - b0 : kBlock;
    const E* xb = x + b0;
    // pass 1: block max of the raw logits (T > 0 keeps the order) and NaN, which max would drop
    V8 vmax = Isa::set1(-INFINITY);
    typename Isa::mask vnan = Isa::mask_none();
    int64_t j = 0;
    for (; j + W <= n; j += W) {
      const V8 x8 = Isa::load(xb + j);
      vmax = Isa::max(vmax, x8);
      vnan = Isa::mask_or(vnan, Isa::isnan(x8));
    }
    if (j < n) {
      const V8 x8 = Isa::load_tail(xb + j, n - j, -INFINITY);
      vmax = Isa::max(vmax, x8);
      vnan = Isa::mask_or(vnan, Isa::isnan(x8));
    }
    if (Isa::any(vnan)) return RowStats{NAN, NAN, NAN};
    const float bm = Isa::hmax(vmax) * inv_t;
    if (bm == -INFINITY) continue;  // an all -inf block adds nothing (and must not meet -inf - -inf)
    if (bm > m) {
      if (s > 0.0) {  // rescale the sums to the new max: e' = e*c, d' = d + delta
        const double delta = static_cast<double>(m) - static_cast<double>(bm);
        const double c = exp(delta);
        w = c * (w + delta * s);
        s *= c;
      }
      m = bm;
    }
    // pass 2: one exp per element, d = x/T - m (scaled_minus); two accumulators per sum for ILP. The entropy
    // term uses exp's clamped argument: e * dc = 0 at -inf entries where e * d would be 0 * -inf = NaN.
    const V8 vm = Isa::set1(m);
    V8 s0 = Isa::zero(), s1 = Isa::zero(), w0 = Isa::zero(), w1 = Isa::zero();
    j = 0;
    if (want_entropy) {
      for (; j + 2 * W <= n; j += 2 * W) {
        V8 dc0, dc1;
        const V8 e0 = Isa::exp(scaled_minus(Isa::load(xb + j), vit, vm), dc0);
        const V8 e1 = Isa::exp(scaled_minus(Isa::load(xb + j + W), vit, vm), dc1);
        s0 = Isa::add(s0, e0);
        s1 = Isa::add(s1, e1);
        w0 = Isa::fmadd(e0, dc0, w0);
        w1 = Isa::fmadd(e1, dc1, w1);
      }
    } else {
      for (; j + 2 * W <= n; j += 2 * W) {
        s0 = Isa::add(s0, Isa::exp(scaled_minus(Isa::load(xb + j), vit, vm)));
        s1 = Isa::add(s1, Isa::exp(scaled_minus(Isa::load(xb + j + W), vit, vm)));
      }
    }
    for (; j < n; j += W) {
      const V8 x8 = j + W <= n ? Isa::load(xb + j) : Isa::load_tail(xb + j, n - j, -INFINITY);
      V8 dc;
      const V8 e = Isa::exp(scaled_minus(x8, vit, vm), dc);
      s0 = Isa::add(s0, e);
      if (want_entropy) w0 = Isa::fmadd(e, dc, w0);
    }
    s += static_cast<double>(Isa::hsum(Isa::add(s0, s1)));
    if (want_entropy) w += static_cast<double>(Isa::hsum(Isa::add(w0, w1)));
  }
  // all -inf row: m = -inf, s = 0 -> lse = -inf (non-finite, reported by the ops layer)
  const double log_s = log(s);
  const double lse = static_cast<double>(m) + log_s;
  RowStats out;
  out.lse = static_cast<float>(lse);
  out.entropy = want_entropy ? static_cast<float>(log_s - w / s) : 0.0f;
  if (label >= 0 && label < V) {
    const float y_t = conv::to_float(x[label]) * inv_t;
    out.logp = static_cast<float>(static_cast<double>(y_t) - lse);
  } else {
    out.logp = NAN;  // unchecked out-of-range label (FASTPPO_CHECKS=0): never read out of bounds
  }
  return out;
}

// dx_j = [g*(1[j=t] - p_j) - h*p_j*(log p_j + H)] / T, p_j = exp(y_j - lse); `out` may alias `x`.
template <class E>
void row_backward(const E* x, E* out, int64_t V, int64_t label, float inv_t, float lse, float H, float g, float h) {
  using V8 = typename Isa::vec;
  constexpr int64_t W = Isa::W;
  int64_t j = 0;
  if (g == 0.0f && h == 0.0f) {  // masked / unused rows: zeros, no exp
    const V8 z = Isa::zero();
    for (; j + W <= V; j += W) Isa::store(out + j, z);
    if (j < V) Isa::store_tail(out + j, z, V - j);
    return;
  }
  const bool has_label = label >= 0 && label < V;
  const float x_t = has_label ? conv::to_float(x[label]) : 0.0f;  // read before an in-place overwrite
  const V8 vit = Isa::set1(inv_t), vlse = Isa::set1(lse), vh = Isa::set1(h);
  const V8 vgh = Isa::set1(g + h * H), vneg = Isa::set1(-inv_t);
  for (; j < V; j += W) {
    const bool full = j + W <= V;
    const V8 x8 = full ? Isa::load(x + j) : Isa::load_tail(x + j, V - j, -INFINITY);
    V8 lpc;  // lp clamped to a finite value where p == 0 (masked vocabulary): the term is 0, not 0 * inf
    const V8 p = Isa::exp(scaled_minus(x8, vit, vlse), lpc);
    // p*(g + h*(lp + H))
    const V8 t = Isa::mul(p, Isa::fmadd(vh, lpc, vgh));
    const V8 dx = Isa::mul(t, vneg);
    if (full) {
      Isa::store(out + j, dx);
    } else {
      Isa::store_tail(out + j, dx, V - j);
    }
  }
  if (has_label) {
    const float lp_t = x_t * inv_t - lse;
    const float p_t = expf(lp_t);
    const float ent_term = p_t > 0.0f ? h * p_t * (lp_t + H) : 0.0f;
    conv::put(out + label, (g * (1.0f - p_t) - ent_term) * inv_t);
  }
}

// Rows per OpenMP work item: enough elements per item that scheduling costs nothing next to the exps.
inline int64_t chunk_rows(int64_t V) { return V >= 4096 ? 1 : 4096 / (V > 0 ? V : 1); }

// body(r) for every row r of the [B, T] view, OpenMP-parallel over rows in chunks of chunk_rows(V); small
// calls run on the calling thread (team_size, kernels.h).
template <class F>
void for_each_row(const LogitsView& x, int threads, F&& body) {
  const int64_t N = x.B * x.T;
  const int64_t chunk = chunk_rows(x.V);
  const int team = team_size(N * x.V, threads);
#pragma omp parallel for num_threads(team) schedule(dynamic, chunk) if (team > 1)
  for (int64_t r = 0; r < N; ++r) body(r);
}

template <class E>
struct Elem {
  using type = E;
};

// f(Elem<E>{}) for the element type E of the logits' dtype code.
template <class F>
void with_elem(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: return f(Elem<float>{});
    case kBFloat16: return f(Elem<BF16>{});
    default: return f(Elem<F16>{});
  }
}

}  // namespace

void logprobs_forward(const LogprobsFwdArgs& a) {
  with_elem(a.x.dtype, [&](auto tag) {
    using E = typename decltype(tag)::type;
    for_each_row(a.x, a.threads, [&](int64_t r) {
      const E* row = row_ptr<E>(a.x.data, a.x.sB, a.x.sT, a.x.T, r);
      const RowStats st = row_forward(row, a.x.V, a.labels[r], a.inv_temp, a.entropy != nullptr);
      a.logp[r] = st.logp;
      a.lse[r] = st.lse;
      if (a.entropy != nullptr) a.entropy[r] = st.entropy;
    });
  });
}

void logprobs_backward(const LogprobsBwdArgs& a) {
  with_elem(a.x.dtype, [&](auto tag) {
    using E = typename decltype(tag)::type;
    for_each_row(a.x, a.threads, [&](int64_t r) {
      const E* row = row_ptr<E>(a.x.data, a.x.sB, a.x.sT, a.x.T, r);
      E* orow = const_cast<E*>(row_ptr<E>(a.out, a.out_sB, a.out_sT, a.x.T, r));
      const float g = a.g_logp != nullptr ? a.g_logp[r] : 0.0f;
      const float h = a.g_entropy != nullptr ? a.g_entropy[r] : 0.0f;
      const float H = a.entropy != nullptr ? a.entropy[r] : 0.0f;
      row_backward(row, orow, a.x.V, a.labels[r], a.inv_temp, a.lse[r], H, g, h);
    });
  });
}

void ppo_loss_forward(const PpoFwdArgs& a) {
  const int64_t N = a.x.B * a.x.T;
  const PpoParams params{a.clip_low, a.clip_high, a.dual_clip, a.kl_kind, a.kl_coef, a.entropy_coef};
  with_elem(a.x.dtype, [&](auto tag) {
    using E = typename decltype(tag)::type;
    for_each_row(a.x, a.threads, [&](int64_t r) {
      if (a.mask[r] == 0.0f) {  // masked tokens cost nothing and get zeros in every term
        for (int k = 0; k < kNumTerms; ++k) a.terms[k * N + r] = 0.0f;
        return;
      }
      const E* row = row_ptr<E>(a.x.data, a.x.sB, a.x.sT, a.x.T, r);
      const RowStats st = row_forward(row, a.x.V, a.labels[r], a.inv_temp, true);
      float t[kNumTerms];
      ppo_epilogue(st.logp, st.entropy, st.lse, a.old_logp[r], a.adv[r], a.ref_logp != nullptr,
                   a.ref_logp != nullptr ? a.ref_logp[r] : 0.0f, params, t);
      for (int k = 0; k < kNumTerms; ++k) a.terms[k * N + r] = t[k];
    });
  });
}

}  // namespace FASTPPO_ISA
}  // namespace cpu
}  // namespace fastppo
