"""Kernel tests: run the Triton kernels under the interpreter on machines without a GPU.

``TRITON_INTERPRET`` is set here, at conftest import, before any test module of this directory imports
``fastppo.kernels``. The kernels are also wrapped with ``@triton.jit`` at first launch rather than at import
(``kernels/_jit.py``), so the variable takes effect even when another test directory imported fastppo first.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests put their tensors: the GPU when there is one, else the CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def small_block(monkeypatch: pytest.MonkeyPatch):
    """Force 256-wide vocabulary chunks so small V takes many chunks (online rescaling, all -inf chunks)."""
    import fastppo.kernels.logprobs as kl

    monkeypatch.setattr(kl, "BLOCK_OVERRIDE", 256)
    return 256


@pytest.fixture
def small_chunk(monkeypatch: pytest.MonkeyPatch):
    """Force 16-step GAE time chunks so short sequences span many chunks (cross-chunk carries)."""
    import fastppo.kernels.gae as kg

    monkeypatch.setattr(kg, "CHUNK_OVERRIDE", 16)
    return 16
