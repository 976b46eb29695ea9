"""verl's names and signatures (``verl.utils.torch_functional``, ``verl.trainer.ppo.core_algos``), backed by
fastppo's ops.

verl conventions kept exactly:
- ``masked_mean`` divides by ``mask.sum() + 1e-8`` and ignores NaN outside the mask; ``masked_var`` is
  Bessel-corrected and raises on masks with 0 or 1 valid element; ``masked_whiten`` uses ``rsqrt(var + 1e-8)``.
- GAE skips masked positions (carry-forward); a masked position holds the advantage of the next valid token,
  ``returns = advantages + values`` everywhere, then advantages are whitened over the response mask.
- ``agg_loss`` modes ``token-mean``, ``token-sum``, ``seq-mean-token-sum``, ``seq-mean-token-mean`` (``+1e-8``
  per sequence), ``seq-mean-token-sum-norm`` (seq-mean divided by ``loss_scale_factor`` or T), with
  ``dp_size`` / ``batch_num_tokens`` / ``global_batch_size`` for data-parallel invariance.
- the vanilla policy loss always applies dual-clip (``clip_ratio_c``, default 3) and clamps the log-ratio at
  +-20; KL ``low_var_kl``/``k3`` clamps the log-ratio at +-20 and the estimate at +-10; ``k3+``-style names
  use the k2 straight-through gradient.
- GRPO/RLOO group by verl's ``index`` array (uids of any type); a group of one gets mean 0 / std 1 (GRPO) or
  keeps its raw score (RLOO); the ``*_vectorized`` variants follow verl's vectorised versions.

``objective_from_actor_config`` gives the ``fastppo.PPOObjective`` of an ``ActorConfig`` (policy loss mode, clip,
KL loss, entropy, aggregation with ``global_batch_info``) and of the algorithm's decoupled rollout correction;
``compute_policy_loss_gspo`` / ``_sapo`` / ``_cispo`` are registry-compatible policy losses computed by fastppo's
reference objective (``patch("verl")`` puts them into ``POLICY_LOSS_REGISTRY``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

import fastppo
from fastppo.objective import AGG_MODES, PPOObjective
from fastppo.reference.advantages import dense_group_ids, group_stats
from fastppo.reference.losses import agg_loss as reference_agg_loss
from fastppo.reference.losses import objective_agg, ppo_token_terms
from fastppo.reference.objective import objective_terms

__all__ = [
    "agg_loss",
    "clip_by_value",
    "compute_gae_advantage_return",
    "compute_grpo_outcome_advantage",
    "compute_grpo_vectorized_outcome_advantage",
    "compute_policy_loss",
    "compute_policy_loss_cispo",
    "compute_policy_loss_gspo",
    "compute_policy_loss_sapo",
    "compute_policy_loss_vanilla",
    "compute_reinforce_plus_plus_outcome_advantage",
    "compute_rloo_outcome_advantage",
    "compute_rloo_vectorized_outcome_advantage",
    "compute_value_loss",
    "entropy_from_logits",
    "entropy_from_logits_with_chunking",
    "kl_penalty",
    "kl_penalty_forward",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "objective_from_actor_config",
]


# ------------------------------------------------------------------------------- verl.utils.torch_functional
def logprobs_from_logits(logits: Tensor, labels: Tensor, inplace_backward: bool = True) -> Tensor:
    """Log-prob of ``labels [...]`` under ``logits [..., V]`` -> ``[...]`` float32 (fp64 for fp64 logits).

    ``inplace_backward`` (as verl's flash-attn path) lets kernel backends write dlogits into the logits buffer.
    """
    return fastppo.token_logprobs(logits, labels, inplace_backward=inplace_backward)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` per row. ``[..., V] -> [...]``."""
    return fastppo.token_entropy(logits)


def entropy_from_logits_with_chunking(logits: Tensor, chunk_size: int = 2048) -> Tensor:
    """verl's chunked entropy (float32 result); fastppo never materialises the softmax, so no chunking."""
    return fastppo.token_entropy(logits).float()


def clip_by_value(x: Tensor, tensor_min: Tensor, tensor_max: Tensor) -> Tensor:
    return torch.max(torch.min(x, tensor_max), tensor_min)


def masked_sum(values: Tensor, mask: Tensor, axis: int | tuple[int, ...] | None = None) -> Tensor:
    """Sum of ``values`` where ``mask`` is set; NaN outside the mask does not leak in."""
    valid = torch.where(mask.bool(), values, 0.0)
    return (valid * mask).sum(axis=axis)


def masked_mean(values: Tensor, mask: Tensor, axis: int | tuple[int, ...] | None = None) -> Tensor:
    """``masked_sum / (mask.sum() + 1e-8)`` (verl's epsilon: an all-masked batch gives 0, not NaN)."""
    return masked_sum(values, mask, axis) / (mask.sum(axis=axis) + 1e-8)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Masked variance, Bessel-corrected when ``unbiased`` (needs >= 2 valid elements)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        mask_sum = mask.sum()
        if bool(mask_sum == 0):
            raise ValueError("At least one element in the mask has to be 1.")
        if bool(mask_sum == 1):
            raise ValueError("The sum of the mask is one, which can cause a division by zero.")
        variance = variance * (mask_sum / (mask_sum - 1))
    return variance


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """``(values - mean) * rsqrt(var + 1e-8)`` with verl's masked mean/var; mean re-added if not shift_mean."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


# ------------------------------------------------------------------------------------- advantage estimators
def _next_valid_fill(adv: Tensor, mask: Tensor) -> Tensor:
    """Give every masked position the advantage of the next valid token (0 after the last): verl's carry."""
    B, T = adv.shape
    pos = torch.arange(T, device=adv.device).expand(B, T)
    nxt = torch.where(mask, pos, torch.full_like(pos, T))
    nxt = torch.flip(torch.cummin(torch.flip(nxt, [1]), dim=1).values, [1])
    padded = torch.cat([adv, adv.new_zeros(B, 1)], dim=1)
    return padded.gather(1, nxt)


def compute_gae_advantage_return(
    token_level_rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: Any, lam: Any
) -> tuple[Tensor, Tensor]:
    """verl GAE on ``fastppo.gae``: ``(advantages, returns)`` ``[bs, response_length]``; advantages are
    whitened over ``response_mask``; masked positions carry the next valid token's advantage."""
    with torch.no_grad():
        m = response_mask.bool()
        adv, _ = fastppo.gae(token_level_rewards, values, m, gamma=float(gamma), lam=float(lam))
        adv = _next_valid_fill(adv, m)
        returns = adv + values
        advantages = masked_whiten(adv, response_mask)
    return advantages, returns


def _group_ids(index: Any, device: torch.device) -> Tensor:
    if isinstance(index, Tensor):
        return index.to(device=device, dtype=torch.int64).reshape(-1)
    inverse = np.unique(np.asarray(index), return_inverse=True)[1].reshape(-1)
    return torch.as_tensor(inverse, dtype=torch.int64, device=device)


def _singletons(gid: Tensor) -> Tensor:
    ones = torch.ones(gid.shape, dtype=torch.float32, device=gid.device)
    return torch.zeros_like(ones).index_add_(0, gid, ones)[gid] < 2


def compute_grpo_outcome_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: Any,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Any = None,
) -> tuple[Tensor, Tensor]:
    """GRPO on ``fastppo.grpo_advantages``: score = sum of token rewards; ``(advantages, advantages)``."""
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        gid = _group_ids(index, scores.device)
        adv = fastppo.grpo_advantages(
            scores, gid, response_mask, norm_by_std=norm_adv_by_std_in_grpo, eps=epsilon
        ).to(torch.promote_types(scores.dtype, torch.float32))
        if norm_adv_by_std_in_grpo:
            # verl keeps a group of one's std as a float32 tensor(1.0), so its divisor 1 + eps is float32-rounded.
            div = float(torch.tensor(1.0) + epsilon)
            single = (scores.to(adv.dtype) / div).unsqueeze(-1) * response_mask
            adv = torch.where(_singletons(gid).unsqueeze(-1), single.to(adv.dtype), adv)
    return adv, adv


def compute_grpo_vectorized_outcome_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: Any,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Any = None,
) -> tuple[Tensor, Tensor]:
    """verl's vectorised GRPO: group mean/std in float32 (fastppo's ``index_add`` group statistics, a group of
    one has mean 0 / std 1), applied to the scores in their own dtype."""
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        gid = dense_group_ids(_group_ids(index, scores.device))
        n, mean, std = group_stats(scores.float(), gid)
        single = n < 2
        mean = torch.where(single, torch.zeros_like(mean), mean)
        std = torch.where(single, torch.ones_like(std), std)
        scalars = (scores - mean) / (std + epsilon) if norm_adv_by_std_in_grpo else scores - mean
        adv = scalars.unsqueeze(-1) * response_mask
    return adv, adv


def compute_rloo_outcome_advantage(
    token_level_rewards: Tensor, response_mask: Tensor, index: Any, epsilon: float = 1e-6, config: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """RLOO on ``fastppo.rloo_advantages`` (a group of one keeps its raw score); ``(advantages, advantages)``."""
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        adv = fastppo.rloo_advantages(scores, _group_ids(index, scores.device), response_mask)
    return adv, adv


def compute_rloo_vectorized_outcome_advantage(
    token_level_rewards: Tensor, response_mask: Tensor, index: Any, epsilon: float = 1e-6, config: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """verl's vectorised RLOO: as RLOO, but a group of one gets advantage 0."""
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        gid = _group_ids(index, scores.device)
        adv = fastppo.rloo_advantages(scores, gid, response_mask)
        count = torch.zeros_like(scores).index_add_(0, gid, torch.ones_like(scores))[gid]
        adv = torch.where((count > 1).unsqueeze(-1), adv, torch.zeros_like(adv))
    return adv, adv


def compute_reinforce_plus_plus_outcome_advantage(
    token_level_rewards: Tensor, response_mask: Tensor, config: Any = None, **kwargs: Any
) -> tuple[Tensor, Tensor]:
    """REINFORCE++: discounted returns (``config.gamma``) from ``fastppo.reinforce_pp_advantages``, whitened
    over the response mask with verl's ``masked_whiten``. ``(advantages, returns)``."""
    if config is None:
        raise ValueError("compute_reinforce_plus_plus_outcome_advantage needs config (it reads config.gamma)")
    with torch.no_grad():
        _, returns = fastppo.reinforce_pp_advantages(
            token_level_rewards, response_mask, gamma=float(config.gamma), whiten=False
        )
        returns = returns.to(torch.promote_types(token_level_rewards.dtype, torch.float32))
        advantages = masked_whiten(returns, response_mask) * response_mask
    return advantages, returns


# ------------------------------------------------------------------------------------------------- losses
def agg_loss(
    loss_mat: Tensor,
    loss_mask: Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens: Any = None,
    global_batch_size: Any = None,
    loss_scale_factor: Any = None,
) -> Tensor:
    """Aggregate ``loss_mat [bs, T]`` to a scalar in verl's modes (see the module docstring)."""
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            batch_num_tokens = loss_mask.sum()
        return masked_sum(loss_mat, loss_mask) / batch_num_tokens * dp_size
    if loss_agg_mode == "token-sum":
        return masked_sum(loss_mat, loss_mask) * dp_size
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        token_count = torch.sum(loss_mask, dim=-1)
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        if loss_agg_mode == "seq-mean-token-mean":
            seq_losses = seq_losses / (token_count + 1e-8)
        seq_mask = (token_count > 0).float()
        if global_batch_size is None:
            if dp_size > 1:
                raise ValueError("global_batch_size is required when dp_size > 1")
            global_batch_size = seq_mask.sum()
        loss = masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        return loss
    raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")


def _plain_token_mean(mode: str, dp_size: int, batch_num_tokens: Any, weights: Tensor | None) -> bool:
    return mode == "token-mean" and dp_size == 1 and batch_num_tokens is None and weights is None


def _policy_loss(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_low: float,
    clip_high: float,
    clip_ratio_c: float,
    loss_agg_mode: str,
    rollout_is_weights: Tensor | None = None,
    **batch_info: Any,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if not clip_ratio_c > 1.0:
        raise ValueError(
            "The lower bound of the clip_ratio_c for dual-clip PPO should be greater than 1.0,"
            f" but get the value: {clip_ratio_c}."
        )
    dp_size = batch_info.get("dp_size", 1)
    if _plain_token_mean(loss_agg_mode, dp_size, batch_info.get("batch_num_tokens"), rollout_is_weights):
        pg_loss, _ = fastppo.ppo_policy_loss(
            log_prob, old_log_prob, advantages, response_mask, clip_low=clip_low, clip_high=clip_high,
            dual_clip=clip_ratio_c, agg="token-mean",
        )
        with torch.no_grad():
            _, _, clipped, dual = ppo_token_terms(
                log_prob, old_log_prob, advantages, clip_low=clip_low, clip_high=clip_high, dual_clip=clip_ratio_c
            )
    else:
        pg, _, clipped, dual = ppo_token_terms(
            log_prob, old_log_prob, advantages, clip_low=clip_low, clip_high=clip_high, dual_clip=clip_ratio_c
        )
        if rollout_is_weights is not None:
            pg = pg * rollout_is_weights
        pg_loss = agg_loss(pg, response_mask, loss_agg_mode, **batch_info)
    with torch.no_grad():
        neg_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
        ppo_kl = masked_mean(-neg_kl, response_mask)
        clipfrac = masked_mean(clipped.float(), response_mask)
        clipfrac_lower = masked_mean(dual.float(), response_mask)
    return pg_loss, clipfrac, ppo_kl, clipfrac_lower


def compute_policy_loss(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    cliprange: float | None = None,
    cliprange_low: float | None = None,
    cliprange_high: float | None = None,
    clip_ratio_c: float = 3.0,
    loss_agg_mode: str = "token-mean",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """verl's legacy clipped PPO loss: ``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)``."""
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    if low is None or high is None:
        raise ValueError("compute_policy_loss needs cliprange (or both cliprange_low and cliprange_high)")
    return _policy_loss(old_log_prob, log_prob, advantages, response_mask, low, high, clip_ratio_c, loss_agg_mode)


def compute_policy_loss_vanilla(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """verl's registered ``"vanilla"`` policy loss (what its actor calls): ``(pg_loss, metrics)``; clip ranges
    and ``clip_ratio_c`` from the ActorConfig, aggregation with ``config.global_batch_info``."""
    if config is None:
        raise ValueError("compute_policy_loss_vanilla needs the actor config")
    clip = config.clip_ratio
    low = config.clip_ratio_low if config.clip_ratio_low is not None else clip
    high = config.clip_ratio_high if config.clip_ratio_high is not None else clip
    clip_c = config.get("clip_ratio_c", 3.0)
    info = dict(getattr(config, "global_batch_info", None) or {})
    pg_loss, clipfrac, ppo_kl, lower = _policy_loss(
        old_log_prob, log_prob, advantages, response_mask, low, high, clip_c, loss_agg_mode, rollout_is_weights,
        **info,
    )
    metrics = {
        "actor/pg_clipfrac": clipfrac.detach().item(),
        "actor/ppo_kl": ppo_kl.detach().item(),
        "actor/pg_clipfrac_lower": lower.detach().item(),
    }
    return pg_loss, metrics


def compute_value_loss(
    vpreds: Tensor,
    returns: Tensor,
    values: Tensor,
    response_mask: Tensor,
    cliprange_value: float,
    loss_agg_mode: str = "token-mean",
    dp_size: int = 1,
    batch_num_tokens: Any = None,
    global_batch_size: Any = None,
    loss_scale_factor: Any = None,
) -> tuple[Tensor, Tensor]:
    """Clipped value loss ``0.5 * agg(max((v-R)^2, (clip(v, old +- c) - R)^2))``: ``(vf_loss, vf_clipfrac)``."""
    with torch.no_grad():
        clipped = clip_by_value(vpreds, values - cliprange_value, values + cliprange_value)
        vf_clipfrac = masked_mean(torch.gt((clipped - returns) ** 2, (vpreds - returns) ** 2).float(), response_mask)
    if _plain_token_mean(loss_agg_mode, dp_size, batch_num_tokens, None):
        vf_loss, _ = fastppo.value_loss(vpreds, values, returns, response_mask, clip=cliprange_value)
        return vf_loss, vf_clipfrac
    vpredclipped = clip_by_value(vpreds, values - cliprange_value, values + cliprange_value)
    losses = torch.max((vpreds - returns) ** 2, (vpredclipped - returns) ** 2)
    vf_loss = 0.5 * agg_loss(losses, response_mask, loss_agg_mode, dp_size=dp_size,
                             batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
                             loss_scale_factor=loss_scale_factor)
    return vf_loss, vf_clipfrac


# ------------------------------------------------------------------------------------------------------ KL
def kl_penalty_forward(logprob: Tensor, ref_logprob: Tensor, kl_penalty: str) -> Tensor:
    """verl's KL estimators on ``fastppo.kl_penalty``: ``kl``/``k1``, ``abs``, ``mse``/``k2``,
    ``low_var_kl``/``k3`` (log-ratio clamped to +-20, estimate to +-10)."""
    if kl_penalty in ("kl", "k1"):
        return fastppo.kl_penalty(logprob, ref_logprob, "k1")
    if kl_penalty == "abs":
        return fastppo.kl_penalty(logprob, ref_logprob, "abs")
    if kl_penalty in ("mse", "k2"):
        return fastppo.kl_penalty(logprob, ref_logprob, "k2")
    if kl_penalty in ("low_var_kl", "k3"):
        # verl's own operation order, exp(r) - r - 1 with r = ref - lp (fastppo.kl_penalty evaluates k3 as
        # exp(-d) - 1 + d, which differs in the last bits): an elementwise formula, as cheap as the op.
        r = torch.clamp(ref_logprob - logprob, min=-20, max=20)
        return torch.clamp(torch.exp(r) - r - 1, min=-10, max=10).contiguous()
    raise NotImplementedError


def kl_penalty(logprob: Tensor, ref_logprob: Tensor, kl_penalty: str) -> Tensor:
    """KL estimate; a trailing ``+`` (e.g. ``k3+``) keeps the forward value and takes k2's gradient."""
    base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    forward = kl_penalty_forward(logprob, ref_logprob, base)
    if not kl_penalty.endswith("+") or kl_penalty in ("mse", "k2"):
        return forward
    backward = fastppo.kl_penalty(logprob, ref_logprob, "k2")
    return backward - backward.detach() + forward.detach()


# ------------------------------------------------------------------------------------------------ objective
_OBJECTIVE_LOSS_MODES = ("vanilla", "gspo", "sapo", "cispo")
_OTHER_LOSS_MODES = {
    "dppo_tv": "DPPO's divergence trust region (a validity mask built from the current probabilities) is not one of "
               "fastppo's policy terms",
    "dppo_kl": "DPPO's binary-KL trust region is not one of fastppo's policy terms",
    "gpg": "GPG's plain -A * logp has no importance ratio; fastppo's policy terms are PPO clip, CISPO and SAPO",
    "clip_cov": "Clip-Cov drops randomly chosen high-covariance tokens (a batch statistic and an RNG draw)",
    "kl_cov": "KL-Cov penalises the top-k covariance tokens of the batch",
    "geo_mean": "GMPO clips the log-ratio per token before a geometric mean and averages rows without aggregation",
    "dro": "DRO's quadratic log-ratio penalty is not one of fastppo's policy terms",
    "bypass_mode": "bypass mode computes rollout weights from the current policy inside the loss",
}
# verl's kl_loss_type names -> fastppo kl_kind. verl's "k3" is its clamped low_var_kl, not the plain k3.
_VERL_KL = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "low_var_kl",
            "k3": "low_var_kl"}


def _get(config: Any, name: str, default: Any = None) -> Any:
    """A field of an ActorConfig, a DictConfig or a plain mapping."""
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def _kl_kind(kind: str) -> str:
    base, plus = (kind[:-1], "+") if kind.endswith("+") else (kind, "")
    if base not in _VERL_KL:
        raise NotImplementedError(f"verl kl_loss_type {kind!r} has no fastppo estimator (verl raises for it too)")
    mapped = _VERL_KL[base]
    return mapped if mapped == "k2" else mapped + plus  # "k2+" is k2 in verl


def _aggregation(mode: str, info: Mapping[str, Any]) -> dict[str, Any]:
    """fastppo's ``agg`` / ``loss_normalizer`` / ``max_completion_length`` for verl's ``agg_loss(mode, **info)``:
    verl divides by the global token count (token-mean) or sequence count (seq-*) and multiplies by ``dp_size``
    (DDP averages the ranks' gradients), i.e. fastppo's normaliser is the count divided by ``dp_size``."""
    dp = int(info.get("dp_size") or 1)
    tokens, seqs, scale = info.get("batch_num_tokens"), info.get("global_batch_size"), info.get("loss_scale_factor")
    if mode == "token-sum":  # masked sum * dp_size: a token mean over 1 / dp_size "tokens"
        return {"agg": "token-mean", "loss_normalizer": 1.0 / dp}
    if mode not in AGG_MODES:
        raise ValueError(f"Invalid loss_agg_mode: {mode}")
    count = tokens if mode == "token-mean" else seqs
    if count is None and dp > 1:
        what = "batch_num_tokens" if mode == "token-mean" else "global_batch_size"
        raise ValueError(f"verl needs global_batch_info[{what!r}] when dp_size > 1")
    out: dict[str, Any] = {"agg": mode, "loss_normalizer": None if count is None else float(count) / dp}
    if mode == "seq-mean-token-sum-norm" and scale is not None:
        if float(scale).is_integer():
            out["max_completion_length"] = int(scale)
        elif count is not None:  # a fractional divisor folds into the normaliser (fastppo's divisor is an integer)
            out.update(loss_normalizer=out["loss_normalizer"] * float(scale), max_completion_length=1)
        else:
            raise NotImplementedError(f"loss_scale_factor={scale} is not an integer; fastppo can fold it only into an "
                                      "explicit global_batch_size")
    return out


def _policy_fields(config: Any, loss_mode: str, loss_agg_mode: str, info: Mapping[str, Any]) -> dict[str, Any]:
    if loss_mode in _OTHER_LOSS_MODES:
        raise NotImplementedError(f"verl loss_mode={loss_mode!r} is not representable: {_OTHER_LOSS_MODES[loss_mode]}")
    if loss_mode not in _OBJECTIVE_LOSS_MODES:
        raise ValueError(f"Unsupported loss mode: {loss_mode}")
    clip = _get(config, "clip_ratio", 0.2)
    low = _get(config, "clip_ratio_low")
    high = _get(config, "clip_ratio_high")
    low, high = float(clip if low is None else low), float(clip if high is None else high)
    if loss_mode == "vanilla":  # verl's vanilla always applies the dual clip
        out = {"policy_loss": "ppo", "clip_low": low, "clip_high": high,
               "dual_clip": float(_get(config, "clip_ratio_c", 3.0))}
    elif loss_mode == "gspo":  # GSPO-token: the sequence ratio's value, each token's own gradient
        out = {"policy_loss": "ppo", "importance_sampling_level": "sequence_token", "clip_low": low, "clip_high": high}
    elif loss_mode == "cispo":  # verl clamps to [1 - low, 1 + high]; low >= 1 leaves no lower bound, as in fastppo
        out = {"policy_loss": "cispo", "clip_low": low, "clip_high": high}
    else:  # sapo ignores loss_agg_mode: always seq-mean-token-mean
        out = {"policy_loss": "sapo", "sapo_tau_pos": float(_get(config, "tau_pos", 1.0)),
               "sapo_tau_neg": float(_get(config, "tau_neg", 1.05))}
        loss_agg_mode = "seq-mean-token-mean"
    out.update(_aggregation(loss_agg_mode, info))
    return out


def _rollout_fields(rc: Any) -> dict[str, Any]:
    """The decoupled rollout correction of verl's ``algorithm.rollout_correction`` (``RolloutCorrectionConfig``):
    ``rollout_is`` token/sequence with a threshold ``U`` (TIS: truncate at ``U``) or ``"L_U"`` (IcePop: weights
    outside ``[L, U]`` are 0)."""
    if _get(rc, "bypass_mode", False):
        raise NotImplementedError(_OTHER_LOSS_MODES["bypass_mode"])
    if _get(rc, "rollout_rs") is not None:
        raise NotImplementedError("rollout rejection sampling (rollout_rs) rewrites the response mask before the loss: "
                                  "pass verl's modified mask as fastppo's mask; it is no objective setting")
    level = _get(rc, "rollout_is")
    if level is None:
        return {}
    if level not in ("token", "sequence"):
        raise ValueError(f"Invalid rollout_is: {level}")
    if _get(rc, "rollout_is_batch_normalize", False):
        raise NotImplementedError("rollout_is_batch_normalize divides the weights by their batch mean: a batch "
                                  "statistic fastppo's rollout correction does not take")
    spec = _get(rc, "rollout_is_threshold", 2.0)
    if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
        raise TypeError(f"rollout_is_threshold must be a number or a 'U' / 'L_U' string, got {spec!r}")
    lower_s, sep, upper_s = str(spec).strip().rpartition("_")
    upper = float(upper_s)
    if sep:  # IcePop: a band; a weight outside it is 0
        return {"rollout_is_level": level, "rollout_is_mode": "mask", "rollout_is_min": float(lower_s),
                "rollout_is_max": upper}
    return {"rollout_is_level": level, "rollout_is_mode": "truncate", "rollout_is_min": None, "rollout_is_max": upper}


def objective_from_actor_config(
    config: Any,
    loss_mode: str | None = None,
    *,
    loss_agg_mode: str | None = None,
    global_batch_info: Mapping[str, Any] | None = None,
    rollout_correction: Any = None,
) -> PPOObjective:
    """The ``fastppo.PPOObjective`` of verl's actor loss (``verl.workers.utils.losses.ppo_loss``: the registered
    policy loss, minus ``entropy_coeff`` times the aggregated entropy, plus ``kl_loss_coef`` times the aggregated
    ``kl_penalty`` when ``use_kl_loss``), from an ``ActorConfig`` (or a DictConfig / mapping with its fields).

    - ``loss_mode`` (default ``config.policy_loss.loss_mode``): ``vanilla`` -> PPO clip with ``dual_clip =
      clip_ratio_c`` (verl's vanilla always dual-clips); ``gspo`` -> ``importance_sampling_level="sequence_token"``
      (GSPO-token); ``sapo`` -> SAPO with ``tau_pos``/``tau_neg`` and ``agg="seq-mean-token-mean"`` whatever
      ``loss_agg_mode`` says (as verl); ``cispo`` -> CISPO with ``[1 - clip_ratio_low, 1 + clip_ratio_high]``. Other
      registered modes raise ``NotImplementedError`` saying why.
    - ``loss_agg_mode`` (default ``config.loss_agg_mode``) with ``global_batch_info`` (default
      ``config.global_batch_info``: ``dp_size``, ``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``
      as ``ppo_loss`` fills it per micro-batch): ``loss_normalizer`` = ``batch_num_tokens / dp_size`` (token-mean) or
      ``global_batch_size / dp_size`` (seq-*), ``token-sum`` = a token mean with normaliser ``1 / dp_size``,
      ``loss_scale_factor`` -> ``max_completion_length`` of ``seq-mean-token-sum-norm``.
    - ``use_kl_loss`` / ``kl_loss_coef`` / ``kl_loss_type`` -> ``kl_coef`` / ``kl_kind`` (``low_var_kl`` and verl's
      ``k3`` are fastppo's ``low_var_kl``; ``kl``/``k1``, ``mse``/``k2``, ``abs``; each with ``+``);
      ``entropy_coeff`` -> ``entropy_coef``; both aggregated like the policy term (as verl).
    - ``rollout_correction``: the algorithm's ``RolloutCorrectionConfig`` (decoupled mode: weights from the old vs the
      rollout log-probs, passed to fastppo as ``rollout_logprobs``). ``rollout_is`` token/sequence; threshold ``U``
      -> truncate at ``U`` (TIS), ``"L_U"`` -> mask outside ``[L, U]`` (IcePop). Rejection sampling, batch
      normalisation and bypass mode raise ``NotImplementedError``.

    Documented differences: verl's ``seq-mean-token-mean`` divides each sequence by ``|y| + 1e-8`` (fastppo by
    ``|y|``: ~1e-8 relative); verl's GSPO clamps the combined log-ratio at ``max=10`` where fastppo clamps every
    log-ratio to +-20 (the same below a sequence ratio of e^10); verl's agg_loss is NaN on an all-masked
    micro-batch, fastppo rejects one. SAPO with a KL or entropy term and ``loss_agg_mode`` other than
    ``seq-mean-token-mean`` aggregates those terms differently from the policy term in verl: the KL case raises
    ``NotImplementedError``, the entropy case maps to ``entropy_agg`` when the aggregation is local.
    """
    mode = loss_mode if loss_mode is not None else _get(_get(config, "policy_loss", {}), "loss_mode", "vanilla")
    agg_mode = loss_agg_mode if loss_agg_mode is not None else _get(config, "loss_agg_mode", "token-mean")
    info = dict(_get(config, "global_batch_info", None) or {}) if global_batch_info is None else dict(global_batch_info)
    if _get(config, "loss_scale_factor") is not None and info.get("loss_scale_factor") is None:
        info["loss_scale_factor"] = _get(config, "loss_scale_factor")  # ppo_loss copies it into global_batch_info
    out = _policy_fields(config, mode, agg_mode, info)
    side = _aggregation(agg_mode, info)  # verl aggregates the entropy and the KL with loss_agg_mode
    same_agg = all(out.get(k) == v for k, v in side.items()) and out.get("max_completion_length") == side.get(
        "max_completion_length")
    kl_coef = float(_get(config, "kl_loss_coef", 0.001)) if _get(config, "use_kl_loss", False) else 0.0
    if kl_coef != 0.0:
        if not same_agg:
            raise NotImplementedError(f"verl aggregates SAPO's policy term with seq-mean-token-mean and its KL loss "
                                      f"with loss_agg_mode={agg_mode!r}; fastppo aggregates both alike")
        out.update(kl_coef=kl_coef, kl_kind=_kl_kind(str(_get(config, "kl_loss_type", "low_var_kl"))))
    entropy_coef = float(_get(config, "entropy_coeff", 0.0) or 0.0)
    if entropy_coef != 0.0:
        out["entropy_coef"] = entropy_coef
        if not same_agg:
            if side.get("loss_normalizer") is not None or side["agg"] != agg_mode:
                raise NotImplementedError(f"verl aggregates SAPO's entropy with loss_agg_mode={agg_mode!r} and "
                                          "global_batch_info; fastppo's entropy_agg takes a local aggregation only")
            out["entropy_agg"] = agg_mode
            if "max_completion_length" in side:  # the entropy's seq-mean-token-sum-norm divisor (unused by SAPO's)
                out["max_completion_length"] = side["max_completion_length"]
    if rollout_correction is not None:
        out.update(_rollout_fields(rollout_correction))
    return PPOObjective(**out)


def _objective_policy_loss(loss_mode: str, old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor,
                           response_mask: Tensor, loss_agg_mode: str, config: Any,
                           rollout_is_weights: Tensor | None) -> tuple[Tensor, dict[str, Any]]:
    """A registered verl policy loss computed by fastppo's reference objective: the objective of ``config`` for
    ``loss_mode`` (policy term only: verl's ppo_loss adds the entropy and KL itself), times verl's precomputed
    rollout weights, aggregated with ``config.global_batch_info``; verl's metrics."""
    if config is None:
        raise ValueError(f"verl's {loss_mode} policy loss needs the actor config")
    info = dict(_get(config, "global_batch_info", None) or {})
    obj = PPOObjective(**_policy_fields(config, loss_mode, loss_agg_mode, info))
    valid = response_mask.bool()
    zero = torch.zeros_like(log_prob)
    # Padding may hold anything (verl's no_padding_2_padding leaves zeros, other callers NaN): zeroed first, so
    # neither the value nor the gradient of a valid token sees it.
    lp = torch.where(valid, log_prob, zero)
    old = torch.where(valid, old_log_prob.to(lp.dtype), zero)
    adv = torch.where(valid, advantages.to(lp.dtype), zero)
    weight = None if rollout_is_weights is None else torch.where(valid, rollout_is_weights.to(lp.dtype), zero)
    terms = objective_terms(lp, zero, old, adv, valid, None, obj, is_weight=weight)
    pg_loss = reference_agg_loss(terms["pg"], valid, **objective_agg(obj))
    with torch.no_grad():
        log_ratio = (lp - old).detach()
        if loss_mode != "gspo":  # verl clamps the token log-ratio before its ppo_kl metric (gspo does not)
            log_ratio = log_ratio.clamp(-20.0, 20.0)
        clipfrac = 0.0 if loss_mode == "sapo" else masked_mean(terms["clipped"].float(), valid).item()
        metrics = {
            "actor/pg_clipfrac": clipfrac,
            "actor/ppo_kl": masked_mean(-log_ratio, valid).item(),
            "actor/pg_clipfrac_lower": 0.0,
        }
    return pg_loss, metrics


def compute_policy_loss_gspo(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """verl's registered ``"gspo"`` policy loss (GSPO-token) on fastppo's objective: ``(pg_loss, metrics)``."""
    return _objective_policy_loss("gspo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                                  rollout_is_weights)


def compute_policy_loss_sapo(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """verl's registered ``"sapo"`` policy loss on fastppo's objective (``loss_agg_mode`` is ignored: always
    seq-mean-token-mean, as verl): ``(pg_loss, metrics)``."""
    return _objective_policy_loss("sapo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                                  rollout_is_weights)


def compute_policy_loss_cispo(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """verl's registered ``"cispo"`` policy loss on fastppo's objective: ``(pg_loss, metrics)``."""
    return _objective_policy_loss("cispo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                                  rollout_is_weights)
