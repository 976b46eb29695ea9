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


def row_statistics(logits: Tensor, labels: Tensor, *, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """``(logp, entropy, lse)`` per row of ``logits [..., V]`` (``lse = logsumexp(logits / T)``): what the kernels'
    ``logprobs_forward`` returns. ``[..., V], [...] -> ([...], [...], [...])``."""
    x = logits.to(_compute_dtype(logits)) / temperature
    lse = torch.logsumexp(x, dim=-1)
    logp_all = x - lse.unsqueeze(-1)
    p = logp_all.exp()
    entropy = -torch.where(p > 0, p * logp_all, torch.zeros_like(p)).sum(-1)
    return logp_all.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1), entropy, lse


def logprobs_entropy_grad(logits: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor | None,
                          grad_logp: Tensor | None, grad_entropy: Tensor | None, *, temperature: float = 1.0) -> Tensor:
    """d(sum(grad_logp * logp + grad_entropy * entropy))/d(logits) ``[..., V]`` from the forward's ``lse`` and
    ``entropy`` (None grads: zero): ``dx_j = [g_lp (1[j = label] - p_j) - g_H p_j (log p_j + H)] / T``, what the
    kernels' ``logprobs_backward`` writes. Rows with no upstream gradient get exact zeros (a masked token's saved
    statistics may be anything)."""
    x = logits.to(_compute_dtype(logits)) / temperature
    logp_all = x - lse.to(x.dtype).unsqueeze(-1)
    p = logp_all.exp()
    dx = torch.zeros_like(x)
    active = torch.zeros(lse.shape, dtype=torch.bool, device=lse.device)
    if grad_logp is not None:
        g = grad_logp.to(x.dtype).unsqueeze(-1)
        dx = -g * p
        dx = dx.scatter_add(-1, labels.long().unsqueeze(-1), g)
        active |= grad_logp != 0
    if grad_entropy is not None:
        g = grad_entropy.to(x.dtype).unsqueeze(-1)
        dx = dx - g * torch.where(p > 0, p * (logp_all + entropy.to(x.dtype).unsqueeze(-1)), torch.zeros_like(p))
        active |= grad_entropy != 0
    return torch.where(active.unsqueeze(-1), dx / temperature, torch.zeros_like(dx))
