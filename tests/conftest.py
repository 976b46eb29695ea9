"""Suite-wide setup.

Triton decides at ``@triton.jit`` time whether to interpret, so on machines without a GPU the interpreter is
switched on here, before any test module can import ``fastppo.kernels``. Auto dispatch never picks the
interpreter on its own (CPU tensors go to cpp or torch); tests ask for ``backend="triton"`` explicitly.

On a GPU, value checks would be device-side asserts, and the first bad-input test would end the CUDA context for
every test after it: the suite runs with ``FASTPPO_CHECKS=sync`` (a ``ValueError`` on every device), and
``tests/ops/test_validation.py`` checks the default device-side assert in a child process.

A test that needs a CUDA device says so with the one mark ``@pytest.mark.gpu`` (``pytest -m gpu`` selects by it);
it is skipped here, not by a ``skipif`` in each file, when there is no device.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTPPO_CHECKS", "sync")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def emu_cuda_module(tmp_path_factory):
    """csrc/cuda built for the CPU SIMT emulator (tests/csrc/cuda_emu), once per session: the contract suite and
    the emulator's own tests share it."""
    from tests.csrc import cuda_emu

    return cuda_emu.build(tmp_path_factory.mktemp("cuda_emu"))
