"""Reference PPO losses: clipped policy surrogate, clipped value loss, loss aggregation and the full
PPO objective from logits.

Shapes: per-token tensors are ``[B, T]`` (any leading shape for ``token-mean``; the ``seq-*`` modes treat
the last dim as time and flatten the rest into sequences). ``mask`` is bool or float of the same shape.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastppo._contract import LOG_RATIO_CLAMP, PPO_TERMS
from fastppo.objective import AGG_MODES, PPOObjective, objective_from
from fastppo.reference.kl import kl_penalty
from fastppo.reference.logprobs import logprobs_and_entropy
from fastppo.reference.objective import objective_terms, rollout_weights, token_term_grads
from fastppo.reference.stats import masked_mean

__all__ = ["AGG_MODES", "agg_loss", "agg_weights", "entropy_agg", "objective_agg", "policy_stats",
           "ppo_loss_from_logits", "ppo_loss_from_logprobs",
           "ppo_policy_loss", "ppo_term_rows", "ppo_token_terms", "value_loss"]

# Log-ratios are clamped to +-LOG_RATIO_CLAMP before exp so a wildly off-policy token cannot overflow to inf
# (verl does the same).


def _valid_only(mask: Tensor, *tensors: Tensor | None) -> list[Tensor | None]:
    """Each tensor with 0 at masked positions. Masked positions are ignored whatever they hold (padding may
    carry NaN/inf), and that must also hold for the gradient: ``where`` after a product zeroes the value but
    backward still meets ``0 * NaN``; replacing the inputs first keeps every intermediate finite."""
    valid = mask != 0
    return [None if t is None else torch.where(valid, t, torch.zeros_like(t)) for t in tensors]


def agg_loss(loss_mat: Tensor, mask: Tensor, agg: str = "token-mean", *, normalizer: float | None = None,
             max_completion_length: int | None = None) -> Tensor:
    """Aggregate per-token losses ``[..., T]`` into a scalar.

    token-mean               sum(l*m) / sum(m)                                  (global token mean)
    seq-mean-token-sum       mean over non-empty sequences of sum_t(l*m)
    seq-mean-token-mean      mean over non-empty sequences of sum_t(l*m)/sum_t(m)
    seq-mean-token-sum-norm  mean over non-empty sequences of sum_t(l*m), divided by T = last dim (Dr. GRPO: a
                             constant divisor instead of the sequence length; verl's definition of this mode), or by
                             ``max_completion_length`` when given (TRL's ``dr_grpo``)

    ``normalizer`` replaces the denominator of this call's own tokens (token-mean) or non-empty sequences (seq-*
    modes): the loss of a micro-batch is then its share of the loss of a larger batch with that many tokens or
    sequences (e.g. TRL's ``dapo``: the tokens of the whole gradient-accumulation step, over every rank).
    """
    m = mask.to(loss_mat.dtype)
    # Masked positions are ignored whatever they hold (padding may carry -inf/NaN): where, not only multiply.
    weighted = torch.where(m != 0, loss_mat * m, torch.zeros_like(loss_mat))
    if agg == "token-mean":
        return weighted.sum() / (m.sum() if normalizer is None else normalizer)
    if agg not in AGG_MODES:
        raise ValueError(f"unknown agg {agg!r}; choose from {AGG_MODES}")
    lm = weighted.reshape(-1, loss_mat.shape[-1])
    m2 = m.reshape(-1, loss_mat.shape[-1])
    seq_sum = lm.sum(-1)
    seq_len = m2.sum(-1)
    valid = (seq_len > 0).to(loss_mat.dtype)
    if agg in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        per_seq = seq_sum
    else:
        per_seq = seq_sum / seq_len.clamp_min(1.0)
    loss = (per_seq * valid).sum() / (valid.sum() if normalizer is None else normalizer)
    if agg == "seq-mean-token-sum-norm":
        return loss / (loss_mat.shape[-1] if max_completion_length is None else max_completion_length)
    return loss


def agg_weights(mask: Tensor, agg: str = "token-mean", *, normalizer: float | None = None,
                max_completion_length: int | None = None) -> Tensor:
    """Per-token weights ``w`` with ``agg_loss(l, mask, agg, ...) == sum(w * l)`` for every ``l`` (agg_loss is
    linear). ``mask [..., T]`` -> ``w`` of mask's shape, in float32 (float64 for a float64 mask); 0 on masked tokens.
    """
    dt = mask.dtype if mask.dtype in (torch.float32, torch.float64) else torch.float32
    m = mask.to(dt)
    if agg == "token-mean":
        return m / (m.sum() if normalizer is None else normalizer)
    if agg not in AGG_MODES:
        raise ValueError(f"unknown agg {agg!r}; choose from {AGG_MODES}")
    t = mask.shape[-1]
    m2 = m.reshape(-1, t)
    seq_len = m2.sum(-1, keepdim=True)
    n_seq = (seq_len > 0).to(dt).sum() if normalizer is None else normalizer
    if agg == "seq-mean-token-mean":
        w = m2 / seq_len.clamp_min(1.0) / n_seq
    else:
        w = m2 / n_seq
        if agg == "seq-mean-token-sum-norm":
            w = w / (t if max_completion_length is None else max_completion_length)
    return w.reshape(mask.shape)


def objective_agg(obj: PPOObjective) -> dict[str, Any]:
    """The aggregation keywords of ``agg_loss`` / ``agg_weights`` for the objective's policy and KL terms."""
    return {"agg": obj.agg, "normalizer": obj.loss_normalizer, "max_completion_length": obj.max_completion_length}


def entropy_agg(obj: PPOObjective) -> dict[str, Any]:
    """The aggregation keywords for the entropy bonus: the objective's own, or ``entropy_agg`` over this call's tokens
    (no normaliser), as TRL's entropy bonus."""
    if obj.entropy_agg is None:
        return objective_agg(obj)
    return {"agg": obj.entropy_agg, "normalizer": None, "max_completion_length": obj.max_completion_length}


def ppo_token_terms(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token clipped surrogate. Returns ``(pg_loss, ratio, clipped, dual_clipped)``, all ``[...]``.

    ratio = exp(clamp(lp - old, ±20)); pg = max(-A*ratio, -A*clamp(ratio, 1-clip_low, 1+clip_high));
    with ``dual_clip = c > 1`` and A < 0: pg = min(pg, -A*c) (dual-clip PPO).
    ``clipped`` marks tokens where the clipped branch is strictly larger (no gradient flows there),
    ``dual_clipped`` marks tokens capped by the dual clip.
    """
    clip_high = clip_low if clip_high is None else clip_high
    ratio = torch.exp((logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    dual_clipped = torch.zeros_like(clipped)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (got {dual_clip})")
        pg3 = -advantages * dual_clip
        dual_clipped = (advantages < 0) & (pg > pg3)
        pg = torch.where(advantages < 0, torch.minimum(pg, pg3), pg)
    return pg, ratio, clipped, dual_clipped


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped PPO policy loss and stats (clipfrac, dual_clipfrac, approx_kl, ratio_mean, ratio_max).

    ``approx_kl`` is the k3 estimate of KL(old || new) on the old policy's samples:
    ``mean(exp(lp - old) - (lp - old) - 1)``.
    """
    logprobs, old_logprobs, advantages = _valid_only(mask, logprobs, old_logprobs, advantages)
    pg, ratio, clipped, dual = ppo_token_terms(
        logprobs, old_logprobs, advantages, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip
    )
    loss = agg_loss(pg, mask, agg)
    return loss, policy_stats(loss, logprobs, old_logprobs, ratio, clipped, dual, mask)


@torch.no_grad()
def policy_stats(
    pg_loss: Tensor, logprobs: Tensor, old_logprobs: Tensor, ratio: Tensor, clipped: Tensor, dual_clipped: Tensor,
    mask: Tensor,
) -> dict[str, Tensor]:
    """Detached stats of the clipped surrogate over valid tokens (shared by every path that computes it)."""
    return {
        "pg_loss": pg_loss.detach(),
        "clipfrac": masked_mean(clipped.to(ratio.dtype), mask),
        "dual_clipfrac": masked_mean(dual_clipped.to(ratio.dtype), mask),
        "approx_kl": masked_mean(kl_penalty(old_logprobs, logprobs, "k3"), mask),
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_max": torch.where(mask.bool(), ratio, torch.full_like(ratio, -torch.inf)).max(),
    }


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip: float | None = None,
    agg: str = "token-mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """``0.5 * max((v-R)^2, (old + clamp(v-old, ±clip) - R)^2)``, aggregated; stats: vf_clipfrac, value_mean.

    Without ``clip`` the loss is ``0.5 * (v-R)^2``.
    """
    values, old_values, returns = _valid_only(mask, values, old_values, returns)
    err = (values - returns).square()
    if clip is None:
        per_tok = 0.5 * err
        clipped = torch.zeros_like(err, dtype=torch.bool)
    else:
        v_clip = old_values + (values - old_values).clamp(-clip, clip)
        err_clip = (v_clip - returns).square()
        per_tok = 0.5 * torch.maximum(err, err_clip)
        clipped = err_clip > err
    loss = agg_loss(per_tok, mask, agg)
    with torch.no_grad():
        stats = {
            "vf_loss": loss.detach(),
            "vf_clipfrac": masked_mean(clipped.to(err.dtype), mask),
            "value_mean": masked_mean(values.detach(), mask),
        }
    return loss, stats


def ppo_loss_from_logits(
    logits: Tensor,
    labels: Tensor,
    old_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    objective: PPOObjective | None = None,
    **settings: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The objective from logits ``[..., V]`` (``objective``, or its fields as keywords: see
    ``fastppo.PPOObjective``): ``ppo_loss_from_logprobs`` of ``log_softmax(logits / temperature)`` at ``labels`` and
    the entropy. ``old_logprobs=None``: on-policy (each token's own log-prob, detached).
    """
    obj = objective_from(objective, settings, "ppo_loss_from_logits")
    # Masked rows of the logits may hold anything too (NaN at a padding position): replaced by zeros, so the
    # softmax backward of a masked row sees finite numbers next to its zero upstream gradient.
    logits = torch.where((mask != 0).unsqueeze(-1), logits, torch.zeros_like(logits))
    logprobs, entropy = logprobs_and_entropy(logits, labels, temperature=obj.temperature, top_k=obj.top_k,
                                             top_p=obj.top_p)
    return ppo_loss_from_logprobs(logprobs, entropy, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs,
                                  rollout_logprobs=rollout_logprobs, objective=obj)


def ppo_loss_from_logprobs(
    logprobs: Tensor,
    entropy: Tensor,
    old_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    objective: PPOObjective | None = None,
    **settings: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The objective once the token log-probs and entropies ``[B, T]`` exist (``objective.temperature`` was applied
    when they were computed): what every entry point computes, whether its log-probs come from the logits, the fused
    LM head's chunks or the vocabulary-parallel collectives. ``old_logprobs=None``: on-policy, each token's old
    log-prob is its own, detached (ratio 1). ``rollout_logprobs``: the sampler's, for rollout correction.

    ``loss = agg(pg) + kl_coef * agg(kl) - entropy_coef * entropy_agg(H)`` with the per-token terms of
    ``reference.objective.objective_terms``. Stats (detached): pg_loss, clipfrac, dual_clipfrac, approx_kl, ratio_mean,
    ratio_max, kl (with reference log-probs), entropy, loss; with rollout correction the ``rollout_*`` statistics of
    ``reference.objective.rollout_weights``; ``off_policy_masked_fraction`` / ``entropy_masked_fraction`` with those
    masks on.
    """
    obj = objective_from(objective, settings, "ppo_loss_from_logprobs")
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    logprobs, entropy, old_logprobs, advantages, ref_logprobs, rollout_logprobs = _valid_only(
        mask, logprobs, entropy, old_logprobs, advantages, ref_logprobs, rollout_logprobs)
    is_weight, is_stats = None, {}
    if obj.rollout_is_level is not None:
        if rollout_logprobs is None:
            raise ValueError("rollout correction (rollout_is_level) needs rollout_logprobs")
        is_weight, is_stats = rollout_weights(old_logprobs, rollout_logprobs, mask, obj)
    terms = objective_terms(logprobs, entropy, old_logprobs, advantages, mask, ref_logprobs, obj, is_weight=is_weight,
                            sampler_logp=rollout_logprobs)
    agg = objective_agg(obj)
    pg_loss = agg_loss(terms["pg"], mask, **agg)
    loss = pg_loss
    if ref_logprobs is not None and obj.kl_coef != 0.0:
        loss = loss + obj.kl_coef * agg_loss(terms["kl"], mask, **agg)
    keep_h = terms["entropy_mask"]
    if obj.entropy_coef != 0.0:
        loss = loss - obj.entropy_coef * agg_loss(entropy, keep_h, **entropy_agg(obj))
    stats = policy_stats(pg_loss, logprobs, old_logprobs, terms["ratio"], terms["clipped"], terms["dual_clipped"],
                         mask)
    with torch.no_grad():
        if ref_logprobs is not None:
            stats["kl"] = masked_mean(terms["kl"].detach(), mask)
        stats["entropy"] = masked_mean(entropy.detach(), mask)
        stats.update(is_stats)
        valid = mask != 0
        if obj.off_policy_mask_threshold is not None or obj.top_entropy_quantile < 1.0:
            dropped = (terms["pg"].detach() == 0) & valid  # a masked policy term is exactly 0
            stats["policy_masked_fraction"] = masked_mean(dropped.to(entropy.dtype), mask)
        stats["loss"] = loss.detach()
    return loss, stats


def ppo_term_rows(logp: Tensor, entropy: Tensor, lse: Tensor, old_logp: Tensor, adv: Tensor, ref_logp: Tensor | None,
                  mask: Tensor, objective: PPOObjective, *, is_weight: Tensor | None = None) -> Tensor:
    """The per-token terms ``[len(PPO_TERMS), N]`` of a token-separable objective (``objective.token_separable``),
    rows in ``PPO_TERMS`` order, from the row statistics ``logp, entropy, lse [N]``: the spec of every backend's
    ``ppo_loss_forward`` launcher (the kernels' shared epilogue), and the per-chunk epilogue of the fused LM head for
    the objectives the kernels' epilogue does not compute (``is_weight``: rollout-correction weights).

    ``pg`` and ``kl`` are ``objective_terms``' (every weight applied); ``dpg`` / ``dkl`` their derivatives w.r.t.
    ``logp`` (0 where a clip or the log-ratio clamp holds it); ``loss = pg + kl_coef * kl - entropy_coef * entropy``
    (kl = 0 without ``ref_logp``; ``kl_coef == 0`` adds nothing, not ``0 * inf``). Masked rows (``mask == 0``) are 0 in
    every term, whatever their inputs hold.
    """
    obj = objective
    if not obj.token_separable:
        raise ValueError("ppo_term_rows computes token-separable objectives only (token-level ratios, no masks built "
                         "from the current log-probs)")
    dt = logp.dtype
    valid = mask != 0
    zero = torch.zeros_like(logp)
    logp, entropy, lse, old_logp, adv = (torch.where(valid, t.to(dt), zero)
                                         for t in (logp, entropy, lse, old_logp, adv))
    ref_logp = None if ref_logp is None else torch.where(valid, ref_logp.to(dt), zero)
    t = objective_terms(logp, entropy, old_logp, adv, mask, ref_logp, obj, is_weight=is_weight)
    dpg, dkl = token_term_grads(logp, old_logp, adv, ref_logp, obj, is_weight=is_weight)
    pg, kl = t["pg"], t["kl"]
    loss = pg - obj.entropy_coef * entropy
    if obj.kl_coef != 0.0:
        loss = loss + obj.kl_coef * kl
    rows = {"logp": logp, "entropy": entropy, "lse": lse, "pg": pg, "ratio": t["ratio"].detach(), "kl": kl,
            "dpg": dpg, "dkl": dkl, "clipped": t["clipped"].to(dt), "dual_clipped": t["dual_clipped"].to(dt),
            "loss": loss}
    return torch.stack([torch.where(valid, rows[k], zero) for k in PPO_TERMS])
