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
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

import fastppo
from fastppo.reference.advantages import dense_group_ids, group_stats
from fastppo.reference.losses import ppo_token_terms

__all__ = [
    "agg_loss",
    "clip_by_value",
    "compute_gae_advantage_return",
    "compute_grpo_outcome_advantage",
    "compute_grpo_vectorized_outcome_advantage",
    "compute_policy_loss",
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
