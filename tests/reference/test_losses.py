"""Reference losses and statistics against hand-derived values."""

from __future__ import annotations

import math

import pytest
import torch

from fastppo import reference as ref

F64 = torch.float64


def _t(*vals):
    return torch.tensor(vals, dtype=F64)


def test_policy_clip_positive_advantage():
    # ratio 1.5, A = 1: pg1 = -1.5, pg2 = -1.2 -> loss -1.2, clipped.
    pg, ratio, clipped, dual = ref.ppo_token_terms(_t(math.log(1.5)), _t(0.0), _t(1.0), clip_low=0.2)
    assert pg.item() == pytest.approx(-1.2) and ratio.item() == pytest.approx(1.5)
    assert clipped.item() and not dual.item()


def test_policy_negative_advantage_and_dual_clip():
    lp = _t(math.log(1.5))
    pg, _, clipped, _ = ref.ppo_token_terms(lp, _t(0.0), _t(-1.0), clip_low=0.2)
    assert pg.item() == pytest.approx(1.5) and not clipped.item()
    pg, _, _, dual = ref.ppo_token_terms(lp, _t(0.0), _t(-1.0), clip_low=0.2, dual_clip=1.3)
    assert pg.item() == pytest.approx(1.3) and dual.item()


def test_asymmetric_clip_higher():
    pg, _, clipped, _ = ref.ppo_token_terms(_t(math.log(1.25)), _t(0.0), _t(1.0), clip_low=0.2, clip_high=0.28)
    assert pg.item() == pytest.approx(-1.25) and not clipped.item()


def test_dual_clip_must_exceed_one():
    with pytest.raises(ValueError, match="dual_clip"):
        ref.ppo_token_terms(_t(0.0), _t(0.0), _t(1.0), dual_clip=0.9)


LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


@pytest.mark.parametrize(
    "agg,expected",
    [
        ("token-mean", 7 / 3),
        ("seq-mean-token-sum", (3 + 4) / 2),
        ("seq-mean-token-mean", (1.5 + 4) / 2),
        ("seq-mean-token-sum-norm", (3 + 4) / 2 / 3),  # seq-mean of token sums over T = 3
    ],
)
def test_agg_modes(agg, expected):
    assert ref.agg_loss(LOSS, MASK, agg).item() == pytest.approx(expected)


def test_seq_modes_ignore_empty_sequences():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert ref.agg_loss(LOSS, mask, "seq-mean-token-mean").item() == pytest.approx(1.5)
    assert ref.agg_loss(LOSS, mask, "seq-mean-token-sum").item() == pytest.approx(3.0)


def test_value_loss_clipped_and_unclipped():
    v, old, ret, m = _t(2.0), _t(1.0), _t(0.0), torch.ones(1)
    loss, stats = ref.value_loss(v, old, ret, m, clip=0.5)
    assert loss.item() == pytest.approx(2.0)  # 0.5 * max(4, 2.25)
    assert stats["vf_clipfrac"].item() == 0.0
    loss, stats = ref.value_loss(_t(2.0), _t(1.0), _t(3.0), m, clip=0.5)
    assert loss.item() == pytest.approx(0.5 * 2.25)  # max((2-3)^2=1, (1.5-3)^2=2.25)
    assert stats["vf_clipfrac"].item() == 1.0
    loss, _ = ref.value_loss(_t(2.0), _t(1.0), _t(3.0), m)
    assert loss.item() == pytest.approx(0.5)


def test_policy_loss_stats():
    lp = _t(math.log(1.5), 0.0, 0.0)
    old = _t(0.0, 0.0, 5.0)
    adv = _t(1.0, 2.0, 3.0)
    mask = torch.tensor([1, 1, 0])
    loss, stats = ref.ppo_policy_loss(lp, old, adv, mask)
    assert loss.item() == pytest.approx((-1.2 - 2.0) / 2)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["ratio_max"].item() == pytest.approx(1.5)  # the masked token's ratio exp(-5) is ignored
    assert stats["approx_kl"].item() == pytest.approx((1.5 - math.log(1.5) - 1) / 2)


def test_masked_stats():
    x = _t(1.0, 2.0, 3.0, 100.0)
    m = torch.tensor([1, 1, 1, 0])
    assert ref.masked_mean(x, m).item() == pytest.approx(2.0)
    assert ref.masked_var(x, m).item() == pytest.approx(1.0)
    assert ref.masked_var(x, m, unbiased=False).item() == pytest.approx(2 / 3)
    w = ref.masked_whiten(x, m)
    torch.testing.assert_close(w[:3], _t(-1.0, 0.0, 1.0), atol=1e-7, rtol=0)
    w2 = ref.masked_whiten(x, m, shift_mean=False)
    torch.testing.assert_close(w2[:3], _t(1.0, 2.0, 3.0), atol=1e-7, rtol=0)


def test_ppo_loss_from_logits_composes_the_parts():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 17, generator=g, dtype=F64)
    labels = torch.randint(0, 17, (2, 5), generator=g)
    old = torch.randn(2, 5, generator=g, dtype=F64) - 3
    adv = torch.randn(2, 5, generator=g, dtype=F64)
    rlp = torch.randn(2, 5, generator=g, dtype=F64) - 3
    mask = torch.rand(2, 5, generator=g) > 0.3
    loss, stats = ref.ppo_loss_from_logits(
        logits, labels, old, adv, mask, ref_logprobs=rlp, kl_coef=0.1, kl_kind="k2", entropy_coef=0.01,
        agg="seq-mean-token-mean",
    )
    lp, h = ref.logprobs_and_entropy(logits, labels)
    pg, _ = ref.ppo_policy_loss(lp, old, adv, mask, agg="seq-mean-token-mean")
    kl = ref.agg_loss(ref.kl_penalty(lp, rlp, "k2"), mask, "seq-mean-token-mean")
    ent = ref.agg_loss(h, mask, "seq-mean-token-mean")
    assert loss.item() == pytest.approx((pg + 0.1 * kl - 0.01 * ent).item(), abs=1e-12)
    assert stats["entropy"].item() == pytest.approx(ref.masked_mean(h, mask).item())


def test_masked_positions_are_ignored_whatever_they_hold():
    x = _t(1.0, 3.0, math.nan, -math.inf)
    m = torch.tensor([1, 1, 0, 0])
    assert ref.masked_mean(x, m).item() == pytest.approx(2.0)
    assert ref.agg_loss(x[None], m[None], "seq-mean-token-sum").item() == pytest.approx(4.0)
    # garbage old log-probs on padding must not poison the policy-loss stats
    lp = _t(0.0, 0.0, 0.0)
    old = _t(0.0, 0.1, -math.inf)
    loss, stats = ref.ppo_policy_loss(lp, old, _t(1.0, 1.0, 1.0), torch.tensor([1, 1, 0]))
    assert all(torch.isfinite(v) for v in stats.values()) and torch.isfinite(loss)
