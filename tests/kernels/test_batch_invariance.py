"""Batch invariance: a row's outputs are bitwise identical whatever else is in the batch and however the batch
is chunked. Holds because a row's reduction order depends only on V and the dtype (one program per row, block
size and warp count chosen from V), never on N; GAE's time chunk depends only on T.

On CPU this runs under the interpreter; with a GPU the ``gpu`` tests repeat it at a real vocabulary size.
"""

from __future__ import annotations

import pytest
import torch

import fastppo
from fastppo import PPOObjective
from fastppo.kernels import launchers as fk

F32 = torch.float32


def _rows(n: int, v: int, seed: int, dtype=F32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, v, generator=g) * 3).to(dtype).to(device)
    lab = torch.randint(0, v, (n,), generator=g).to(device)
    g_lp = torch.randn(n, generator=g).to(device)
    g_h = torch.randn(n, generator=g).to(device)
    return x, lab, g_lp, g_h


def _row_outputs(x: torch.Tensor, lab: torch.Tensor, g_lp: torch.Tensor, g_h: torch.Tensor, temperature: float):
    """(logp, entropy, lse, dlogits) from the launchers, for rows ``x [N, V]``."""
    x3 = x.unsqueeze(0)
    logp, ent, lse = fk.logprobs_forward(x3, lab, temperature, True)
    out = torch.empty_like(x3)
    fk.logprobs_backward(x3, lab, lse, ent, g_lp, g_h, temperature, out)
    return logp, ent, lse, out[0]


def _assert_rows_bitwise(whole, part, idx: torch.Tensor) -> None:
    for w, p in zip(whole, part, strict=True):
        assert torch.equal(w[idx], p), "a row's result changed with the batch around it"


def _check_invariance(n_target: int, v: int, n_other: int, dtype, device, temperature: float = 0.9) -> None:
    x, lab, g_lp, g_h = _rows(n_target, v, seed=1, dtype=dtype, device=device)
    alone = _row_outputs(x, lab, g_lp, g_h, temperature)
    # The same rows scattered inside a bigger batch of unrelated rows.
    ox, olab, og_lp, og_h = _rows(n_other, v, seed=2, dtype=dtype, device=device)
    ox[0] = ox[0] * 100  # extreme neighbours must not matter either
    pos = torch.randperm(n_other + n_target, generator=torch.Generator().manual_seed(3))[:n_target].sort().values
    keep = torch.ones(n_other + n_target, dtype=torch.bool)
    keep[pos] = False
    big = [torch.empty((n_other + n_target,) + t.shape[1:], dtype=t.dtype, device=device) for t in (x, lab, g_lp, g_h)]
    for dst, mine, other in zip(big, (x, lab, g_lp, g_h), (ox, olab, og_lp, og_h), strict=True):
        dst[pos.to(device)] = mine
        dst[keep.to(device)] = other
    mixed = _row_outputs(*big, temperature)
    for i in range(n_target):
        _assert_rows_bitwise(mixed, [t[i:i + 1] for t in alone], pos[i:i + 1].to(device))
    # Chunked one row at a time, and in uneven chunks.
    for bounds in ([(i, i + 1) for i in range(n_target)], [(0, 1), (1, n_target)]):
        parts = [_row_outputs(x[a:b], lab[a:b], g_lp[a:b], g_h[a:b], temperature) for a, b in bounds]
        joined = [torch.cat([p[k] for p in parts]) for k in range(4)]
        _assert_rows_bitwise(alone, joined, torch.arange(n_target, device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_rows_are_batch_invariant(dtype, device):
    _check_invariance(n_target=4, v=1271, n_other=9, dtype=dtype, device=device)


def test_public_ops_batch_invariant(device):
    x, lab, _, _ = _rows(12, 777, seed=4, device=device)
    lp_all, h_all = fastppo.logprobs_and_entropy(x, lab, backend="triton")
    for a, b in ((0, 1), (3, 12), (5, 7)):
        lp, h = fastppo.logprobs_and_entropy(x[a:b], lab[a:b], backend="triton")
        assert torch.equal(lp, lp_all[a:b]) and torch.equal(h, h_all[a:b])
    # [B, T] leading shapes: the same rows viewed as 3 x 4 tokens
    lp3, _ = fastppo.logprobs_and_entropy(x.view(3, 4, -1), lab.view(3, 4), backend="triton")
    assert torch.equal(lp3.reshape(-1), lp_all)


def test_ppo_terms_batch_invariant(device):
    x, lab, old, adv = _rows(10, 300, seed=5, device=device)
    old = old - 6.0
    mask = torch.ones(10, device=device)
    mask[::3] = 0
    args = (PPOObjective(temperature=1.0, clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_kind="k3", kl_coef=0.05,
                         entropy_coef=0.01),)
    whole = fk.ppo_loss_forward(x.unsqueeze(0), lab, old, adv, old + 0.1, mask, *args)
    for a, b in ((0, 1), (1, 10), (4, 6)):
        part = fk.ppo_loss_forward(x[a:b].unsqueeze(0), lab[a:b], old[a:b].contiguous(), adv[a:b].contiguous(),
                                   (old + 0.1)[a:b].contiguous(), mask[a:b].contiguous(), *args)
        assert torch.equal(part, whole[:, a:b])


def test_gae_rows_batch_invariant(device, small_chunk):
    g = torch.Generator().manual_seed(6)
    r, v = torch.randn(6, 40, generator=g).to(device), torch.randn(6, 40, generator=g).to(device)
    m = (torch.rand(6, 40, generator=g) > 0.3).to(device)
    boot = torch.randn(6, generator=g).to(device)
    adv, ret = fk.gae_forward(r, v, m, boot, 0.99, 0.95)
    for a, b in ((0, 1), (2, 6), (5, 6)):
        pa, pr = fk.gae_forward(r[a:b].contiguous(), v[a:b].contiguous(), m[a:b].contiguous(),
                                boot[a:b].contiguous(), 0.99, 0.95)
        assert torch.equal(pa, adv[a:b]) and torch.equal(pr, ret[a:b])


@pytest.mark.gpu
@pytest.mark.parametrize("v", [32000, 151936])
def test_gpu_real_vocab_batch_invariant(v):
    _check_invariance(n_target=8, v=v, n_other=2048, dtype=torch.bfloat16, device=torch.device("cuda"))
