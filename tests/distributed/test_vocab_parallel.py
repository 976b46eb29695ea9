"""Vocabulary-parallel log-probs / entropy / PPO loss in 2 and 3 real gloo processes against the single-process
float64 reference on the concatenated logits: values and gradients (random upstream gradient), uneven vocabulary
splits, temperature, masked (-inf) vocabulary entries, a rank whose whole slice is -inf, bad labels, and the fused
LM head's hidden-state gradient summed over the group or left as each rank's share."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fastppo.distributed import (
    vocab_parallel_linear_logprobs_and_entropy,
    vocab_parallel_logprobs_and_entropy,
    vocab_parallel_ppo_loss,
    vocab_parallel_ppo_loss_from_hidden,
)
from fastppo.reference.linear import linear_logprobs_and_entropy, ppo_loss_from_hidden
from fastppo.reference.logprobs import logprobs_and_entropy
from fastppo.reference.losses import ppo_loss_from_logits
from tests.distributed.spawn import run_world
from tests.tolerances import assert_close, assert_no_worse_than_torch

V_GLOBAL = 1271  # divides evenly by neither 2 nor 3


def _shard(full: torch.Tensor, sizes: list[int], rank: int) -> tuple[torch.Tensor, int]:
    start = sum(sizes[:rank])
    return full[..., start: start + sizes[rank]], start


def _check_logprobs(rank: int, group, dtype: torch.dtype, sizes: list[int], temperature: float,
                    masked: bool, pass_start: bool) -> None:
    g = torch.Generator().manual_seed(1234)
    n = 41
    full = (torch.randn(n, V_GLOBAL, generator=g, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, V_GLOBAL, (n,), generator=g)
    if masked:
        # masked vocabulary entries, and rows where one whole rank's slice is -inf (its local max is -inf)
        drop = torch.rand(n, V_GLOBAL, generator=g) < 0.3
        drop[:5, : sizes[0]] = True
        drop[torch.arange(n), labels] = False
        full = full.masked_fill(drop, float("-inf"))
    up_lp = torch.randn(n, generator=g, dtype=torch.float64)
    up_h = torch.randn(n, generator=g, dtype=torch.float64)

    # the reference's autograd turns -inf logits into NaN gradients; -1e4 has the same softmax (exp underflows
    # to exactly 0 in float64) and a finite gradient of 0 there
    ref_in = full.detach().to(torch.float64).nan_to_num(neginf=-1e4).requires_grad_(True)
    ref_lp, ref_h = logprobs_and_entropy(ref_in, labels, temperature=temperature)
    (ref_lp * up_lp + ref_h * up_h).sum().backward()

    local, start = _shard(full, sizes, rank)
    local = local.detach().clone().requires_grad_(True)
    lp, h = vocab_parallel_logprobs_and_entropy(local, labels, group, temperature=temperature,
                                                vocab_start=start if pass_start else None)
    assert lp.dtype == h.dtype == torch.promote_types(dtype, torch.float32)
    (lp.double() * up_lp + h.double() * up_h).sum().backward()
    assert_close(lp, ref_lp, dtype)
    assert_close(h, ref_h, dtype)
    ref_grad, _ = _shard(ref_in.grad, sizes, rank)
    assert_close(local.grad, ref_grad, dtype, "grad")


def _check_ppo_loss(rank: int, group, sizes: list[int], agg: str) -> None:
    g = torch.Generator().manual_seed(99)
    b, t = 3, 7
    full = torch.randn(b, t, V_GLOBAL, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V_GLOBAL, (b, t), generator=g)
    old = torch.log_softmax(full, -1).gather(-1, labels[..., None]).squeeze(-1) + 0.3 * torch.randn(b, t, generator=g,
                                                                                               dtype=torch.float64)
    ref_lp = old + 0.1 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = (torch.rand(b, t, generator=g) < 0.8).double()
    mask[:, 0] = 1
    kw = dict(ref_logprobs=ref_lp, kl_coef=0.05, kl_kind="k3", entropy_coef=0.01, clip_low=0.2, clip_high=0.28,
              dual_clip=3.0, temperature=0.9, agg=agg)
    ref_in = full.clone().requires_grad_(True)
    ref_loss, ref_stats = ppo_loss_from_logits(ref_in, labels, old, adv, mask, **kw)
    ref_loss.backward()

    local, _ = _shard(full, sizes, rank)
    local = local.float().detach().clone().requires_grad_(True)
    loss, stats = vocab_parallel_ppo_loss(local, labels, old.float(), adv.float(), mask, group, **kw)
    loss.backward()
    assert_close(loss, ref_loss, torch.float32)
    for k in ("pg_loss", "kl", "entropy", "clipfrac", "approx_kl", "ratio_mean", "ratio_max"):
        assert_close(stats[k], ref_stats[k], torch.float32)
    ref_grad, _ = _shard(ref_in.grad, sizes, rank)
    assert_close(local.grad, ref_grad, torch.float32, "grad")


def _check_linear(rank: int, group, sizes: list[int], dtype: torch.dtype, bias: bool) -> None:
    """The fused-LM-head variants: hidden [N, H] and each rank's rows of the weight, chunked (chunk 7 over 41 rows)."""
    g = torch.Generator().manual_seed(5)
    n, hdim = 41, 24
    h = torch.randn(n, hdim, generator=g, dtype=torch.float64)
    w = torch.randn(V_GLOBAL, hdim, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(V_GLOBAL, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, V_GLOBAL, (n,), generator=g)
    # the reference sees the same rounded inputs as the op under test
    h, w = h.to(dtype).double(), w.to(dtype).double()
    b = b.to(dtype).double() if bias else None
    up_lp, up_h = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    hr, wr = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    br = b.clone().requires_grad_(True) if bias else None
    ref_lp, ref_h = linear_logprobs_and_entropy(hr, wr, labels, bias=br, temperature=0.8)
    (ref_lp * up_lp + ref_h * up_h).sum().backward()

    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    hl = h.to(dtype).clone().requires_grad_(True)
    wl = w[rows].to(dtype).clone().requires_grad_(True)
    bl = b[rows].to(dtype).clone().requires_grad_(True) if bias else None
    lp, ent = vocab_parallel_linear_logprobs_and_entropy(hl, wl, labels, group, local_bias=bl, temperature=0.8,
                                                         chunk_size=7)
    (lp.double() * up_lp + ent.double() * up_h).sum().backward()
    assert_close(lp, ref_lp, dtype)
    assert_close(ent, ref_h, dtype)
    if dtype == torch.float64:
        assert_close(hl.grad, hr.grad, dtype, "grad")  # summed over the vocabulary slices of every rank
        assert_close(wl.grad, wr.grad[rows], dtype, "grad")
        # hidden_grad="local": this slice's share only, which the caller's own reduction sums
        hs = h.clone().requires_grad_(True)
        lp_s, ent_s = vocab_parallel_linear_logprobs_and_entropy(hs, wl.detach(), labels, group,
                                                                 local_bias=None if bl is None else bl.detach(),
                                                                 temperature=0.8, chunk_size=7, hidden_grad="local")
        (lp_s * up_lp + ent_s * up_h).sum().backward()
        shares = hs.grad.clone()
        dist.all_reduce(shares, group=group)
        assert_close(shares, hr.grad, dtype, "grad")
        with pytest.raises(ValueError, match="hidden_grad"):
            vocab_parallel_linear_logprobs_and_entropy(hs, wl, labels, group, hidden_grad="mean")
    else:
        # dh = sum_j dz_j w_j cancels heavily (the label's row against the softmax mean): held to eager PyTorch's
        # own float32 error on the whole weight, with slack 2 for the reduction split across ranks
        h32, w32 = h.float().requires_grad_(True), w.float().requires_grad_(True)
        b32 = b.float().requires_grad_(True) if bias else None
        lp32, ent32 = linear_logprobs_and_entropy(h32, w32, labels, bias=b32, temperature=0.8)
        (lp32 * up_lp.float() + ent32 * up_h.float()).sum().backward()
        assert_no_worse_than_torch(hl.grad, hr.grad, h32.grad, slack=2.0)
        assert_no_worse_than_torch(wl.grad, wr.grad[rows], w32.grad[rows], slack=2.0)
    if bias:
        assert_close(bl.grad, br.grad[rows], dtype, "grad")

    # the PPO loss from hidden states, against the reference on the whole weight
    bt = (n - 1) // 8
    hh = h[: bt * 8].view(bt, 8, hdim)
    lab = labels[: bt * 8].view(bt, 8)
    old = torch.randn(bt, 8, generator=g, dtype=torch.float64) - 5
    adv = torch.randn(bt, 8, generator=g, dtype=torch.float64)
    mask = torch.ones(bt, 8, dtype=torch.float64)
    mask[0, 5:] = 0
    kw = dict(ref_logprobs=old + 0.1, kl_coef=0.1, kl_kind="k2", entropy_coef=0.02, agg="seq-mean-token-sum",
              temperature=0.8)
    hr2, wr2 = hh.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref_loss, _ = ppo_loss_from_hidden(hr2, wr2, lab, old, adv, mask, **kw)
    ref_loss.backward()
    hl2, wl2 = hh.to(dtype).clone().requires_grad_(True), w[rows].to(dtype).clone().requires_grad_(True)
    loss, stats = vocab_parallel_ppo_loss_from_hidden(hl2, wl2, lab, old, adv, mask, group, chunk_size=5, **kw)
    loss.backward()
    assert_close(loss, ref_loss, dtype)
    assert_close(stats["loss"], ref_loss, dtype)
    if dtype == torch.float64:
        assert_close(hl2.grad, hr2.grad, dtype, "grad")
        assert_close(wl2.grad, wr2.grad[rows], dtype, "grad")


def _check_bad_labels(rank: int, group, sizes: list[int]) -> None:
    local = torch.randn(4, sizes[rank])
    labels = torch.tensor([0, 5, V_GLOBAL, 3])  # V_GLOBAL: owned by no rank
    with pytest.raises(ValueError, match="labels out of range"):
        vocab_parallel_logprobs_and_entropy(local, labels, group)
    with pytest.raises(TypeError, match="integer"):
        vocab_parallel_logprobs_and_entropy(local, labels.float(), group)


def _checks(rank: int, world: int, group) -> None:
    even = [len(c) for c in torch.arange(V_GLOBAL).tensor_split(world)]
    skewed = [V_GLOBAL - 17 * (world - 1)] + [17] * (world - 1)
    for sizes in (even, skewed):
        _check_logprobs(rank, group, torch.float64, sizes, 1.0, masked=False, pass_start=False)
        _check_logprobs(rank, group, torch.float32, sizes, 0.7, masked=True, pass_start=True)
    _check_logprobs(rank, group, torch.bfloat16, even, 1.0, masked=False, pass_start=True)
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        _check_ppo_loss(rank, group, skewed, agg)
    _check_linear(rank, group, skewed, torch.float64, bias=True)
    _check_linear(rank, group, even, torch.float32, bias=False)
    _check_bad_labels(rank, group, even)


def _body(rank: int, world: int) -> None:
    # one set of 3 processes (spawning is the slow part) runs the checks over all 3 ranks and over a subgroup of 2
    _checks(rank, world, None)
    pair = dist.new_group([0, 1])  # every rank must take part in creating it
    if rank < 2:
        _checks(rank, 2, pair)


def test_vocab_parallel_matches_single_process_on_2_and_3_ranks():
    run_world(_body, 3)


def test_needs_a_process_group():
    with pytest.raises(RuntimeError, match="initialized torch.distributed"):
        vocab_parallel_logprobs_and_entropy(torch.randn(2, 5), torch.tensor([0, 1]))
