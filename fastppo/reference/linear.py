"""Reference fused LM head: the ops over hidden states and an LM-head weight, by materialising the logits.

Shapes: ``hidden [..., H]``, ``weight [V, H]``, ``bias [V]`` (optional), ``labels [...]``;
``logits = hidden @ weight.T + bias`` is ``[..., V]``. This is the executable spec (one matmul, then the logits
references); the chunked and kernel paths in ``fastppo.linear`` never build ``[N, V]`` at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastppo.reference.logprobs import logprobs_and_entropy, token_logprobs
from fastppo.reference.losses import agg_weights, ppo_loss_from_logits  # noqa: F401  (agg_weights: re-exported)


def lm_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``hidden [..., H] @ weight[V, H].T (+ bias [V]) -> [..., V]`` in the inputs' dtype (what an LM head returns)."""
    return torch.nn.functional.linear(hidden, weight, bias)


def linear_logprobs(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None, temperature: float = 1.0
) -> Tensor:
    """``token_logprobs(hidden @ weight.T + bias, labels)``. ``[..., H], [V, H], [...] -> [...]``."""
    return token_logprobs(lm_logits(hidden, weight, bias), labels, temperature=temperature)


def linear_logprobs_and_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """``(logprobs, entropy)`` of ``hidden @ weight.T + bias``. ``[..., H], [V, H], [...] -> ([...], [...])``."""
    return logprobs_and_entropy(lm_logits(hidden, weight, bias), labels, temperature=temperature)


def ppo_loss_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    bias: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``ppo_loss_from_logits(hidden @ weight.T + bias, ...)`` with the same keywords and ``(loss, stats)``."""
    return ppo_loss_from_logits(lm_logits(hidden, weight, bias), labels, old_logprobs, advantages, mask, **kwargs)
