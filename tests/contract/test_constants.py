"""Each constant of the launcher contract is defined once in Python (fastppo/_contract.py) and once in C++
(csrc/common/contract.h); the two are compared here through both compiled bindings (the CPU module and the CUDA
binding built for the emulator), and every Python user takes the Python definition."""

from __future__ import annotations

import pytest
import torch

from fastppo import _contract, _native
from fastppo._native_launchers import NativeLaunchers, contract_mismatches


def _modules(request) -> dict[str, object]:
    mods = {"cpp": _native.module("cpp")}
    assert mods["cpp"] is not None, f"fastppo._C_cpu did not load: {_native.import_error('cpp')}"
    mods["cuda-emulated"] = request.getfixturevalue("emu_cuda_module")
    if _native.module("cuda") is not None:
        mods["cuda"] = _native.module("cuda")
    return mods


def test_bindings_expose_the_python_contract(request):
    for name, mod in _modules(request).items():
        assert contract_mismatches(mod) == [], name
        assert tuple(mod.TERMS) == _contract.PPO_TERMS and mod.NUM_TERMS == len(_contract.PPO_TERMS)
        assert tuple(mod.KL_KINDS) == _contract.KL_KINDS
        assert mod.LOG_RATIO_CLAMP == _contract.LOG_RATIO_CLAMP
        assert [getattr(torch, d) for d in mod.DTYPES] == list(_contract.DTYPES)


def test_a_module_of_another_contract_is_refused(monkeypatch):
    mod = _native.module("cpp")
    monkeypatch.setattr(mod, "KL_KINDS", ("k1", "k3", "k2", "abs"))
    with pytest.raises(ImportError, match="KL_KINDS.*rebuild"):
        NativeLaunchers("cpp", mod)


def test_python_users_share_one_definition():
    from fastppo import autograd, ops
    from fastppo.kernels import launchers as triton_launchers
    from fastppo.kernels import logprobs as triton_logprobs
    from fastppo.reference import kl, losses

    assert autograd.PPO_TERMS is _contract.PPO_TERMS and autograd.KL_KINDS is _contract.KL_KINDS
    assert triton_logprobs.PPO_TERMS is _contract.PPO_TERMS and triton_launchers.PPO_TERMS is _contract.PPO_TERMS
    assert triton_logprobs._RATIO_CLAMP.value == _contract.LOG_RATIO_CLAMP
    assert kl.KL_KINDS is _contract.KL_KINDS and losses.LOG_RATIO_CLAMP is _contract.LOG_RATIO_CLAMP
    assert ops.TERM is _contract.TERM and ops._KERNEL_DTYPES is _contract.DTYPES
