"""TRL's names and signatures, backed by fastppo's ops.

Covers TRL 1.x ``trl.trainer.utils`` (``selective_log_softmax``, ``entropy_from_logits``,
``selective_log_softmax_and_entropy``) and the v0.x ``trl.core`` helpers still used by PPO code
(``logprobs_from_logits(logits, labels, gather=True)``, ``masked_mean``, ``masked_var``, ``masked_whiten``),
plus a GAE with TRL's PPOTrainer conventions (``compute_gae``).

Conventions kept from TRL: ``masked_mean`` divides by the plain mask sum (no epsilon); ``masked_var`` is
Bessel-corrected when ``unbiased`` and raises on an all-zero mask; ``masked_whiten`` uses the unbiased variance
and ``rsqrt(var + 1e-8)``; ``row_mask`` rows return 0.

Output dtype as TRL's: the logits' dtype (TRL's PyTorch path), except where TRL >= 1.14 runs its own Triton
kernel (CUDA/XPU, one label per row, fp32/bf16/fp16 logits), which returns float32. Documented difference:
fastppo computes in fp32 and then casts, so bf16/fp16 results are the fp32 values rounded once, not bit-equal
to TRL's half-precision ``log_softmax`` arithmetic (and closer to the float64 truth).
"""

from __future__ import annotations

import torch
from torch import Tensor

import fastppo

__all__ = [
    "compute_gae",
    "entropy_from_logits",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
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
