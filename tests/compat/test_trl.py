"""fastppo.compat.trl against the real TRL functions: values and gradients, fp32/fp64, padded masks."""

from __future__ import annotations

import pytest
import torch

from fastppo.compat import trl as ft
from tests.compat.conftest import load_trl_v0_core, peer_module
from tests.tolerances import assert_close, assert_no_worse_than_torch

tu = peer_module("trl.trainer.utils")

DTYPES = [torch.float32, torch.float64]


def _logits(shape=(3, 7), v=131, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, v, generator=g) * 2).to(dtype)
    labels = torch.randint(0, v, shape, generator=g)
    return logits, labels


def _value_and_grad(fn, x, *args, seed=1, **kw):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kw)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (out.double() * up).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax(dtype, temperature):
    logits, labels = _logits(dtype=dtype)
    mine, g_mine = _value_and_grad(ft.selective_log_softmax, logits, labels, temperature=temperature)
    peer, g_peer = _value_and_grad(tu.selective_log_softmax, logits, labels, temperature=temperature)
    assert mine.shape == peer.shape
    assert_close(mine, peer, dtype)
    assert_close(g_mine, g_peer, dtype, "grad")


@pytest.mark.parametrize("dtype", DTYPES)
def test_selective_log_softmax_topk_index_and_row_mask(dtype):
    logits, _ = _logits(shape=(4, 5), dtype=dtype, seed=2)
    index = torch.randint(0, logits.shape[-1], (4, 5, 3), generator=torch.Generator().manual_seed(3))
    row_mask = torch.rand(4, 5, 3, generator=torch.Generator().manual_seed(4)) > 0.3
    mine, g_mine = _value_and_grad(ft.selective_log_softmax, logits, index, temperature=0.9, row_mask=row_mask)
    peer, g_peer = _value_and_grad(tu.selective_log_softmax, logits, index, temperature=0.9, row_mask=row_mask)
    assert_close(mine, peer, dtype)
    assert_close(g_mine, g_peer, dtype, "grad")


ALL_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _dtype_cases(dtype, device="cpu"):
    logits, labels = _logits(shape=(2, 3), v=53, dtype=dtype, seed=12)
    logits, labels = logits.to(device), labels.to(device)
    topk = torch.randint(0, 53, (2, 3, 4), generator=torch.Generator().manual_seed(13)).to(device)
    return [
        ("selective_log_softmax", (logits, labels)),
        ("selective_log_softmax", (logits, topk)),
        ("entropy_from_logits", (logits,)),
        ("selective_log_softmax_and_entropy", (logits, labels)),
    ]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_outputs_have_trls_dtype(dtype):
    # TRL returns the logits' dtype on its PyTorch path: the adapters compute in fp32 and cast to it
    for name, args in _dtype_cases(dtype):
        mine, peer = getattr(ft, name)(*args), getattr(tu, name)(*args)
        for a, b in zip(mine if isinstance(mine, tuple) else (mine,), peer if isinstance(peer, tuple) else (peer,),
                        strict=True):
            assert a.dtype == b.dtype == dtype, name
            # a documented difference: half precision is the fp32 result rounded, not TRL's half arithmetic
            torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=0.05 if dtype.itemsize == 2 else 1e-5)
    core = load_trl_v0_core()
    logits, labels = _logits(dtype=dtype, seed=14)
    assert ft.logprobs_from_logits(logits, labels).dtype == core.logprobs_from_logits(logits, labels).dtype


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_outputs_have_trls_dtype_on_cuda(dtype):
    # on CUDA, TRL >= 1.14 runs its Triton kernel for one label per row, which returns float32
    for name, args in _dtype_cases(dtype, "cuda"):
        mine, peer = getattr(ft, name)(*args), getattr(tu, name)(*args)
        mine, peer = (x if isinstance(x, tuple) else (x,) for x in (mine, peer))
        assert [a.dtype for a in mine] == [b.dtype for b in peer], name


def test_selective_log_softmax_bf16_no_worse_than_trl():
    logits, labels = _logits(shape=(41,), v=1271, seed=5)
    x = logits.bfloat16()
    exact = tu.selective_log_softmax(x.double(), labels)
    assert_no_worse_than_torch(ft.selective_log_softmax(x, labels), exact, tu.selective_log_softmax(x, labels))


@pytest.mark.parametrize("dtype", DTYPES)
def test_entropy_from_logits(dtype):
    logits, _ = _logits(shape=(2, 3, 5), dtype=dtype, seed=6)
    mine, g_mine = _value_and_grad(ft.entropy_from_logits, logits)
    peer, g_peer = _value_and_grad(tu.entropy_from_logits, logits, chunk_size=4)
    assert_close(mine, peer, dtype)
    assert_close(g_mine, g_peer, dtype, "grad")


@pytest.mark.parametrize("dtype", DTYPES)
def test_selective_log_softmax_and_entropy(dtype):
    logits, labels = _logits(dtype=dtype, seed=7)
    row_mask = torch.rand(labels.shape, generator=torch.Generator().manual_seed(8)) > 0.3

    def run(fn):
        x = logits.clone().requires_grad_(True)
        lp, h = fn(x, labels, temperature=1.3, row_mask=row_mask)
        g = torch.Generator().manual_seed(9)
        ((lp.double() * torch.randn(lp.shape, generator=g, dtype=torch.float64)).sum()
         + (h.double() * torch.randn(h.shape, generator=g, dtype=torch.float64)).sum()).backward()
        return lp.detach(), h.detach(), x.grad

    for a, b, kind in zip(run(ft.selective_log_softmax_and_entropy), run(tu.selective_log_softmax_and_entropy),
                          ("value", "value", "grad"), strict=True):
        assert_close(a, b, dtype, kind)
    _, h = ft.selective_log_softmax_and_entropy(logits.clone().requires_grad_(True), labels,
                                                entropy_requires_grad=False)
    assert not h.requires_grad


# ------------------------------------------------------------------------------ TRL v0.x (trl.core) helpers
@pytest.mark.parametrize("dtype", DTYPES)
def test_v0_logprobs_from_logits(dtype):
    core = load_trl_v0_core()
    logits, labels = _logits(dtype=dtype, seed=10)
    mine, g_mine = _value_and_grad(ft.logprobs_from_logits, logits, labels)
    peer, g_peer = _value_and_grad(core.logprobs_from_logits, logits, labels)
    assert_close(mine, peer, dtype)
    assert_close(g_mine, g_peer, dtype, "grad")
    assert_close(ft.logprobs_from_logits(logits, labels, gather=False),
                 core.logprobs_from_logits(logits, labels, gather=False), dtype)


def _masked(dtype, seed=11, shape=(5, 9)):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype)
    mask = torch.rand(shape, generator=g) > 0.35
    mask[:, 0] = True
    mask[2] = False  # a fully padded row
    return x, mask.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bool_mask", [False, True])
def test_v0_masked_mean_var_whiten(dtype, bool_mask):
    core = load_trl_v0_core()
    x, mask = _masked(dtype)
    mask = mask.bool() if bool_mask else mask
    assert_close(ft.masked_mean(x, mask), core.masked_mean(x, mask), dtype)
    torch.testing.assert_close(ft.masked_mean(x, mask, axis=1), core.masked_mean(x, mask, axis=1), equal_nan=True)
    for unbiased in (True, False):
        assert_close(ft.masked_var(x, mask, unbiased), core.masked_var(x, mask, unbiased), dtype)
    for shift in (True, False):
        mine, g_mine = _value_and_grad(ft.masked_whiten, x, mask, shift_mean=shift)
        peer, g_peer = _value_and_grad(core.masked_whiten, x, mask, shift_mean=shift)
        assert_close(mine, peer, dtype)
        assert_close(g_mine, g_peer, dtype, "grad")
    with pytest.raises(ValueError, match="sum of the mask is zero"):
        ft.masked_var(x, torch.zeros_like(mask))


@pytest.mark.parametrize("dtype", DTYPES)
def test_compute_gae_matches_trl_ppo_trainer_loop(dtype):
    # TRL's PPOTrainer inlines its GAE in train(); this is that loop, step for step, on zero-padded inputs.
    core = load_trl_v0_core()
    g = torch.Generator().manual_seed(12)
    B, T = 4, 11
    lengths = torch.tensor([11, 6, 1, 8])
    pad = torch.arange(T)[None, :] >= lengths[:, None]
    values = torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype).masked_fill(pad, 0)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype).masked_fill(pad, 0)
    gamma, lam = 0.99, 0.95
    lastgaelam, rev = 0, []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        rev.append(lastgaelam)
    adv = torch.stack(rev[::-1], axis=1)
    ret = adv + values
    adv = torch.masked_fill(core.masked_whiten(adv, ~pad), pad, 0)
    mine_adv, mine_ret = ft.compute_gae(values, rewards, ~pad, gamma, lam)
    assert_close(mine_adv, adv, dtype)
    assert_close(mine_ret, ret, dtype)
