"""Reference log-softmax gather and entropy over vocabulary-sized logits.

Shapes: ``logits [..., V]``, ``labels [...]`` -> ``[...]``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(t: Tensor) -> torch.dtype:
    # bf16/fp16 are promoted so the reference accumulates like the kernels do; fp64 stays fp64 for tests.
    return torch.promote_types(t.dtype, torch.float32)


def truncated(logits: Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """``logits / T`` with the tokens outside the top-k / top-p support set to ``-inf`` (``reference.sampling``'s
    filter, the distribution ``sample_tokens`` draws from), in the compute dtype; unchanged without a filter. The
    gradient reaches the kept logits only (the support is piecewise constant)."""
    x = logits.to(_compute_dtype(logits)) / temperature
    if top_k <= 0 and top_p >= 1.0:
        return x
    from fastppo.reference.sampling import support_threshold

    keep = x >= support_threshold(x.detach(), top_k, top_p).unsqueeze(-1)
    return torch.where(keep, x, torch.full_like(x, float("-inf")))


def token_logprobs(logits: Tensor, labels: Tensor, *, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0) -> Tensor:
    """``log_softmax(logits / T)`` gathered at ``labels``; with ``top_k`` / ``top_p`` over the truncated support (the
    sampler's, renormalised; ``-inf`` for a label outside it). ``[..., V], [...] -> [...]``."""
    x = truncated(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    lse = torch.logsumexp(x, dim=-1)
    return x.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1) - lse


def token_entropy(logits: Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Entropy of ``softmax(logits / T)`` per row (of the truncated distribution with ``top_k`` / ``top_p``).
    ``[..., V] -> [...]``."""
    x = truncated(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    logp = torch.log_softmax(x, dim=-1)
    p = logp.exp()
    # p log p -> 0 as p -> 0: entries with p == 0 (masked vocabulary, logp = -inf) contribute 0. The log is
    # replaced *before* the product, so that neither the value nor the gradient meets 0 * -inf = NaN (a where
    # after the product would zero the value but still send -inf * 0 = NaN back into the whole row).
    safe_logp = torch.where(p > 0, logp, torch.zeros_like(logp))
    return -(p * safe_logp).sum(-1)


def logprobs_and_entropy(logits: Tensor, labels: Tensor, *, temperature: float = 1.0, top_k: int = 0,
                         top_p: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(token_logprobs, token_entropy)``. ``[..., V], [...] -> ([...], [...])``."""
    return (
        token_logprobs(logits, labels, temperature=temperature, top_k=top_k, top_p=top_p),
        token_entropy(logits, temperature=temperature, top_k=top_k, top_p=top_p),
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
