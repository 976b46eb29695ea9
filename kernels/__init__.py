"""Triton kernels and their launchers (installed as ``fastppo.kernels``).

Launchers follow the contract in ``fastppo/autograd.py`` and know nothing of autograd. They take torch tensors,
allocate outputs and launch; kernels are wrapped with ``@triton.jit`` at first launch (see ``_jit.py``), so
``TRITON_INTERPRET=1`` takes effect whenever it is set before the first call.
"""

if __name__ != "fastppo.kernels":
    # With the repo root on sys.path (pytest from a checkout), this folder would shadow the unrelated `kernels`
    # package of the Hugging Face hub that transformers/trl probe for; refuse to be imported under that name.
    raise ImportError("kernels/ is fastppo's Triton source folder; import it as fastppo.kernels")

import triton  # noqa: F401  (a missing Triton makes this package, and so the backend, unavailable)

from .gae import gae_forward, gae_whiten_forward
from .logprobs import PPO_TERMS, logprobs_backward, logprobs_forward, ppo_loss_forward

__all__ = [
    "PPO_TERMS",
    "gae_forward",
    "gae_whiten_forward",
    "logprobs_backward",
    "logprobs_forward",
    "ppo_loss_forward",
]
