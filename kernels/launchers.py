"""The Triton backend's launchers, the names ``fastppo._dispatch`` looks up (``fastppo.kernels.launchers``).

The Triton kernels live beside this file (installed as the namespace package ``fastppo.kernels``: the folder has no
``__init__.py`` so that it never shadows an installed top-level ``kernels``, see ``fastppo/_layout.py``). Launchers
follow the contract in ``fastppo/autograd.py`` and know nothing of autograd: they take torch tensors, allocate
outputs and launch. Kernels are wrapped with ``@triton.jit`` at first launch (see ``_jit.py``), so
``TRITON_INTERPRET=1`` takes effect whenever it is set before the first call.
"""

import triton  # noqa: F401  (a missing Triton makes this module, and so the backend, unavailable)

from .gae import gae_forward, gae_whiten_forward
from .linear import linear_backward, linear_forward
from .logprobs import PPO_TERMS, logprobs_backward, logprobs_forward, ppo_loss_forward
from .sampling import sample_forward

__all__ = [
    "PPO_TERMS",
    "gae_forward",
    "gae_whiten_forward",
    "linear_backward",
    "linear_forward",
    "logprobs_backward",
    "logprobs_forward",
    "ppo_loss_forward",
    "sample_forward",
]
