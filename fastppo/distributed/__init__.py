"""Distributed building blocks: vocabulary-parallel ops (collectives around the per-row softmax statistics) for
tensor-parallel LM heads, over logits or straight from hidden states. The engine's data-parallel runtime lives in
``fastppo.engine.distributed``."""

from __future__ import annotations

from fastppo.distributed.vocab_parallel import (
    vocab_parallel_logprobs_and_entropy,
    vocab_parallel_ppo_loss,
    vocab_start_of,
)
from fastppo.distributed.vocab_parallel_linear import (
    vocab_parallel_linear_logprobs_and_entropy,
    vocab_parallel_ppo_loss_from_hidden,
)

__all__ = [
    "vocab_parallel_linear_logprobs_and_entropy",
    "vocab_parallel_logprobs_and_entropy",
    "vocab_parallel_ppo_loss",
    "vocab_parallel_ppo_loss_from_hidden",
    "vocab_start_of",
]
