"""fastppo: kernel-accelerated PPO for RLHF of large language models.

Public ops live in ``fastppo.ops`` and are re-exported here; ``fastppo.backends()`` reports which backends
are usable on this machine and why a missing one is missing.
"""

from __future__ import annotations

# isort: off
import fastppo._layout  # noqa: F401  (first: lets an editable install find fastppo.kernels/.benchmarks, see _layout)

# isort: on

from fastppo._dispatch import BackendInfo, BackendUnavailableError
from fastppo._dispatch import backends as _backends
from fastppo.linear import linear_logprobs, linear_logprobs_and_entropy, ppo_loss_from_hidden
from fastppo.objective import PPOObjective
from fastppo.ops import (
    gae,
    grpo_advantages,
    kl_penalty,
    logprobs_and_entropy,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_loss_from_logits,
    ppo_policy_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    sample_tokens,
    token_entropy,
    token_logprobs,
    value_loss,
)

__version__ = "0.1.0"


def backends() -> dict[str, BackendInfo]:
    """``{name: BackendInfo(name, available, reason)}`` for torch, triton, triton-interpret, cpp and cuda.

    ``triton-interpret`` is the Triton interpreter mode (``TRITON_INTERPRET=1``: ``backend="triton"`` on CPU).
    """
    return _backends()


__all__ = [
    "BackendInfo",
    "PPOObjective",
    "BackendUnavailableError",
    "backends",
    "gae",
    "grpo_advantages",
    "kl_penalty",
    "linear_logprobs",
    "linear_logprobs_and_entropy",
    "logprobs_and_entropy",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "ppo_loss_from_hidden",
    "ppo_loss_from_logits",
    "ppo_policy_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "sample_tokens",
    "token_entropy",
    "token_logprobs",
    "value_loss",
]
