"""The ``ppo_loss_forward`` launcher of every backend (torch: the reference's row math, ``ppo_term_rows``): each
per-token term (incl. d(pg)/d(logp) and
d(kl)/d(logp) against fp64 autograd) for every KL kind, with and without the dual clip, log-ratios beyond
+-LOG_RATIO_CLAMP, and zeros in every term of masked rows."""

from __future__ import annotations

import pytest
import torch

from fastppo import PPOObjective
from fastppo import reference as ref
from fastppo._contract import KL_KINDS, LOG_RATIO_CLAMP, NUM_TERMS, TERM
from tests.tolerances import assert_close

F32 = torch.float32


def _launchers(backend):
    return backend.launchers


def _batch(b: int, t: int, v: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * 2
    labels = torch.randint(0, v, (b, t), generator=g)
    lp = ref.token_logprobs(logits.double(), labels, temperature=0.9)
    # old/ref log-probs near the current ones so ratios land on both sides of the clip range
    old = (lp + torch.randn(b, t, generator=g, dtype=torch.float64)).float()
    rlp = (lp + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.3).float()
    adv = torch.randn(b, t, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.25
    old[0, 0], mask[0, 0] = float(lp[0, 0]) - (LOG_RATIO_CLAMP + 5), True  # clamped from above: no gradient
    old[0, 1], mask[0, 1] = float(lp[0, 1]) + (LOG_RATIO_CLAMP + 5), True  # clamped from below
    return logits, labels, old, adv, rlp, mask


@pytest.mark.parametrize("dual", [0.0, 3.0])
def test_terms_match_reference_and_autograd(backend, dual):
    L, dev = _launchers(backend), backend.device
    logits, labels, old, adv, rlp, mask = _batch(3, 9, 1031, seed=1)
    n, m = 27, mask.reshape(-1)
    f = lambda t: t.reshape(-1).float().contiguous().to(dev)  # noqa: E731
    x64 = logits.double()
    for kind in KL_KINDS:
        obj = PPOObjective(temperature=0.9, clip_low=0.2, clip_high=0.28, dual_clip=dual or None, kl_kind=kind,
                           kl_coef=0.05, entropy_coef=0.01)
        terms = L.ppo_loss_forward(logits.to(dev), labels.reshape(-1).to(dev), f(old), f(adv), f(rlp), f(mask),
                                   obj).cpu()
        assert terms.shape == (NUM_TERMS, n) and terms.dtype == F32
        assert torch.all(terms[:, ~m] == 0)  # masked rows: zeros in every term
        lp64 = ref.token_logprobs(x64, labels, temperature=0.9).reshape(-1).requires_grad_()
        h64 = ref.token_entropy(x64, temperature=0.9).reshape(-1)
        pg, ratio, clipped, dual_c = ref.ppo_token_terms(lp64, old.double().reshape(-1), adv.double().reshape(-1),
                                                          clip_low=0.2, clip_high=0.28, dual_clip=dual or None)
        kl = ref.kl_penalty(lp64, rlp.double().reshape(-1), kind)
        (dpg,) = torch.autograd.grad(pg.sum(), lp64, retain_graph=True)
        (dkl,) = torch.autograd.grad(kl.sum(), lp64, retain_graph=True)
        loss = pg + 0.05 * kl - 0.01 * h64
        lse = torch.logsumexp(x64 / 0.9, -1).reshape(-1)
        for name, want in (("logp", lp64), ("entropy", h64), ("lse", lse), ("pg", pg), ("ratio", ratio),
                           ("kl", kl), ("dpg", dpg), ("dkl", dkl), ("clipped", clipped.double()),
                           ("dual_clipped", dual_c.double()), ("loss", loss)):
            assert_close(terms[TERM[name], m], want.detach()[m], F32)
        assert clipped[m].any() and (~clipped[m]).any()  # both branches of the clip are exercised
        assert dual_c[m].any() if dual else not dual_c.any()
        assert terms[TERM["dpg"], 0] == 0 and terms[TERM["dpg"], 1] == 0  # beyond the clamp: no gradient


def test_terms_without_ref_have_zero_kl(backend):
    L, dev = _launchers(backend), backend.device
    logits, labels, old, adv, _, mask = _batch(2, 5, 300, seed=2)
    f = lambda t: t.reshape(-1).float().contiguous().to(dev)  # noqa: E731
    terms = L.ppo_loss_forward(logits.to(dev), labels.reshape(-1).to(dev), f(old), f(adv), None, f(mask),
                               PPOObjective())
    assert torch.all(terms[TERM["kl"]] == 0) and torch.all(terms[TERM["dkl"]] == 0)
    assert torch.equal(terms[TERM["loss"]], terms[TERM["pg"]])
