"""Fused PPO loss of the C++ CPU kernels against the float64 reference: the per-token terms of the launcher
(including d(pg)/d(logp) and d(kl)/d(logp) vs fp64 autograd) and ``ppo_loss_from_logits(backend="cpp")``
values, stats and gradients for every option (agg modes, clip-higher, dual clip, KL kinds, entropy bonus)."""

from __future__ import annotations

import pytest
import torch

import fastppo
from fastppo import reference as ref
from fastppo._contract import KL_KINDS, PPO_TERMS, TERM
from fastppo.reference.losses import AGG_MODES
from tests.tolerances import assert_close

F32 = torch.float32
_T = TERM


def _batch(b: int, t: int, v: int, seed: int, dtype=F32, temperature: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g) * 2).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    lp = ref.token_logprobs(logits.double(), labels, temperature=temperature)
    # old/ref log-probs near the current ones so ratios land on both sides of the clip range
    old = (lp + torch.randn(b, t, generator=g, dtype=torch.float64) * 1.0).float()
    rlp = (lp + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.3).float()
    adv = torch.randn(b, t, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.25
    mask[0, 0] = True
    return logits, labels, old, adv, rlp, mask


def test_terms_match_reference_and_autograd(cpp, simd):
    logits, labels, old, adv, rlp, mask = _batch(3, 21, 1271, seed=1)
    n = 63
    for kind_i, kind in enumerate(KL_KINDS):
        for dual in (0.0, 3.0):
            terms = cpp.ppo_loss_forward(logits, labels.reshape(-1), old.reshape(-1), adv.reshape(-1),
                                         rlp.reshape(-1), mask.float().reshape(-1), 0.9, 0.2, 0.28, dual, kind_i,
                                         0.05, 0.01)
            assert terms.shape == (len(PPO_TERMS), n) and terms.dtype == F32
            m = mask.reshape(-1)
            assert torch.all(terms[:, ~m] == 0)  # masked rows: zeros in every term
            x64 = logits.double()
            lp64 = ref.token_logprobs(x64, labels, temperature=0.9).reshape(-1).requires_grad_()
            h64 = ref.token_entropy(x64, temperature=0.9).reshape(-1)
            pg, ratio, clipped, dual_c = ref.ppo_token_terms(lp64, old.double().reshape(-1),
                                                              adv.double().reshape(-1), clip_low=0.2, clip_high=0.28,
                                                              dual_clip=dual or None)
            kl = ref.kl_penalty(lp64, rlp.double().reshape(-1), kind)
            (dpg,) = torch.autograd.grad(pg.sum(), lp64, retain_graph=True)
            (dkl,) = torch.autograd.grad(kl.sum(), lp64, retain_graph=True)
            loss = pg + 0.05 * kl - 0.01 * h64
            for name, want in (("logp", lp64), ("entropy", h64), ("pg", pg), ("ratio", ratio), ("kl", kl),
                               ("dpg", dpg), ("dkl", dkl), ("clipped", clipped.double()),
                               ("dual_clipped", dual_c.double()), ("loss", loss)):
                assert_close(terms[_T[name], m], want.detach()[m], F32)
            assert clipped[m].any() and (~clipped[m]).any()  # both branches of the clip are exercised
            assert (dual_c[m].any() if dual else True)
            lse = torch.logsumexp(x64 / 0.9, -1).reshape(-1)
            assert_close(terms[_T["lse"], m], lse[m], F32)


def test_terms_without_ref_have_zero_kl(cpp):
    logits, labels, old, adv, _, mask = _batch(2, 5, 300, seed=2)
    terms = cpp.ppo_loss_forward(logits, labels.reshape(-1), old.reshape(-1), adv.reshape(-1), None,
                                 mask.float().reshape(-1), 1.0, 0.2, 0.2, 0.0, 2, 0.0, 0.0)
    assert torch.all(terms[_T["kl"]] == 0) and torch.all(terms[_T["dkl"]] == 0)
    assert torch.equal(terms[_T["loss"]], terms[_T["pg"]])


CASES = [
    # agg, kl_kind, kl_coef, entropy_coef, clip_high, dual_clip, temperature
    ("token-mean", "k1", 0.1, 0.0, None, None, 1.0),
    ("token-mean", "k3", 0.05, 0.01, 0.28, 3.0, 0.7),
    ("seq-mean-token-sum", "k2", 0.2, 0.02, None, 2.0, 1.0),
    ("seq-mean-token-mean", "abs", 0.05, 0.0, 0.3, None, 1.3),
    ("seq-mean-token-sum-norm", "k3", 0.0, 0.05, 0.25, 5.0, 1.0),
    ("seq-mean-token-mean", "k3", 0.1, 0.01, None, 3.0, 0.9),
]


@pytest.mark.parametrize("agg,kl_kind,kl_coef,entropy_coef,clip_high,dual_clip,temperature", CASES)
def test_public_ppo_loss_matches_reference(agg, kl_kind, kl_coef, entropy_coef, clip_high, dual_clip, temperature):
    logits, labels, old, adv, rlp, mask = _batch(3, 16, 513, seed=len(agg) + int(kl_coef * 100),
                                                 temperature=temperature)
    mask[2] = False  # an empty sequence (the seq-* modes skip it)
    mask[1, 3] = True
    # one token far above the ratio range with a negative advantage: the dual clip caps it
    old[0, 1] = ref.token_logprobs(logits[0, 1].double(), labels[0, 1], temperature=temperature).float() - 2.0
    adv[0, 1], mask[0, 1] = -1.0, True
    kw = dict(ref_logprobs=rlp, kl_coef=kl_coef, kl_kind=kl_kind, entropy_coef=entropy_coef, clip_low=0.2,
              clip_high=clip_high, dual_clip=dual_clip, temperature=temperature, agg=agg)
    x = logits.clone().requires_grad_()
    loss, stats = fastppo.ppo_loss_from_logits(x, labels, old, adv, mask, backend="cpp", **kw)
    loss.backward()
    x64 = logits.double().requires_grad_()
    e_loss, e_stats = ref.ppo_loss_from_logits(x64, labels, old.double(), adv.double(), mask,
                                               **{**kw, "ref_logprobs": rlp.double()})
    e_loss.backward()
    assert_close(loss, e_loss, F32)
    assert_close(x.grad, x64.grad, F32, "grad")
    if dual_clip is not None:
        assert float(e_stats["dual_clipfrac"]) > 0  # the dual clip is exercised
    for key in ("pg_loss", "kl", "entropy", "clipfrac", "dual_clipfrac", "approx_kl", "ratio_mean", "ratio_max"):
        assert_close(stats[key], e_stats[key], F32)


def test_public_ppo_loss_inplace_backward_and_strided_logits():
    logits, labels, old, adv, rlp, mask = _batch(2, 8, 700, seed=5)
    big = torch.randn(2, 9, 700)
    big[:, :8] = logits
    x = big.clone().requires_grad_()
    kw = dict(ref_logprobs=rlp, kl_coef=0.1, kl_kind="k3", entropy_coef=0.01, agg="token-mean")
    loss, _ = fastppo.ppo_loss_from_logits(x[:, :8], labels, old, adv, mask, backend="cpp", **kw)
    loss.backward()
    x64 = logits.double().requires_grad_()
    e_loss, _ = ref.ppo_loss_from_logits(x64, labels, old.double(), adv.double(), mask,
                                         **{**kw, "ref_logprobs": rlp.double()})
    e_loss.backward()
    assert_close(loss, e_loss, F32)
    assert_close(x.grad[:, :8], x64.grad, F32, "grad")
    assert torch.all(x.grad[:, 8] == 0)
    xi = logits.clone().requires_grad_()
    loss_i, _ = fastppo.ppo_loss_from_logits(xi, labels, old, adv, mask, backend="cpp", inplace_backward=True, **kw)
    loss_i.backward()
    assert_close(xi.grad, x64.grad, F32, "grad")


def test_public_ppo_loss_bf16_and_agg_modes_cover_all():
    assert set(m for c in CASES for m in [c[0]]) == set(AGG_MODES)
    assert set(c[1] for c in CASES) == set(KL_KINDS)
    logits, labels, old, adv, rlp, mask = _batch(2, 6, 400, seed=8, dtype=torch.bfloat16)
    x = logits.clone().requires_grad_()
    loss, _ = fastppo.ppo_loss_from_logits(x, labels, old, adv, mask, backend="cpp", entropy_coef=0.01)
    loss.backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
    x64 = logits.double().requires_grad_()
    e_loss, _ = ref.ppo_loss_from_logits(x64, labels, old.double(), adv.double(), mask, entropy_coef=0.01)
    e_loss.backward()
    assert_close(loss, e_loss, torch.bfloat16)
    assert_close(x.grad, x64.grad, torch.bfloat16, "grad")


def test_public_ppo_loss_rejects_nan_on_valid_rows_only():
    logits, labels, old, adv, rlp, mask = _batch(2, 5, 300, seed=9)
    mask[1, 2] = False
    logits[1, 2, 5] = float("nan")  # masked token: never read, no error
    loss, _ = fastppo.ppo_loss_from_logits(logits, labels, old, adv, mask, backend="cpp")
    assert torch.isfinite(loss)
    logits[0, 0, 5] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fastppo.ppo_loss_from_logits(logits, labels, old, adv, mask, backend="cpp")


@pytest.mark.parametrize("kl_kind", KL_KINDS)
def test_public_ppo_loss_kl_stat_only_ignores_infinite_kl(kl_kind):
    """kl_coef = 0 with ref_logprobs (for the KL statistic only): an infinite per-token KL (ref = -inf) must not turn
    the loss or the gradient into 0 * inf = NaN; the reference adds no KL term at all."""
    logits, labels, old, adv, rlp, mask = _batch(2, 4, 61, seed=45)
    mask[:] = True
    rlp[0, 1] = float("-inf")
    x = logits.clone().requires_grad_()
    loss, _ = fastppo.ppo_loss_from_logits(x, labels, old, adv, mask, ref_logprobs=rlp, kl_coef=0.0, kl_kind=kl_kind,
                                           entropy_coef=0.01, backend="cpp")
    loss.backward()
    x64 = logits.double().requires_grad_()
    e_loss, _ = ref.ppo_loss_from_logits(x64, labels, old.double(), adv.double(), mask, ref_logprobs=rlp.double(),
                                         kl_coef=0.0, kl_kind=kl_kind, entropy_coef=0.01)
    e_loss.backward()
    assert_close(loss, e_loss, F32)
    assert_close(x.grad, x64.grad, F32, "grad")
