// The per-token PPO terms of one valid row, from its logp / entropy / lse: the epilogue the CPU kernels
// (csrc/cpu/logprobs_impl.h) and the CUDA kernels (csrc/cuda/logprobs.cu) share. Semantics are those of
// fastppo.reference.losses.ppo_token_terms + kl_penalty:
//   ratio = exp(clamp(lp - old, +-kLogRatioClamp)),  pg = max(-A*ratio, -A*clamp(ratio, 1-clip_low, 1+clip_high)),
//   dual clip (A < 0): pg = min(pg, -A*dual_clip),   dpg = d(pg)/d(lp) (0 where clipped or the clamp binds),
//   kl / dkl of the chosen estimator against ref (0 without ref),  loss = pg + kl_coef*kl - entropy_coef*entropy.
// Clamps are written as comparisons, not fminf/fmaxf, so a NaN log-ratio stays NaN (as torch.clamp) instead of
// turning into a finite ratio.
#pragma once

#include <math.h>

#include "common/contract.h"

namespace fastppo {

struct PpoParams {
  float clip_low, clip_high;
  float dual_clip;  // 0 = off
  int kl_kind;      // KlKind
  float kl_coef, entropy_coef;
};

// `out[k]` is term k (Term order). `has_ref` false: kl = dkl = 0. `static`: each CPU instruction-set translation
// unit keeps its own copy, so no AVX-512 code reaches the AVX2 or scalar kernels through the linker (dtypes.h).
static FASTPPO_HD inline void ppo_epilogue(float lp, float entropy, float lse, float old_lp, float A, bool has_ref,
                                           float ref_lp, const PpoParams& p, float out[kNumTerms]) {
  float d = lp - old_lp;
  const bool in_range = d >= -kLogRatioClamp && d <= kLogRatioClamp;  // torch.clamp's gradient: closed range
  d = d < -kLogRatioClamp ? -kLogRatioClamp : (d > kLogRatioClamp ? kLogRatioClamp : d);
  const float ratio = expf(d);
  const float lo = 1.0f - p.clip_low, hi = 1.0f + p.clip_high;
  const float ratio_c = ratio < lo ? lo : (ratio > hi ? hi : ratio);
  const float pg1 = -A * ratio, pg2 = -A * ratio_c;
  float pg = pg1 > pg2 ? pg1 : pg2;
  const bool clipped = pg2 > pg1;
  float dpg = (clipped || !in_range) ? 0.0f : -A * ratio;
  bool dual = false;
  if (p.dual_clip > 0.0f && A < 0.0f) {
    const float pg3 = -A * p.dual_clip;
    if (pg > pg3) {
      dual = true;
      pg = pg3;
      dpg = 0.0f;
    }
  }
  float kl = 0.0f, dkl = 0.0f;
  if (has_ref) {
    const float dk = lp - ref_lp;
    switch (static_cast<KlKind>(p.kl_kind)) {
      case kK1:
        kl = dk;
        dkl = 1.0f;
        break;
      case kK2:
        kl = 0.5f * dk * dk;
        dkl = dk;
        break;
      case kK3: {  // exp(-d) + d - 1
        const float e = expf(-dk);
        kl = e + dk - 1.0f;
        dkl = 1.0f - e;
        break;
      }
      default:  // kAbs (the bindings reject other codes)
        kl = fabsf(dk);
        dkl = dk > 0.0f ? 1.0f : (dk < 0.0f ? -1.0f : 0.0f);
        break;
    }
  }
  out[kLogp] = lp;
  out[kEntropy] = entropy;
  out[kLse] = lse;
  out[kPg] = pg;
  out[kRatio] = ratio;
  out[kKl] = kl;
  out[kDpg] = dpg;
  out[kDkl] = dkl;
  out[kClipped] = clipped ? 1.0f : 0.0f;
  out[kDualClipped] = dual ? 1.0f : 0.0f;
  // kl_coef == 0 (ref given only for the KL statistic) adds nothing, not 0 * inf = NaN (as the reference).
  out[kLoss] = pg + (p.kl_coef != 0.0f ? p.kl_coef * kl : 0.0f) - p.entropy_coef * entropy;
}

}  // namespace fastppo
