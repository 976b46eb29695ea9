"""Suite-wide setup.

Triton decides at ``@triton.jit`` time whether to interpret, so on machines without a GPU the interpreter is
switched on here, before any test module can import ``fastppo.kernels``. Auto dispatch never picks the
interpreter on its own (CPU tensors go to cpp or torch); tests ask for ``backend="triton"`` explicitly.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
