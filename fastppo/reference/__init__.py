"""Plain-PyTorch executable specification of every fastppo op.

These functions define the numbers. They compute in the promoted dtype of their inputs (at least float32,
float64 when fed float64) so tests can evaluate them in float64. They are never edited to match a kernel.
"""

from fastppo.reference import sampling
from fastppo.reference.gae import gae
from fastppo.reference.kl import kl_penalty
from fastppo.reference.logprobs import logprobs_and_entropy, token_entropy, token_logprobs
from fastppo.reference.losses import (
    agg_loss,
    ppo_loss_from_logits,
    ppo_loss_from_logprobs,
    ppo_policy_loss,
    ppo_term_rows,
    ppo_token_terms,
    value_loss,
)
from fastppo.reference.stats import masked_mean, masked_var, masked_whiten

__all__ = [
    "agg_loss",
    "gae",
    "kl_penalty",
    "logprobs_and_entropy",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "ppo_loss_from_logits",
    "ppo_loss_from_logprobs",
    "ppo_policy_loss",
    "ppo_term_rows",
    "ppo_token_terms",
    "sampling",
    "token_entropy",
    "token_logprobs",
    "value_loss",
]
