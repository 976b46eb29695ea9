"""One launcher contract (fastppo/_contract.py), checked identically by every kernel backend's launchers: what
they accept (3-D logits with unit vocabulary stride, exact-dtype contiguous per-row vectors on the logits'
device) and the error for anything else. They convert nothing; fastppo/ops.py is the one place that normalises
user inputs."""

from __future__ import annotations

import pytest
import torch

from fastppo import PPOObjective
from tests.helpers import random_logits

F32 = torch.float32


def _rows(device):
    x, lab = random_logits((2, 3), 37, seed=1)
    return x.to(device), lab.reshape(-1).to(device)


def _launchers(backend):
    return backend.launchers


def test_logprobs_launchers_accept_exactly_the_contract(backend):
    L, dev = _launchers(backend), backend.device
    x, lab = _rows(dev)
    logp, ent, lse = L.logprobs_forward(x, lab, 1.0, True)
    assert logp.shape == ent.shape == lse.shape == (6,) and logp.dtype == F32
    sliced = torch.randn(2, 4, 37, device=dev)[:, 1:]  # any strides on B and T
    L.logprobs_forward(sliced, lab, 1.0, False)
    bad = {
        "2-D logits": (lambda: L.logprobs_forward(x.view(6, 37), lab, 1.0, True), ValueError, r"\[B, T, V\]"),
        # the torch backend's launchers take float64 logits too (the reference path of float64 inputs)
        **({} if backend.name == "torch" else {
            "float64 logits": (lambda: L.logprobs_forward(x.double(), lab, 1.0, True), TypeError, "fp32/bf16/fp16")}),
        "vocab stride 2": (lambda: L.logprobs_forward(torch.randn(2, 3, 74, device=dev)[..., ::2], lab, 1.0, True),
                           ValueError, "unit stride"),
        "int32 labels": (lambda: L.logprobs_forward(x, lab.int(), 1.0, True), ValueError, "labels.*int64"),
        "[B, T] labels": (lambda: L.logprobs_forward(x, lab.view(2, 3), 1.0, True), ValueError, "labels"),
        "strided labels": (lambda: L.logprobs_forward(x, torch.zeros(12, dtype=torch.int64, device=dev)[::2], 1.0,
                                                      True), ValueError, "labels.*non-contiguous"),
        "short labels": (lambda: L.logprobs_forward(x, lab[:5], 1.0, True), ValueError, "labels"),
        "float64 lse": (lambda: L.logprobs_backward(x, lab, lse.double(), ent, lse, None, 1.0, torch.empty_like(x)),
                        ValueError, "lse.*float32"),
        "bf16 out": (lambda: L.logprobs_backward(x, lab, lse, ent, lse, None, 1.0, x.bfloat16()), ValueError, "out"),
        "grad_entropy without entropy": (lambda: L.logprobs_backward(x, lab, lse, None, None, lse, 1.0,
                                                                     torch.empty_like(x)), ValueError, "entropy"),
    }
    for what, (call, exc, match) in bad.items():
        with pytest.raises(exc, match=match):
            call()
            pytest.fail(f"{backend.id} accepted {what}")


def test_ppo_launcher_accepts_exactly_the_contract(backend):
    L, dev = _launchers(backend), backend.device
    x, lab = _rows(dev)
    v = torch.randn(6, device=dev)
    ones = torch.ones(6, device=dev)
    obj = PPOObjective()
    terms = L.ppo_loss_forward(x, lab, v, v, None, ones, obj)
    assert terms.shape[1] == 6 and terms.dtype == F32
    with pytest.raises(ValueError, match="mask.*float32"):
        L.ppo_loss_forward(x, lab, v, v, None, ones.bool(), obj)
    with pytest.raises(ValueError, match="adv.*float32"):
        L.ppo_loss_forward(x, lab, v, v.half(), None, ones, obj)
    with pytest.raises(ValueError, match="ref_logp.*float32"):
        L.ppo_loss_forward(x, lab, v, v, v[:5], ones, obj)


def test_gae_launcher_accepts_exactly_the_contract(backend):
    if not backend.kernel:
        pytest.skip("the torch backend runs GAE as the reference itself (no GAE launcher)")
    L, dev = _launchers(backend), backend.device
    r, val = torch.randn(3, 8, device=dev), torch.randn(3, 8, device=dev)
    m = torch.ones(3, 8, dtype=torch.bool, device=dev)
    adv, ret = L.gae_forward(r, val, m, None, 0.99, 0.95)
    assert adv.shape == ret.shape == (3, 8) and adv.dtype == F32
    bad = {
        "1-D rewards": ((r.view(-1), val.view(-1), m.view(-1), None), "\\[B, T\\]"),
        "float mask": ((r, val, m.float(), None), "mask.*bool"),
        "strided values": ((r, torch.randn(3, 16, device=dev)[:, ::2], m, None), "values.*non-contiguous"),
        "float64 rewards": ((r.double(), val, m, None), "rewards.*float32"),
        "[B, 1] bootstrap": ((r, val, m, torch.zeros(3, 1, device=dev)), "bootstrap"),
    }
    for what, (args, match) in bad.items():
        with pytest.raises(ValueError, match=match):
            L.gae_forward(*args, 0.99, 0.95)
            pytest.fail(f"{backend.id} accepted {what}")
