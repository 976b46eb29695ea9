"""TRL's names and signatures, backed by fastppo's ops.

Covers TRL 1.x ``trl.trainer.utils`` (``selective_log_softmax``, ``entropy_from_logits``,
``selective_log_softmax_and_entropy``) and the v0.x ``trl.core`` helpers still used by PPO code
(``logprobs_from_logits(logits, labels, gather=True)``, ``masked_mean``, ``masked_var``, ``masked_whiten``),
plus a GAE with TRL's PPOTrainer conventions (``compute_gae``), and ``objective_from_grpo_config``: the
``fastppo.PPOObjective`` of a ``GRPOConfig`` (what ``GRPOTrainer._compute_loss`` minimises).

Conventions kept from TRL: ``masked_mean`` divides by the plain mask sum (no epsilon); ``masked_var`` is
Bessel-corrected when ``unbiased`` and raises on an all-zero mask; ``masked_whiten`` uses the unbiased variance
and ``rsqrt(var + 1e-8)``; ``row_mask`` rows return 0.

Output dtype as TRL's: the logits' dtype (TRL's PyTorch path), except where TRL >= 1.14 runs its own Triton
kernel (CUDA/XPU, one label per row, fp32/bf16/fp16 logits), which returns float32. Documented difference:
fastppo computes in fp32 and then casts, so bf16/fp16 results are the fp32 values rounded once, not bit-equal
to TRL's half-precision ``log_softmax`` arithmetic (and closer to the float64 truth).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

import fastppo
from fastppo.objective import PPOObjective

__all__ = [
    "GRPO_CONFIG_DEFAULTS",
    "compute_gae",
    "entropy_from_logits",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "objective_from_grpo_config",
    "selective_log_softmax",
    "selective_log_softmax_and_entropy",
]


def _row_mask_fill(x: Tensor, row_mask: Tensor | None) -> Tensor:
    return x if row_mask is None else x.masked_fill(row_mask == 0, 0.0)


_INDEX_DTYPES = (torch.int32, torch.int64)


def _trl_dtype(logits: Tensor, index: Tensor | None = None, row_mask: Tensor | None = None) -> torch.dtype:
    """The dtype TRL returns for these inputs: float32 where TRL >= 1.14 dispatches to its Triton kernel (the
    conditions of TRL's ``_supports_trl_loss_kernel``), else the logits' dtype."""
    kernel = (
        logits.device.type in ("cuda", "xpu")
        and logits.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and 1 <= logits.dim() <= 3
        and logits.stride(-1) == 1
        and (index is None or (index.shape == logits.shape[:-1] and index.dtype in _INDEX_DTYPES))
        and (row_mask is None or (index is not None and row_mask.dtype in (torch.bool, *_INDEX_DTYPES)))
    )
    return torch.float32 if kernel else logits.dtype


def selective_log_softmax(
    logits: Tensor, index: Tensor, temperature: float = 1.0, row_mask: Tensor | None = None
) -> Tensor:
    """``log_softmax(logits / temperature)`` gathered at ``index``.

    ``logits [..., V]``; ``index [...]`` (one label per row) or ``[..., K]`` (K labels per row, e.g. top-K);
    ``row_mask`` (same shape as ``index``): rows where it is 0 return 0.
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    out_dtype = _trl_dtype(logits, index, row_mask)
    if index.dim() == logits.dim() - 1:
        out = fastppo.token_logprobs(logits, index, temperature=temperature)
        return _row_mask_fill(out, row_mask).to(out_dtype)
    if index.dim() != logits.dim() or index.shape[:-1] != logits.shape[:-1]:
        raise ValueError(f"index must be [...] or [..., K] for logits {tuple(logits.shape)}, got {tuple(index.shape)}")
    # K labels per row: one fused pass gives logp of the first label, i.e. x0/T - lse; every other label is
    # x_k/T - lse = x_k/T - x0/T + logp0. Gradients are exact: d/dx = (e_k - softmax)/T.
    first = fastppo.token_logprobs(logits, index[..., 0], temperature=temperature)
    picked = torch.gather(logits, -1, index.long()).to(first.dtype) / temperature
    out = picked - picked[..., :1] + first.unsqueeze(-1)
    return _row_mask_fill(out, row_mask).to(out_dtype)


def entropy_from_logits(logits: Tensor, chunk_size: int = 128) -> Tensor:
    """Entropy of ``softmax(logits)`` per row, ``[..., V] -> [...]`` (``chunk_size`` is accepted for signature
    compatibility; fastppo's kernels never materialise the softmax, so there is nothing to chunk)."""
    return fastppo.token_entropy(logits).to(_trl_dtype(logits))


def selective_log_softmax_and_entropy(
    logits: Tensor,
    index: Tensor,
    entropy_requires_grad: bool = True,
    temperature: float = 1.0,
    row_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(selective_log_softmax, entropy)`` of ``logits / temperature`` in one pass. ``[..., V], [...]``."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    logp, ent = fastppo.logprobs_and_entropy(logits, index, temperature=temperature)
    if not entropy_requires_grad:
        ent = ent.detach()
    # TRL's kernel path returns both in float32; its PyTorch path returns them in the logits' dtype
    out_dtype = _trl_dtype(logits, index, row_mask)
    return _row_mask_fill(logp, row_mask).to(out_dtype), _row_mask_fill(ent, row_mask).to(out_dtype)


def logprobs_from_logits(logits: Tensor, labels: Tensor, gather: bool = True) -> Tensor:
    """TRL v0.x ``trl.core.logprobs_from_logits``: ``logits [B, T, V]``; with ``gather`` the log-prob of
    ``labels [B, T]`` -> ``[B, T]``, otherwise the full ``log_softmax`` over dim 2 -> ``[B, T, V]``."""
    if not gather:
        return torch.log_softmax(logits, dim=2)
    if logits.dim() != 3:
        raise ValueError(f"logprobs_from_logits takes logits [B, T, V], got {tuple(logits.shape)}")
    return fastppo.token_logprobs(logits, labels).to(logits.dtype)  # TRL v0.x returns the logits' dtype


def masked_mean(values: Tensor, mask: Tensor, axis: int | None = None) -> Tensor:
    """``sum(values * mask) / sum(mask)`` over ``axis`` (all elements when None); no epsilon, as TRL."""
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    return fastppo.masked_mean(values, mask)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the valid elements; Bessel-corrected when ``unbiased``. An all-zero mask raises."""
    if not unbiased:
        return fastppo.masked_var(values, mask, unbiased=False)
    n = mask.sum()
    if bool(n == 0):
        raise ValueError(
            "The sum of the mask is zero, which can happen when `mini_batch_size=1`;"
            "try increase the `mini_batch_size` or `gradient_accumulation_steps`"
        )
    if mask.is_floating_point():
        return fastppo.masked_var(values, mask, unbiased=True)
    # TRL divides the integer mask sums, which torch does in the default float32: keep that rounding.
    return fastppo.masked_var(values, mask, unbiased=False) * (n / (n - 1))


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """``(values - mean) * rsqrt(var + 1e-8)`` over the valid elements (unbiased var); mean re-added when not
    ``shift_mean``."""
    if mask.is_floating_point():
        return fastppo.masked_whiten(values, mask, shift_mean=shift_mean, eps=1e-8)
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def compute_gae(
    values: Tensor,
    rewards: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_advantages: bool = True,
) -> tuple[Tensor, Tensor]:
    """GAE as TRL's PPOTrainer computes it: ``(advantages, returns)`` ``[B, T]`` from ``values, rewards``
    whose padded positions are already 0 (TRL zeroes them), the classic recursion over every position
    (value after the end 0), ``returns = advantages + values``, then advantages whitened over ``mask``
    (unbiased var, ``rsqrt(var + 1e-8)``) and zeroed where ``mask`` is 0. Backed by ``fastppo.gae``.
    """
    with torch.no_grad():
        every = torch.ones(values.shape, dtype=torch.bool, device=values.device)
        adv, ret = fastppo.gae(rewards, values, every, gamma=float(gamma), lam=float(lam))
        if whiten_advantages:
            adv = masked_whiten(adv, mask)
            adv = torch.masked_fill(adv, ~mask.bool(), 0)
    return adv, ret


# ------------------------------------------------------------------------------------------- GRPO objective
# The GRPOConfig fields (TRL 1.16) that enter GRPOTrainer._compute_loss, with TRL's defaults. ``steps_per_generation``
# None means ``gradient_accumulation_steps`` (as GRPOConfig.__post_init__ resolves it).
GRPO_CONFIG_DEFAULTS: dict[str, Any] = {
    "loss_type": "dapo",
    "importance_sampling_level": "token",
    "epsilon": 0.2,
    "epsilon_high": None,
    "delta": None,
    "beta": 0.0,
    "use_bias_correction_kl": True,
    "sapo_temperature_pos": 1.0,
    "sapo_temperature_neg": 1.05,
    "max_completion_length": 512,
    "temperature": 1.0,
    "top_entropy_quantile": 1.0,
    "entropy_coef": 0.0,
    "use_adaptive_entropy": False,
    "off_policy_mask_threshold": None,
    "use_vllm": False,
    "vllm_importance_sampling_correction": True,
    "vllm_importance_sampling_mode": "sequence_mask",
    "vllm_importance_sampling_clip_min": None,
    "vllm_importance_sampling_clip_max": 3.0,
    "vllm_importance_sampling_cap": None,
    "gradient_accumulation_steps": 1,
    "steps_per_generation": None,
}

_PPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
_NOT_REPRESENTABLE = {
    "luspo": "LUSPO scales each sequence's loss by its length (a per-sequence token sum averaged over rows, with the "
             "KL and masks broadcast over padding): fastppo has no aggregation that weights sequences by length",
    "vespo": "VESPO's gamma weights phi(sum of the sequence's log-ratios) are a per-sequence function of the current "
             "policy that fastppo's policy terms (ppo, cispo, sapo) do not include",
}


def _grpo_fields(args: Any, fields: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(fields) - set(GRPO_CONFIG_DEFAULTS))
    if unknown:
        raise TypeError(f"objective_from_grpo_config() got unknown GRPOConfig field(s) {', '.join(map(repr, unknown))};"
                        f" the fields that enter the loss are {', '.join(GRPO_CONFIG_DEFAULTS)}")
    out = {}
    for name, default in GRPO_CONFIG_DEFAULTS.items():
        value = getattr(args, name, default) if args is not None else default
        out[name] = fields.get(name, value)
    if out["vllm_importance_sampling_cap"] is not None:  # deprecated alias: GRPOConfig.__post_init__ moves it too
        out["vllm_importance_sampling_clip_max"] = out["vllm_importance_sampling_cap"]
    return out


def _count(x: Any) -> float:
    return float(x.detach().sum()) if isinstance(x, Tensor) else float(x)


def objective_from_grpo_config(
    args: Any = None,
    /,
    *,
    num_items_in_batch: Any = None,
    num_processes: int = 1,
    gradient_accumulation_steps: int | None = None,
    completion_mask: Tensor | None = None,
    **fields: Any,
) -> PPOObjective:
    """The ``fastppo.PPOObjective`` that ``GRPOTrainer._compute_loss`` (TRL 1.16) minimises, from a ``GRPOConfig``
    (``args``, any object with its attributes) and/or its fields as keywords (keywords win; absent fields take
    TRL's defaults, ``GRPO_CONFIG_DEFAULTS``). Feed fastppo the tensors TRL's loss reads: ``old_logprobs`` =
    ``inputs["old_per_token_logps"]`` (None when TRL has none: on-policy), ``advantages`` broadcast to ``[B, T]``,
    ``ref_logprobs`` = ``inputs["ref_per_token_logps"]``, ``rollout_logprobs`` = ``inputs["sampling_per_token_logps"]``
    (vLLM importance sampling and the off-policy mask), ``mask`` = the completion mask (times ``tool_mask``).

    Mapping (TRL option -> objective field):

    - ``loss_type``: ``grpo``/``sapo`` -> ``agg="seq-mean-token-mean"``; ``bnpo`` -> ``token-mean`` over the
      micro-batch; ``dr_grpo`` -> ``seq-mean-token-sum-norm`` with ``max_completion_length``; ``dapo``/``cispo`` ->
      ``token-mean`` with ``loss_normalizer = max(num_items_in_batch, 1) / num_processes * GA / steps_per_generation``
      (``num_items_in_batch``: the generation batch's completion tokens over every process, as TRL passes it; None:
      this call's own tokens). ``grpo``/``bnpo``/``dapo``/``dr_grpo`` use the PPO clip, ``cispo`` CISPO, ``sapo`` SAPO.
    - ``epsilon``/``epsilon_high`` -> ``clip_low``/``clip_high``. For ``cispo``, TRL's ``epsilon_high`` is the
      absolute cap of the detached ratio (no lower bound): ``clip_low=1`` (none), ``clip_high=epsilon_high - 1``;
      a cap below 1 is not representable (``NotImplementedError``).
    - ``delta`` (INTELLECT-2's cap on the ratio) -> ``dual_clip=delta`` when ``delta > 1 + epsilon_high``: then both
      are the same function (for ``A > 0`` the clipped branch is already below ``delta``). ``delta <= 1 +
      epsilon_high`` also caps the ratio where ``A > 0``, which fastppo's dual clip does not:
      ``NotImplementedError``. TRL ignores ``delta`` for ``cispo``/``sapo``; so does this mapping.
    - ``importance_sampling_level`` ``token``/``sequence`` -> the same field (GSPO: gradient through the sequence
      mean, as TRL).
    - ``beta`` -> ``kl_coef`` with ``kl_kind="k3"`` (unclamped, as TRL); ``use_bias_correction_kl`` ->
      ``kl_ratio_weighted`` (the KL times the differentiable ratio of ``importance_sampling_level``).
    - ``sapo_temperature_pos``/``_neg`` -> ``sapo_tau_pos``/``_neg``; ``temperature`` -> ``temperature``.
    - ``use_vllm`` and ``vllm_importance_sampling_correction``: ``vllm_importance_sampling_mode``
      ``{token,sequence}_{truncate,mask}`` -> ``rollout_is_level`` / ``rollout_is_mode``, ``clip_min``/``clip_max``
      (or the deprecated ``cap``) -> ``rollout_is_min``/``rollout_is_max``. TRL computes the ratio from
      ``old - sampling`` log-probs before the loss; fastppo computes the same from ``old_logprobs`` and
      ``rollout_logprobs``.
    - ``off_policy_mask_threshold``, ``top_entropy_quantile`` -> the same fields.
    - ``entropy_coef`` -> ``entropy_coef / GA`` with ``entropy_agg="token-mean"``: TRL's entropy bonus is a plain
      token mean over this micro-batch (its kept tokens), divided by the gradient-accumulation steps, whatever
      ``loss_type`` normalises the policy term with.

    Normalisers: TRL divides ``grpo``/``sapo``/``dr_grpo`` by all ``B`` rows of the micro-batch (a fully padded row
    counts) and by ``GA``, ``bnpo`` by the micro-batch's tokens times ``GA``. ``completion_mask`` (this micro-batch's
    mask) makes those exact (``loss_normalizer`` from its rows / tokens). Without it, fastppo divides by its non-empty
    rows / tokens, which is TRL's number when ``GA == 1`` and no row is fully padded; ``GA > 1`` then raises.
    ``gradient_accumulation_steps``: TRL's ``current_gradient_accumulation_steps`` (default: the config's); TRL's
    eval mode (no accumulation) is ``gradient_accumulation_steps=1`` and ``steps_per_generation=1``.

    Not representable (``NotImplementedError``): ``loss_type`` ``luspo`` and ``vespo``, ``delta <= 1 +
    epsilon_high``, a CISPO cap below 1, ``use_adaptive_entropy`` (its coefficient changes every optimizer step:
    pass the current one as ``entropy_coef`` instead). Documented differences (never reached by ordinary inputs):
    fastppo clamps log-ratios to +-20 before ``exp`` (token ratios, the sequence mean, the vLLM importance log-ratio
    and its sequence sum), TRL does not (an overflow there is ``inf`` in TRL).
    """
    cfg = _grpo_fields(args, fields)
    loss_type = cfg["loss_type"]
    if loss_type in _NOT_REPRESENTABLE:
        raise NotImplementedError(f"TRL loss_type={loss_type!r} is not representable: {_NOT_REPRESENTABLE[loss_type]}")
    if loss_type not in (*_PPO_LOSS_TYPES, "cispo", "sapo"):
        raise ValueError(f"unknown TRL loss_type {loss_type!r}")
    level = cfg["importance_sampling_level"]
    if level not in ("token", "sequence"):
        raise ValueError(f"TRL's importance_sampling_level is 'token' or 'sequence', got {level!r}")
    if cfg["use_adaptive_entropy"]:
        raise NotImplementedError("use_adaptive_entropy changes the entropy coefficient every optimizer step; build "
                                  "the objective per step with entropy_coef set to the coefficient TRL applies")
    eps_low = float(cfg["epsilon"])
    eps_high = eps_low if cfg["epsilon_high"] is None else float(cfg["epsilon_high"])
    ga = int(cfg["gradient_accumulation_steps"] if gradient_accumulation_steps is None else gradient_accumulation_steps)
    steps = int(cfg["steps_per_generation"] or cfg["gradient_accumulation_steps"])

    out: dict[str, Any] = {"importance_sampling_level": level, "temperature": float(cfg["temperature"])}
    if loss_type == "cispo":
        if eps_high < 1.0:
            raise NotImplementedError(f"TRL's CISPO caps the detached ratio at epsilon_high={eps_high} < 1; fastppo's "
                                      "CISPO bound is 1 + clip_high >= 1 (TRL recommends epsilon_high=5)")
        out.update(policy_loss="cispo", clip_low=1.0, clip_high=eps_high - 1.0)
    elif loss_type == "sapo":
        out.update(policy_loss="sapo", sapo_tau_pos=float(cfg["sapo_temperature_pos"]),
                   sapo_tau_neg=float(cfg["sapo_temperature_neg"]))
    else:
        out.update(policy_loss="ppo", clip_low=eps_low, clip_high=eps_high)
        delta = cfg["delta"]
        if delta is not None:
            if not float(delta) > 1.0 + eps_high:
                raise NotImplementedError(
                    f"TRL's delta={delta} <= 1 + epsilon_high={1.0 + eps_high} also caps the ratio of positive-"
                    "advantage tokens; fastppo represents delta only as the dual clip (delta > 1 + epsilon_high)")
            out["dual_clip"] = float(delta)

    # Aggregation and its normaliser (TRL's train mode).
    rows = tokens = None
    if completion_mask is not None:
        rows, tokens = float(completion_mask.shape[0]), max(_count(completion_mask != 0), 1.0)
    if loss_type in ("grpo", "sapo", "dr_grpo", "bnpo"):
        out["agg"] = {"grpo": "seq-mean-token-mean", "sapo": "seq-mean-token-mean", "bnpo": "token-mean",
                      "dr_grpo": "seq-mean-token-sum-norm"}[loss_type]
        count = tokens if loss_type == "bnpo" else rows
        if count is not None:
            out["loss_normalizer"] = count * ga
        elif ga != 1:
            raise ValueError(f"TRL divides loss_type={loss_type!r} by the micro-batch's "
                             f"{'tokens' if loss_type == 'bnpo' else 'rows'} times gradient_accumulation_steps={ga}: "
                             "pass completion_mask")
        if loss_type == "dr_grpo":
            out["max_completion_length"] = int(cfg["max_completion_length"])
    else:  # dapo, cispo
        out["agg"] = "token-mean"
        items = num_items_in_batch if num_items_in_batch is not None else tokens
        if items is not None:
            out["loss_normalizer"] = max(_count(items), 1.0) / num_processes * ga / steps
        elif num_processes != 1 or ga != steps:
            raise ValueError("TRL's dapo/cispo normaliser needs num_items_in_batch (the generation batch's tokens)")

    beta = float(cfg["beta"])
    if beta != 0.0:
        out.update(kl_coef=beta, kl_kind="k3", kl_ratio_weighted=bool(cfg["use_bias_correction_kl"]))
    coef = float(cfg["entropy_coef"])
    if coef != 0.0:
        out.update(entropy_coef=coef / ga, entropy_agg="token-mean")
    if cfg["off_policy_mask_threshold"] is not None:
        out["off_policy_mask_threshold"] = float(cfg["off_policy_mask_threshold"])
    out["top_entropy_quantile"] = float(cfg["top_entropy_quantile"])

    if cfg["use_vllm"] and cfg["vllm_importance_sampling_correction"]:
        mode = cfg["vllm_importance_sampling_mode"]
        level_is, _, how = str(mode).partition("_")
        if level_is not in ("token", "sequence") or how not in ("truncate", "mask"):
            raise ValueError(f"unknown vllm_importance_sampling_mode {mode!r}")
        lo, hi = cfg["vllm_importance_sampling_clip_min"], cfg["vllm_importance_sampling_clip_max"]
        # A ratio is never negative: a lower bound of 0 bounds nothing (fastppo takes bounds > 0 or None).
        lo = None if lo is None or float(lo) <= 0.0 else float(lo)
        out.update(rollout_is_level=level_is, rollout_is_mode=how, rollout_is_min=lo,
                   rollout_is_max=None if hi is None else float(hi))
    return PPOObjective(**out)
