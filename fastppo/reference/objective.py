"""Reference PPO-family objectives over per-token log-probs: the executable spec of every ``PPOObjective`` setting.

Shapes: per-token tensors ``[B, T]`` (``[...]`` when nothing is aggregated per sequence); the last dim is time.
Every function computes in the inputs' dtype (float64 in tests) and is differentiable w.r.t. ``logp`` (and ``entropy``).
Masked positions must already be zeros (``losses._valid_only``).

Papers and the peer code each formula is checked against (tests/compat):
- PPO clipped surrogate (Schulman et al. 2017, arXiv:1707.06347); dual clip (Ye et al. 2020, arXiv:1912.09729);
  clip-higher (DAPO, arXiv:2503.14476). verl ``vanilla``, TRL grpo/bnpo/dr_grpo/dapo, OpenRLHF ``ppo``.
- CISPO (MiniMax-M1, arXiv:2506.13585): a clipped, detached importance weight times the log-prob. verl/TRL ``cispo``.
- SAPO (arXiv:2511.20347): a sigmoid gate ``sigmoid(tau (r - 1)) 4 / tau`` instead of the hard clip. verl/TRL ``sapo``.
- GSPO (arXiv:2507.18071): the sequence's geometric-mean ratio; GSPO-token keeps its value with per-token gradients.
- Truncated / masked importance sampling of the rollout policy (TIS, MIS, IcePop) as in verl's rollout correction and
  TRL's vLLM importance sampling; off-policy sequence masking (DeepSeek-V3.2, arXiv:2512.02556) as in TRL.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastppo._contract import LOG_RATIO_CLAMP
from fastppo.objective import PPOObjective
from fastppo.reference.kl import kl_penalty, kl_penalty_grad


def _seq_mean(x: Tensor, m: Tensor) -> Tensor:
    """Mean of ``x`` over each sequence's valid tokens ``[B, T] -> [B, 1]`` (0 for an empty sequence)."""
    return (x * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1.0)


def log_importance_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, level: str) -> Tensor:
    """Log of the importance ratio per token, clamped to ``+-LOG_RATIO_CLAMP`` (as verl; keeps ``exp`` finite).

    ``token``: ``logp - old``; ``sequence``: the sequence's mean of ``logp - old`` on every token (GSPO; the gradient
    flows through the mean); ``sequence_token``: the same value, but each token's gradient is its own log-prob's
    (``logp - sg(logp) + sg(mean)``, GSPO-token).
    """
    d = logp - old_logp
    if level == "token":
        return d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    s = _seq_mean(d, mask.to(d.dtype))
    if level == "sequence":
        return s.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).expand_as(d)
    if level == "sequence_token":
        return (logp - logp.detach() + s.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    raise ValueError(f"unknown importance_sampling_level {level!r}")


def policy_term(ratio: Tensor, logp: Tensor, adv: Tensor, obj: PPOObjective) -> tuple[Tensor, Tensor, Tensor]:
    """``(pg, clipped, dual_clipped)`` per token for the objective's ``policy_loss``; ``ratio`` is the (differentiable)
    importance ratio. ``clipped`` marks tokens whose ratio a clip bound holds (no gradient through the ratio there)."""
    lo, hi = 1.0 - obj.clip_low, 1.0 + obj.clip_high
    none = torch.zeros_like(ratio, dtype=torch.bool)
    if obj.policy_loss == "ppo":
        pg1 = -adv * ratio
        pg2 = -adv * ratio.clamp(lo, hi)
        pg = torch.maximum(pg1, pg2)
        clipped = pg2 > pg1
        dual = none
        if obj.dual_clip is not None:
            pg3 = -adv * obj.dual_clip
            dual = (adv < 0) & (pg > pg3)
            pg = torch.where(adv < 0, torch.minimum(pg, pg3), pg)
        return pg, clipped, dual
    if obj.policy_loss == "cispo":
        lower = lo if lo > 0.0 else None  # clip_low >= 1: no lower bound (TRL caps from above only)
        weight = ratio.clamp(min=lower, max=hi).detach()
        clipped = (ratio > hi) | ((ratio < lo) if lower is not None else none)
        return -weight * adv * logp, clipped, none
    if obj.policy_loss == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, obj.sapo_tau_pos), torch.full_like(adv, obj.sapo_tau_neg))
        return -torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * adv, none, none
    raise ValueError(f"unknown policy_loss {obj.policy_loss!r}")


def kl_term(logp: Tensor, ref_logp: Tensor, ratio: Tensor, obj: PPOObjective) -> Tensor:
    """Per-token KL estimate of the objective's ``kl_kind``, times the importance ratio when ``kl_ratio_weighted``."""
    kl = kl_penalty(logp, ref_logp, obj.kl_kind)
    return kl * ratio if obj.kl_ratio_weighted else kl


@torch.no_grad()
def rollout_weights(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, obj: PPOObjective
                    ) -> tuple[Tensor, dict[str, Tensor]]:
    """Detached rollout-correction weights ``[B, T]`` (0 on masked tokens) and their statistics.

    ``rho = exp(old - rollout)`` per token, or its product over the sequence (``exp`` of the sum of the log-ratios)
    at ``rollout_is_level="sequence"``; log-ratios clamped to +-LOG_RATIO_CLAMP. ``truncate``: ``clamp(rho, min, max)``
    (TIS); ``mask``: ``rho`` where ``min <= rho <= max``, else 0 (MIS; IcePop at token level).
    Stats: ``rollout_is_mean`` / ``rollout_is_max`` (of the weights over valid tokens), ``rollout_is_ess`` (effective
    sample size fraction ``E[w]^2 / E[w^2]``), ``rollout_masked_fraction`` (valid tokens with weight 0),
    ``rollout_logp_diff_mean`` / ``rollout_logp_diff_max`` (``|old - rollout|`` over valid tokens).
    """
    m = mask.to(old_logp.dtype)
    valid = m != 0
    d = torch.where(valid, old_logp - rollout_logp, torch.zeros_like(old_logp))
    if obj.rollout_is_level == "token":
        log_rho = d
    else:
        log_rho = d.sum(-1, keepdim=True).expand_as(d)
    rho = torch.exp(log_rho.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    lo, hi = obj.rollout_is_min, obj.rollout_is_max
    if obj.rollout_is_mode == "truncate":
        w = rho.clamp(min=lo, max=hi)
    else:
        keep = torch.ones_like(valid)
        if lo is not None:
            keep &= rho >= lo
        if hi is not None:
            keep &= rho <= hi
        w = torch.where(keep, rho, torch.zeros_like(rho))
    w = torch.where(valid, w, torch.zeros_like(w))
    n = m.sum()
    mean_w = w.sum() / n
    stats = {
        "rollout_is_mean": mean_w,
        "rollout_is_max": torch.where(valid, w, torch.full_like(w, -torch.inf)).max(),
        "rollout_is_ess": mean_w.square() / ((w.square().sum() / n) + torch.finfo(w.dtype).tiny),
        "rollout_masked_fraction": ((w == 0) & valid).to(w.dtype).sum() / n,
        "rollout_logp_diff_mean": d.abs().sum() / n,
        "rollout_logp_diff_max": d.abs().max(),
    }
    return w, stats


@torch.no_grad()
def off_policy_keep(logp: Tensor, sampler_logp: Tensor, adv: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (TRL's ``off_policy_mask_threshold``): a token keeps its policy term
    unless ``A < 0`` and its sequence's mean of ``sampler_logp - sg(logp)`` (a KL estimate of the sampler against the
    current policy) exceeds ``threshold``. ``[B, T]`` bool."""
    m = mask.to(logp.dtype)
    d = torch.nan_to_num(torch.where(m != 0, sampler_logp - logp, torch.zeros_like(logp)), nan=0.0)
    return (adv >= 0) | (_seq_mean(d, m) <= threshold)


@torch.no_grad()
def entropy_keep(entropy: Tensor, mask: Tensor, top_quantile: float) -> Tensor:
    """TRL's ``top_entropy_quantile``: valid tokens whose entropy is at least the ``1 - top_quantile`` quantile of the
    valid tokens' entropies (linear interpolation, ``torch.quantile``'s default). ``[B, T]`` bool."""
    valid = mask != 0
    threshold = torch.quantile(entropy[valid].to(torch.float64), 1.0 - top_quantile).to(entropy.dtype)
    return (entropy >= threshold) & valid


def objective_terms(logp: Tensor, entropy: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor,
                    ref_logp: Tensor | None, obj: PPOObjective, *, is_weight: Tensor | None = None,
                    sampler_logp: Tensor | None = None) -> dict[str, Tensor]:
    """The per-token terms of the objective before aggregation: ``pg`` (the policy term with every weight and mask
    applied), ``kl`` (0 without ``ref_logp``), ``ratio``, ``clipped``, ``dual_clipped``, ``entropy_mask`` (where the
    entropy bonus counts). ``is_weight``: the rollout-correction weights (``rollout_weights``); ``sampler_logp``: what
    the off-policy mask compares with (the rollout log-probs, else the old ones)."""
    log_w = log_importance_ratio(logp, old_logp, mask, obj.importance_sampling_level)
    ratio = torch.exp(log_w)
    pg, clipped, dual = policy_term(ratio, logp, adv, obj)
    keep_h = mask != 0
    if obj.off_policy_mask_threshold is not None:
        keep = off_policy_keep(logp, old_logp if sampler_logp is None else sampler_logp, adv, mask,
                               obj.off_policy_mask_threshold)
        pg = pg * keep.to(pg.dtype)
    if obj.top_entropy_quantile < 1.0:
        keep_h = entropy_keep(entropy.detach(), mask, obj.top_entropy_quantile)
        pg = pg * keep_h.to(pg.dtype)
    if is_weight is not None:
        pg = pg * is_weight
    kl = kl_term(logp, ref_logp, ratio, obj) if ref_logp is not None else torch.zeros_like(pg)
    return {"pg": pg, "kl": kl, "ratio": ratio, "clipped": clipped, "dual_clipped": dual, "entropy_mask": keep_h}


def token_term_grads(logp: Tensor, old_logp: Tensor, adv: Tensor, ref_logp: Tensor | None, obj: PPOObjective, *,
                     is_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(dpg, dkl)``: the derivatives of ``objective_terms``' ``pg`` and ``kl`` w.r.t. each token's own log-prob, for
    a token-separable objective, in closed form (the kernels' epilogue computes the same; tests compare both with
    autograd). Code that runs inside a custom op has no autograd, hence no ``torch.autograd.grad`` here."""
    d = logp - old_logp
    inside = d.abs() <= LOG_RATIO_CLAMP  # torch.clamp's gradient passes on the closed range
    ratio = torch.exp(d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    dratio = torch.where(inside, ratio, torch.zeros_like(ratio))  # d ratio / d logp
    pg, clipped, dual = policy_term(ratio, logp, adv, obj)
    if obj.policy_loss == "ppo":
        dpg = torch.where(clipped | dual, torch.zeros_like(ratio), -adv * dratio)
    elif obj.policy_loss == "cispo":
        lo, hi = 1.0 - obj.clip_low, 1.0 + obj.clip_high
        dpg = -ratio.clamp(min=lo if lo > 0.0 else None, max=hi) * adv
    else:  # sapo: d/dr of -sigmoid(tau (r - 1)) 4 / tau A = -4 A s (1 - s)
        tau = torch.where(adv > 0, torch.full_like(adv, obj.sapo_tau_pos), torch.full_like(adv, obj.sapo_tau_neg))
        sg = torch.sigmoid(tau * (ratio - 1.0))
        dpg = -4.0 * adv * sg * (1.0 - sg) * dratio
    if is_weight is not None:
        dpg = dpg * is_weight
    if ref_logp is None:
        return dpg, torch.zeros_like(dpg)
    dkl = kl_penalty_grad(logp, ref_logp, obj.kl_kind)
    if obj.kl_ratio_weighted:  # d(kl * ratio) = dkl * ratio + kl * dratio
        dkl = dkl * ratio + kl_penalty(logp, ref_logp, obj.kl_kind) * dratio
    return dpg, dkl
