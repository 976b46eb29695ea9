"""OpenRLHF's names and signatures (``openrlhf.models.utils``, ``openrlhf.models.loss``, the experience maker's
GAE / REINFORCE returns), backed by fastppo's ops.

OpenRLHF conventions kept exactly:
- ``log_probs_from_logits(..., temperature)`` divides ``logits`` in place when ``temperature != 1`` (callers
  rely on the scaled logits afterwards) and returns the log-probs of the scaled logits.
- ``compute_approx_kl`` works in float32, clamps k3's log-ratio below at -10 and every estimate to +-10;
  ``unbiased_gradient`` swaps in the importance-weighted k2 gradient (weights clamped at 10).
- ``PolicyLoss`` defaults: clip 0.2 / 0.2, no dual clip (``dual_clip=c`` caps negative-advantage losses at
  ``-c*A``), token-level loss (masked mean over all tokens) or, with ``token_level_loss=False``, the mean of
  per-sequence token means (``+1e-8`` per sequence); GSPO and the train/rollout importance-sampling
  correction modes. Returns ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``. The per-token term comes
  from fastppo's objective wherever ``objective_from_policy_loss`` represents the configuration; the
  sequence-level and divergence gates (which it does not) are computed here in PyTorch with OpenRLHF's formulas.
- ``ValueLoss``: ``0.5 * agg(max((old + clamp(v-old, +-c) - R)^2, (v-R)^2))``, no clip by default.
- GAE (``get_advantages_and_returns``): rewards and values are multiplied by the action mask, then the classic
  recursion runs over every position (so masked positions hold values too); ``returns = advantages + values``.

``objective_from_policy_loss`` gives the ``fastppo.PPOObjective`` of a ``PolicyLoss`` configuration (and of the
actor's KL loss and entropy bonus); ``PolicyLoss`` computes the configurations it represents through that objective.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

import fastppo
from fastppo.objective import PPOObjective
from fastppo.reference.losses import ppo_token_terms
from fastppo.reference.objective import objective_terms, rollout_weights

__all__ = [
    "KL_IS_WEIGHT_CLIP",
    "PolicyLoss",
    "ValueLoss",
    "aggregate_loss",
    "compute_approx_kl",
    "get_advantages_and_returns",
    "get_cumulative_returns",
    "log_probs_from_logits",
    "masked_mean",
    "objective_from_policy_loss",
]

KL_IS_WEIGHT_CLIP = 10.0


def log_probs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-prob of ``labels [...]`` under ``logits [..., V] / temperature`` -> ``[...]`` (fp32 for fp32/bf16)."""
    if temperature != 1.0:
        logits.div_(temperature)  # OpenRLHF scales the caller's logits in place; keep that side effect
    return fastppo.token_logprobs(logits, labels)


def masked_mean(tensor: Tensor, mask: Tensor | None, dim: int | None = None) -> Tensor:
    if mask is None:
        return tensor.mean(dim=dim)
    return (tensor * mask).sum(dim=dim) / mask.sum(dim=dim)


def compute_approx_kl(
    log_probs: Tensor,
    log_probs_base: Tensor,
    log_probs_old: Tensor | None = None,
    kl_estimator: str = "k1",
    unbiased_gradient: bool = False,
) -> Tensor:
    """Per-token KL(pi || pi_ref) estimate (``k1``/``k2``/``k3``) on ``fastppo.kl_penalty``, clamped to +-10."""
    lp, base = log_probs.float(), log_probs_base.float()
    if kl_estimator in ("k1", "k2"):
        value = fastppo.kl_penalty(lp, base, kl_estimator, clamp=10.0)
    elif kl_estimator == "k3":
        # Bound the log-ratio below before exp so the clamped region has a finite (zero) gradient. fastppo's k3 is
        # exp(-d) - 1 + d, OpenRLHF's operation order, so (d, 0) gives its bits exactly.
        d = (lp - base).clamp(min=-10)
        value = fastppo.kl_penalty(d, torch.zeros_like(d), "k3", clamp=10.0)
    else:
        raise ValueError(f"Unknown kl_estimator: {kl_estimator}")
    if not unbiased_gradient:
        return value
    w: Tensor | float = 1.0
    if log_probs_old is not None:
        w = (lp - log_probs_old.float()).exp().clamp(max=KL_IS_WEIGHT_CLIP).detach()
    surrogate = w * fastppo.kl_penalty(lp, base, "k2")
    return value.detach() + surrogate - surrogate.detach()


def aggregate_loss(
    loss: Tensor,
    loss_mask: Tensor | None,
    token_level_loss: bool = True,
    dp_size: int = 1,
    batch_num_tokens: float | None = None,
    global_batch_size: float | None = None,
) -> Tensor:
    """Token-level: masked sum / token count; sample-level: mean of per-sequence token means."""
    if token_level_loss:
        if batch_num_tokens is None:
            return masked_mean(loss, loss_mask, dim=None)
        return (loss * loss_mask).sum() / batch_num_tokens * dp_size
    token_counts = loss_mask.sum(dim=-1)
    seq_loss = (loss * loss_mask).sum(dim=-1) / (token_counts + 1e-8)
    seq_mask = (token_counts > 0).float()
    if global_batch_size is None:
        return masked_mean(seq_loss, seq_mask, dim=None)
    return (seq_loss * seq_mask).sum() / global_batch_size * dp_size


# OpenRLHF's KL estimators -> fastppo kl_kind. Its k3 (log-ratio bounded below at -10, estimate clamped to +-10) is
# verl's low_var_kl value for value and gradient: both clamp the estimate at 10 before the log-ratio bounds matter.
_KL_ESTIMATORS = {"k1": "k1", "k2": "k2", "k3": "low_var_kl"}


def objective_from_policy_loss(
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip: float | None = None,
    token_level_loss: bool = True,
    policy_loss_type: str = "ppo",
    is_correction_level: str = "off",
    is_correction_mode: str = "mask",
    is_correction_gating: str = "ratio",
    is_correction_threshold: Any = (0.5, 5.0),
    *,
    dp_size: int = 1,
    batch_num_tokens: Any = None,
    global_batch_size: Any = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k1",
    unbiased_gradient: bool = False,
    entropy_coef: float | None = None,
) -> PPOObjective:
    """The ``fastppo.PPOObjective`` of OpenRLHF 0.11.2's actor loss: ``PolicyLoss(...)`` (its constructor's arguments,
    in its order), called with ``dp_size`` / ``batch_num_tokens`` / ``global_batch_size`` (the trainer's
    ``loss_batch_info``), plus ``kl_coef * aggregate_loss(compute_approx_kl(..., kl_estimator))``
    (``--algo.kl.use_loss`` with its ``kl_ctl``) and ``- entropy_coef * aggregate_loss(entropy)``
    (``--actor.entropy_coef``; None is off).

    - ``policy_loss_type="ppo"``: PPO clip with ``clip_eps_low/high`` and ``dual_clip``; ``"gspo"``:
      ``importance_sampling_level="sequence"`` (gradient through the sequence mean, as OpenRLHF) and always a
      per-sequence loss. With ``is_correction_level != "off"`` OpenRLHF's GSPO ratio is taken against the rollout
      policy and no correction weight is applied: pass the rollout log-probs as fastppo's ``old_logprobs``.
    - ``token_level_loss``: ``agg="token-mean"`` (``loss_normalizer = batch_num_tokens / dp_size`` when given), else
      ``"seq-mean-token-mean"`` (``global_batch_size / dp_size``).
    - ``is_correction_*`` (PPO only) at token level with ratio gating: mode ``clip`` -> ``rollout_is_mode="truncate"``,
      ``mask`` -> ``"mask"`` (IcePop), threshold ``(low, high)`` -> ``rollout_is_min/max`` (a ``low`` of 0 bounds
      nothing); the ratio is ``exp(old - rollout)`` from fastppo's ``old_logprobs`` and ``rollout_logprobs``.
    - ``kl_estimator`` k1 / k2 / k3 -> ``kl_kind`` k1 / k2 / low_var_kl; OpenRLHF aggregates the KL and the entropy
      per token with ``batch_num_tokens`` even when the policy loss is per sequence.

    Not representable (``NotImplementedError``): ``is_correction_level="seq"`` for PPO (the gate is the sequence's
    geometric-mean ratio, but surviving tokens keep their own per-token ratio as the weight: fastppo's sequence
    level weights every token by the sequence ratio), the ``binary_kl`` / ``tv`` gates (divergences of the sampled
    token's probability, not an importance ratio), ``unbiased_gradient`` (its gradient is ``min(exp(logp - old),
    10) * (logp - ref)``; fastppo's ``+`` kinds equal it only without old log-probs), and a KL or entropy term next
    to a per-sequence policy loss with global counts (they aggregate differently in OpenRLHF).
    Documented differences (not reached by ordinary inputs): OpenRLHF clamps its k1 / k2 estimates to +-10 (fastppo's
    k1 / k2 are unclamped), does not clamp GSPO's mean log-ratio or the correction's log-ratio (fastppo clamps every
    log-ratio to +-20), and its masked means have no epsilon (NaN on an empty batch; fastppo rejects one).
    """
    if policy_loss_type not in ("ppo", "gspo"):
        raise ValueError(f"Invalid policy loss type: {policy_loss_type}")
    out: dict[str, Any] = {"policy_loss": "ppo", "clip_low": float(clip_eps_low), "clip_high": float(clip_eps_high),
                           "dual_clip": None if dual_clip is None else float(dual_clip)}
    token_level = bool(token_level_loss) and policy_loss_type == "ppo"
    if policy_loss_type == "gspo":
        out["importance_sampling_level"] = "sequence"
    count = batch_num_tokens if token_level else global_batch_size
    out["agg"] = "token-mean" if token_level else "seq-mean-token-mean"
    out["loss_normalizer"] = None if count is None else float(count) / dp_size
    if is_correction_level != "off" and policy_loss_type == "ppo":
        if is_correction_level != "token":
            raise NotImplementedError(
                "OpenRLHF's sequence-level correction gates a sequence on its geometric-mean ratio and weights its "
                "surviving tokens by their own per-token ratios; fastppo's sequence level weights by the sequence "
                "ratio")
        if is_correction_gating != "ratio":
            raise NotImplementedError(f"OpenRLHF's {is_correction_gating} gate is a divergence of the sampled token's "
                                      "probability, not an importance ratio fastppo's rollout correction bounds")
        low, high = (float(t) for t in is_correction_threshold)
        out.update(rollout_is_level="token", rollout_is_mode="truncate" if is_correction_mode == "clip" else "mask",
                   rollout_is_min=low if low > 0.0 else None, rollout_is_max=high)
    if kl_coef:
        if unbiased_gradient:
            raise NotImplementedError("unbiased_gradient's KL gradient is importance-weighted by min(exp(logp - old), "
                                      "10); fastppo's '+' KL kinds take k2's gradient unweighted")
        if kl_estimator not in _KL_ESTIMATORS:
            raise ValueError(f"Unknown kl_estimator: {kl_estimator}")
        if not token_level:
            raise NotImplementedError("OpenRLHF aggregates the KL loss per token and this policy loss per sequence; "
                                      "fastppo aggregates both alike")
        out.update(kl_coef=float(kl_coef), kl_kind=_KL_ESTIMATORS[kl_estimator])
    if entropy_coef:
        out["entropy_coef"] = float(entropy_coef)
        if not token_level:
            if batch_num_tokens is not None:
                raise NotImplementedError("OpenRLHF's entropy is a token mean over batch_num_tokens next to this "
                                          "per-sequence policy loss; fastppo's entropy_agg is local")
            out["entropy_agg"] = "token-mean"
    return PPOObjective(**out)


class PolicyLoss(nn.Module):
    """Clipped PPO (or GSPO) policy loss with OpenRLHF's constructor and ``forward`` signature."""

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float | None = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        is_correction_level: str = "off",
        is_correction_mode: str = "mask",
        is_correction_gating: str = "ratio",
        is_correction_threshold: Any = (0.5, 5.0),
    ) -> None:
        super().__init__()
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.token_level_loss = token_level_loss
        self.dual_clip = dual_clip
        self.policy_loss_type = policy_loss_type
        self.is_correction_level = is_correction_level
        self.is_correction_mode = is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = is_correction_threshold
        if policy_loss_type == "gspo":
            self.token_level_loss = False  # GSPO is a sequence-level objective
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
        if is_correction_level not in {"off", "token", "seq"}:
            raise ValueError(f"is_correction_level must be off/token/seq, got {is_correction_level}")
        if is_correction_mode not in {"mask", "clip"}:
            raise ValueError(f"is_correction_mode must be mask/clip, got {is_correction_mode}")
        if is_correction_gating not in {"ratio", "binary_kl", "tv"}:
            raise ValueError(f"is_correction_gating must be ratio/binary_kl/tv, got {is_correction_gating}")
        if is_correction_mode == "clip" and (is_correction_level == "seq" or is_correction_gating != "ratio"):
            raise ValueError(
                "is_correction_mode=clip requires is_correction_level=token and is_correction_gating=ratio"
            )
        if is_correction_gating != "ratio" and is_correction_level != "off" and is_correction_threshold[0] > 0:
            raise ValueError(f"is_correction_gating={is_correction_gating} takes an upper bound only (a single delta)")

    def _objective(self) -> PPOObjective | None:
        """fastppo's objective of this configuration's per-token policy term; None where it is not representable
        (``objective_from_policy_loss`` says why) or holds values PPOObjective rejects (OpenRLHF checks none: a
        ``clip_eps_low >= 1`` is a valid, if odd, OpenRLHF setting)."""
        try:
            return objective_from_policy_loss(
                self.clip_eps_low, self.clip_eps_high, self.dual_clip, self.token_level_loss, self.policy_loss_type,
                self.is_correction_level, self.is_correction_mode, self.is_correction_gating,
                self.is_correction_threshold,
            )
        except (NotImplementedError, ValueError):
            return None

    @staticmethod
    def _objective_terms(obj: PPOObjective, log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor,
                         mask: Tensor, rollout_log_probs: Tensor | None) -> Tensor:
        """The objective's per-token policy term (rollout weights included); 0 on masked tokens."""
        valid = mask != 0
        zero = torch.zeros_like(log_probs)
        lp, old, adv = (torch.where(valid, t.to(log_probs.dtype), zero) for t in (log_probs, old_log_probs, advantages))
        weight = None
        if obj.rollout_is_level is not None:
            rollout = torch.where(valid, rollout_log_probs.to(lp.dtype), zero)
            weight, _ = rollout_weights(old, rollout, valid, obj)
        return objective_terms(lp, zero, old, adv, valid, None, obj, is_weight=weight)["pg"]

    def _is_metrics(self, old_log_probs: Tensor, rollout_log_probs: Tensor, action_mask: Tensor | None
                    ) -> tuple[Tensor, Tensor]:
        """OpenRLHF's ``vllm_kl`` and token-level ``is_filter_ratio`` (tokens whose ratio is outside the band)."""
        low, high = self.is_correction_threshold
        with torch.no_grad():
            stat = (old_log_probs - rollout_log_probs).exp()
            filtered = (stat < low) | (stat > high)
            return (masked_mean(rollout_log_probs - old_log_probs, action_mask, dim=None),
                    masked_mean(filtered.float(), action_mask, dim=None))

    def _is_correction(
        self, loss: Tensor, old_log_probs: Tensor, rollout_log_probs: Tensor, action_mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Train/rollout mismatch correction: gate units (token or sequence) on a statistic, then mask or clip."""
        low, high = self.is_correction_threshold
        seq_level = self.is_correction_level == "seq"
        is_log_ratio = (old_log_probs - rollout_log_probs).detach()
        token_is = is_log_ratio.exp()
        if self.is_correction_gating == "ratio":
            stat = masked_mean(is_log_ratio, action_mask, dim=-1).unsqueeze(-1) if seq_level else is_log_ratio
            stat = stat.exp()
        else:
            p = rollout_log_probs.exp().clamp(1e-6, 1 - 1e-6)
            q = old_log_probs.exp().clamp(1e-6, 1 - 1e-6)
            if self.is_correction_gating == "binary_kl":
                stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
            else:
                stat = (p - q).abs()
            if seq_level:
                stat = masked_mean(stat, action_mask, dim=-1).unsqueeze(-1)
        if self.is_correction_mode == "clip":
            coef = stat.clamp(min=low, max=high)
            filtered = (stat < low) | (stat > high)
        else:
            keep = (stat >= low) & (stat <= high)
            coef = torch.where(keep, token_is, 0.0)
            filtered = ~keep
        filter_ratio = filtered.float().mean() if seq_level else masked_mean(filtered.float(), action_mask, dim=None)
        vllm_kl = masked_mean(rollout_log_probs - old_log_probs, action_mask, dim=None)
        return coef * loss, vllm_kl, filter_ratio

    def forward(
        self,
        log_probs: Tensor,
        old_log_probs: Tensor,
        advantages: Tensor,
        action_mask: Tensor | None = None,
        rollout_log_probs: Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | None = None,
        global_batch_size: float | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        raw_log_ratio = log_probs - old_log_probs
        is_on = self.is_correction_level != "off" and self.policy_loss_type == "ppo"
        if self.policy_loss_type == "ppo":
            ratio = raw_log_ratio.clamp(min=-20.0, max=20.0).exp()
        elif self.policy_loss_type == "gspo":
            log_ratio = log_probs - rollout_log_probs if self.is_correction_level != "off" else raw_log_ratio
            ratio = (log_ratio * action_mask).sum(dim=-1) / action_mask.sum(dim=-1).clamp(min=1)
            ratio = ratio.exp().unsqueeze(-1) * action_mask
        else:
            raise ValueError(f"Invalid policy loss type: {self.policy_loss_type}")

        vllm_kl = is_filter_ratio = None
        plain = self.policy_loss_type == "ppo" and not is_on and self.token_level_loss and batch_num_tokens is None
        objective = None if plain else self._objective()
        if plain:
            # The common configuration is exactly fastppo's op (token-mean of the clipped surrogate).
            mask = action_mask if action_mask is not None else torch.ones_like(advantages)
            loss, _ = fastppo.ppo_policy_loss(
                log_probs, old_log_probs, advantages, mask, clip_low=self.clip_eps_low,
                clip_high=self.clip_eps_high, dual_clip=self.dual_clip,
            )
        elif objective is not None:
            # The per-token terms of fastppo's objective (GSPO, token-level ratio-gated correction), aggregated with
            # OpenRLHF's own aggregate_loss (its +1e-8 per sequence kept).
            mask = action_mask if action_mask is not None else torch.ones_like(log_probs)
            # OpenRLHF's GSPO with the correction on takes its ratio against the rollout policy, and no weight.
            reference = rollout_log_probs if self.policy_loss_type == "gspo" and self.is_correction_level != "off" \
                else old_log_probs
            per_token = self._objective_terms(objective, log_probs, reference, advantages, mask, rollout_log_probs)
            if is_on:
                vllm_kl, is_filter_ratio = self._is_metrics(old_log_probs, rollout_log_probs, action_mask)
            loss = aggregate_loss(
                per_token, action_mask, token_level_loss=self.token_level_loss, dp_size=dp_size,
                batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
            )
        else:  # sequence-level and divergence gates (and clip ranges fastppo rejects): OpenRLHF's formulas here
            if self.policy_loss_type == "ppo":
                per_token = ppo_token_terms(
                    log_probs, old_log_probs, advantages, clip_low=self.clip_eps_low, clip_high=self.clip_eps_high,
                    dual_clip=self.dual_clip,
                )[0]
            else:
                surr1 = ratio * advantages
                surr2 = ratio.clamp(1 - self.clip_eps_low, 1 + self.clip_eps_high) * advantages
                clip1 = torch.min(surr1, surr2)
                if self.dual_clip is None:
                    per_token = -clip1
                else:
                    per_token = -torch.where(advantages < 0, torch.max(clip1, self.dual_clip * advantages), clip1)
            if is_on:
                per_token, vllm_kl, is_filter_ratio = self._is_correction(
                    per_token, old_log_probs, rollout_log_probs, action_mask
                )
            loss = aggregate_loss(
                per_token, action_mask, token_level_loss=self.token_level_loss, dp_size=dp_size,
                batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
            )
        with torch.no_grad():
            surr1 = ratio * advantages
            surr2 = ratio.clamp(1 - self.clip_eps_low, 1 + self.clip_eps_high) * advantages
            clip_ratio = masked_mean(torch.lt(surr2, surr1).float(), action_mask, dim=None)
        ppo_kl = masked_mean(-raw_log_ratio.detach(), action_mask, dim=None)
        return loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio


class ValueLoss(nn.Module):
    """Clipped value loss with OpenRLHF's constructor (``clip_eps=None`` = unclipped) and ``forward``."""

    def __init__(self, clip_eps: float | None = None, token_level_loss: bool = True) -> None:
        super().__init__()
        self.clip_eps = clip_eps
        self.token_level_loss = token_level_loss

    def forward(
        self,
        values: Tensor,
        old_values: Tensor,
        returns: Tensor,
        action_mask: Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | None = None,
        global_batch_size: float | None = None,
    ) -> Tensor:
        if self.token_level_loss and batch_num_tokens is None:
            mask = action_mask if action_mask is not None else torch.ones_like(values)
            return fastppo.value_loss(values, old_values, returns, mask, clip=self.clip_eps)[0]
        if self.clip_eps is not None:
            clipped = old_values + (values - old_values).clamp(-self.clip_eps, self.clip_eps)
            loss = torch.max((clipped - returns) ** 2, (values - returns) ** 2)
        else:
            loss = (values - returns) ** 2
        loss = aggregate_loss(
            loss, action_mask, token_level_loss=self.token_level_loss, dp_size=dp_size,
            batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
        )
        return 0.5 * loss


def get_advantages_and_returns(
    values: Tensor, rewards: Tensor, action_mask: Tensor | None, gamma: float, lambd: float
) -> tuple[Tensor, Tensor]:
    """OpenRLHF's GAE on ``fastppo.gae``: ``(advantages, returns)`` ``[B, T]``, no gradient."""
    with torch.no_grad():
        if action_mask is not None:
            values = action_mask * values
            rewards = action_mask * rewards
        every = torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
        adv, _ = fastppo.gae(rewards, values, every, gamma=float(gamma), lam=float(lambd))
        adv = adv.to(torch.promote_types(rewards.dtype, values.dtype))
        return adv, adv + values


def get_cumulative_returns(rewards: Tensor, action_mask: Tensor | None, gamma: float) -> Tensor:
    """OpenRLHF's REINFORCE returns ``G_t = r_t + gamma * G_{t+1}`` over every position (masked rewards 0),
    on ``fastppo.gae`` (values 0, lam 1). ``[B, T] -> [B, T]``."""
    with torch.no_grad():
        if action_mask is not None:
            rewards = action_mask * rewards
        every = torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
        returns, _ = fastppo.gae(rewards, torch.zeros_like(rewards), every, gamma=float(gamma), lam=1.0)
        return returns.to(rewards.dtype)


def _get_advantages_and_returns_method(
    self: Any, values: Tensor, rewards: Tensor, action_mask: Tensor | None, gamma: float, lambd: float
) -> tuple[Tensor, Tensor]:
    return get_advantages_and_returns(values, rewards, action_mask, gamma, lambd)


def _get_cumulative_returns_method(self: Any, rewards: Tensor, action_mask: Tensor | None, gamma: float) -> Tensor:
    return get_cumulative_returns(rewards, action_mask, gamma)
