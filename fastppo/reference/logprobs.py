"""Reference log-softmax gather and entropy over vocabulary-sized logits.

Shapes: ``logits [..., V]``, ``labels [...]`` -> ``[...]``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(t: Tensor) -> torch.dtype:
    # bf16/fp16 are promoted so the reference accumulates like the kernels do; fp64 stays fp64 for tests.
    return torch.promote_types(t.dtype, torch.float32)


def token_logprobs(logits: Tensor, labels: Tensor, *, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / T)`` gathered at ``labels``. ``[..., V], [...] -> [...]``."""
    x = logits.to(_compute_dtype(logits)) / temperature
    lse = torch.logsumexp(x, dim=-1)
    return x.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1) - lse


def token_entropy(logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Entropy of ``softmax(logits / T)`` per row. ``[..., V] -> [...]``."""
    x = logits.to(_compute_dtype(logits)) / temperature
    logp = torch.log_softmax(x, dim=-1)
    p = logp.exp()
    # p log p -> 0 as p -> 0: entries with p == 0 (masked vocabulary, logp = -inf) contribute 0. The log is
    # replaced *before* the product, so that neither the value nor the gradient meets 0 * -inf = NaN (a where
    # after the product would zero the value but still send -inf * 0 = NaN back into the whole row).
    safe_logp = torch.where(p > 0, logp, torch.zeros_like(logp))
    return -(p * safe_logp).sum(-1)


def logprobs_and_entropy(logits: Tensor, labels: Tensor, *, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(token_logprobs, token_entropy)``. ``[..., V], [...] -> ([...], [...])``."""
    return (
        token_logprobs(logits, labels, temperature=temperature),
        token_entropy(logits, temperature=temperature),
    )
