"""The fused PPO loss from logits on every backend and every PPO case (cases.py) through the public op, against
the float64 reference: loss, statistics and dlogits, with masked holes, an empty sequence, log-ratios beyond the
+-LOG_RATIO_CLAMP clamp, the in-place backward, and NaN logits under the mask."""

from __future__ import annotations

import pytest
import torch

import fastppo
from fastppo import reference as ref
from fastppo._contract import KL_KINDS, LOG_RATIO_CLAMP
from fastppo.reference.losses import AGG_MODES
from tests.contract.cases import F32, PPO_CASE_IDS, PPO_CASES
from tests.tolerances import assert_close

STATS = ("pg_loss", "kl", "entropy", "clipfrac", "dual_clipfrac", "approx_kl", "ratio_mean", "ratio_max")


def _batch(b: int, t: int, v: int, seed: int, temperature: float = 1.0, dtype=F32):
    """``(logits, labels, old, adv, ref_logp, mask)``: old/ref near the policy, masked holes, an empty sequence,
    tokens whose log-ratio lies beyond +-LOG_RATIO_CLAMP (one each way, with either sign of advantage)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g) * 2).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    lp = ref.token_logprobs(logits.double(), labels, temperature=temperature)
    old = (lp + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.3).float()
    rlp = (lp + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.3).float()
    adv = torch.randn(b, t, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.25
    mask[-1] = False  # an empty sequence (the seq-* modes skip it)
    old[0, 1], adv[0, 1], mask[0, 1] = float(lp[0, 1]) - 2.0, -1.0, True  # ratio e^2: the dual clip caps it
    old[0, 2], mask[0, 2] = float(lp[0, 2]) - (LOG_RATIO_CLAMP + 5), True  # log-ratio +25: clamped, no gradient
    old[1, 0], mask[1, 0] = float(lp[1, 0]) + (LOG_RATIO_CLAMP + 5), True  # log-ratio -25
    return logits, labels, old, adv, rlp, mask


def test_cases_cover_every_kl_kind_and_aggregation():
    assert {c.kl_kind for c in PPO_CASES} == set(KL_KINDS)
    assert {c.agg for c in PPO_CASES} == set(AGG_MODES)


@pytest.mark.parametrize("case", PPO_CASES, ids=PPO_CASE_IDS)
def test_loss_stats_and_grads_match_fp64(backend, case):
    logits, labels, old, adv, rlp, mask = _batch(3, 16, 513, seed=len(case.id), temperature=case.temperature)
    kw = dict(kl_coef=case.kl_coef, kl_kind=case.kl_kind, entropy_coef=case.entropy_coef, clip_low=0.2,
              clip_high=case.clip_high, dual_clip=case.dual_clip, temperature=case.temperature, agg=case.agg)
    dev = backend.device
    x = logits.clone().to(dev).requires_grad_()
    args = (labels.to(dev), old.to(dev), adv.to(dev), mask.to(dev))
    r = rlp.to(dev) if case.with_ref else None
    loss, stats = fastppo.ppo_loss_from_logits(x, *args, ref_logprobs=r, backend=backend.name, **kw)
    loss.backward()
    x64 = logits.double().requires_grad_()
    e_loss, e_stats = ref.ppo_loss_from_logits(x64, labels, old.double(), adv.double(), mask,
                                               ref_logprobs=rlp.double() if case.with_ref else None, **kw)
    e_loss.backward()
    assert_close(loss, e_loss, F32)
    assert_close(x.grad, x64.grad, F32, "grad")
    assert set(stats) == set(e_stats)
    for key in STATS:
        if key in e_stats:
            assert_close(stats[key], e_stats[key], F32)
    if case.dual_clip is not None:
        assert float(e_stats["dual_clipfrac"]) > 0  # the dual clip is exercised

    if backend.kernel:  # in place: the same loss and, bitwise, the same dlogits
        xi = logits.clone().to(dev).requires_grad_()
        loss_i, _ = fastppo.ppo_loss_from_logits(xi, *args, ref_logprobs=r, backend=backend.name,
                                                 inplace_backward=True, **kw)
        loss_i.backward()
        assert torch.equal(loss_i, loss) and torch.equal(xi.grad, x.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_loss_and_grads(backend, dtype):
    logits, labels, old, adv, rlp, mask = _batch(2, 6, 400, seed=8, dtype=dtype)
    dev = backend.device
    x = logits.clone().to(dev).requires_grad_()
    loss, _ = fastppo.ppo_loss_from_logits(x, labels.to(dev), old.to(dev), adv.to(dev), mask.to(dev),
                                           entropy_coef=0.01, backend=backend.name)
    loss.backward()
    assert x.grad.dtype == dtype
    x64 = logits.double().requires_grad_()
    e_loss, _ = ref.ppo_loss_from_logits(x64, labels, old.double(), adv.double(), mask, entropy_coef=0.01)
    e_loss.backward()
    assert_close(loss, e_loss, dtype)
    assert_close(x.grad, x64.grad, dtype, "grad")


def test_nan_logits_raise_on_valid_rows_only(backend):
    logits, labels, old, adv, rlp, mask = _batch(2, 5, 300, seed=9)
    mask[0, 3] = False
    logits[0, 3, 5] = float("nan")  # masked token: never read, no error
    dev = backend.device
    args = (labels.to(dev), old.to(dev), adv.to(dev), mask.to(dev))
    loss, _ = fastppo.ppo_loss_from_logits(logits.to(dev), *args, backend=backend.name)
    assert torch.isfinite(loss)
    logits[0, 0, 5] = float("nan")
    mask[0, 0] = True
    args = (labels.to(dev), old.to(dev), adv.to(dev), mask.to(dev))
    with pytest.raises(ValueError, match="non-finite"):
        fastppo.ppo_loss_from_logits(logits.to(dev), *args, backend=backend.name)


@pytest.mark.parametrize("kl_kind", KL_KINDS)
def test_kl_statistic_only_ignores_infinite_kl(backend, kl_kind):
    """ref_logprobs with kl_coef = 0 feed only the KL statistic: an infinite per-token KL (ref = -inf) must not turn
    the loss or the gradient into 0 * inf = NaN, as the reference (which adds no KL term) shows."""
    logits, labels, old, adv, rlp, mask = _batch(2, 4, 61, seed=45)
    mask[:] = True
    rlp[0, 1] = float("-inf")
    kw = dict(kl_coef=0.0, kl_kind=kl_kind, entropy_coef=0.01)
    dev = backend.device
    x = logits.clone().to(dev).requires_grad_()
    loss, _ = fastppo.ppo_loss_from_logits(x, labels.to(dev), old.to(dev), adv.to(dev), mask.to(dev),
                                           ref_logprobs=rlp.to(dev), backend=backend.name, **kw)
    loss.backward()
    x64 = logits.double().requires_grad_()
    e_loss, _ = ref.ppo_loss_from_logits(x64, labels, old.double(), adv.double(), mask, ref_logprobs=rlp.double(),
                                         **kw)
    e_loss.backward()
    assert_close(loss, e_loss, F32)
    assert_close(x.grad, x64.grad, F32, "grad")


def test_masked_rows_are_never_read(backend):
    """NaN logits on masked tokens change nothing: loss and dlogits as with zeros there (the kernels skip the rows)."""
    logits, labels, old, adv, rlp, mask = _batch(2, 8, 257, seed=31)
    logits[~mask] = float("nan")
    dev = backend.device
    x = logits.clone().to(dev).requires_grad_()
    loss, stats = fastppo.ppo_loss_from_logits(x, labels.to(dev), old.to(dev), adv.to(dev), mask.to(dev),
                                               backend=backend.name)
    loss.backward()
    x64 = torch.where(mask[..., None], logits, torch.zeros_like(logits)).double().requires_grad_()
    e_loss, _ = ref.ppo_loss_from_logits(x64, labels, old.double(), adv.double(), mask)
    e_loss.backward()
    assert_close(loss, e_loss, F32)
    assert_close(x.grad, x64.grad, F32, "grad")
    assert "kl" not in stats
