"""Reference GAE against hand-derived values and the textbook recursion."""

from __future__ import annotations

import pytest
import torch

from fastppo import reference as ref


def _classic(r, v, gamma, lam, last_value=0.0):
    """Textbook GAE over one fully valid sequence (Python floats)."""
    T = len(r)
    adv = [0.0] * T
    nxt_v, nxt_a = last_value, 0.0
    for t in reversed(range(T)):
        delta = r[t] + gamma * nxt_v - v[t]
        nxt_a = delta + gamma * lam * nxt_a
        adv[t] = nxt_a
        nxt_v = v[t]
    return adv


def test_hand_derived_monte_carlo_case():
    # gamma = lam = 1: advantages are return - value, return = 1 everywhere.
    r = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 0.6, 0.7]], dtype=torch.float64)
    adv, ret = ref.gae(r, v, torch.ones(1, 3), gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.4, 0.3]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.ones(1, 3, dtype=torch.float64))


def test_hand_derived_hole_is_skipped():
    # mask [1, 0, 1]: t=2: delta = 1 - 0.7 = 0.3; t=0 sees t=2 as next: delta = 0.9*0.7 - 0.5 = 0.13,
    # A0 = 0.13 + 0.9*0.5*0.3 = 0.265.
    r = torch.tensor([[0.0, 123.0, 1.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, -55.0, 0.7]], dtype=torch.float64)
    m = torch.tensor([[1, 0, 1]], dtype=torch.bool)
    adv, ret = ref.gae(r, v, m, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.265, 0.0, 0.3]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[0.765, 0.0, 1.0]], dtype=torch.float64))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (0.0, 0.0), (1.0, 1.0)])
def test_contiguous_mask_equals_classic_recursion(gamma, lam):
    g = torch.Generator().manual_seed(1)
    r = torch.randn(3, 9, generator=g, dtype=torch.float64)
    v = torch.randn(3, 9, generator=g, dtype=torch.float64)
    lengths = [9, 4, 1]
    m = torch.zeros(3, 9, dtype=torch.bool)
    for b, n in enumerate(lengths):
        m[b, :n] = True
    boot = torch.tensor([0.3, -0.2, 1.5], dtype=torch.float64)
    adv, ret = ref.gae(r, v, m, gamma=gamma, lam=lam, bootstrap_value=boot)
    for b, n in enumerate(lengths):
        exp = _classic(r[b, :n].tolist(), v[b, :n].tolist(), gamma, lam, last_value=boot[b].item())
        torch.testing.assert_close(adv[b, :n], torch.tensor(exp, dtype=torch.float64))
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()
    torch.testing.assert_close(ret, torch.where(m, adv + v, torch.zeros_like(v)))


def test_all_masked_row_is_zero():
    adv, ret = ref.gae(torch.randn(2, 5), torch.randn(2, 5), torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]))
    assert (adv[1] == 0).all() and (ret[1] == 0).all()
