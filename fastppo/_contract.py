"""The launcher contract's constants, defined once for Python (floor 0: imports nothing from fastppo).

Every Python user (reference, kernels, launchers, autograd, ops) imports these names from here. The C++ and
CUDA kernels define the same facts once, in ``csrc/common/contract.h``; the compiled modules expose them
(``TERMS``, ``KL_KINDS``, ``LOG_RATIO_CLAMP``, ``DTYPES``) and ``fastppo._native_launchers`` refuses a module
whose values differ from these (``tests/contract/test_constants.py`` checks both bindings).
"""

from __future__ import annotations

import os

import torch

# Row order of the ``terms [NUM_TERMS, N]`` output of ``ppo_loss_forward`` (see fastppo/autograd.py).
PPO_TERMS = ("logp", "entropy", "lse", "pg", "ratio", "kl", "dpg", "dkl", "clipped", "dual_clipped", "loss")
NUM_TERMS = len(PPO_TERMS)
TERM = {name: i for i, name in enumerate(PPO_TERMS)}  # name -> row of ``terms``

# KL estimators of ``kl_penalty``; launchers take the index into this tuple (``kl_kind``).
KL_KINDS = ("k1", "k2", "k3", "abs")

# ratio = exp(clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)): exp(20) ~ 5e8 keeps fp32 finite, and the
# gradient passes only on the closed range (as torch.clamp's).
LOG_RATIO_CLAMP = 20.0

# Element types of the logits the kernels take, in the order of their dtype codes (the native modules receive
# the code next to each raw pointer).
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_CODES = {dtype: code for code, dtype in enumerate(DTYPES)}


def triton_interpret() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter (Triton kernels on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
