"""Reference outcome estimators (GRPO, RLOO, REINFORCE++) against hand-derived values and plain per-group /
per-token loops written out here in float64."""

from __future__ import annotations

import pytest
import torch

from fastppo.reference import advantages as A


def _loop_group_stats(scores: list[float], ids: list[int]) -> tuple[dict, dict, dict]:
    groups: dict[int, list[float]] = {}
    for s, g in zip(scores, ids, strict=True):
        groups.setdefault(g, []).append(s)
    mean = {g: sum(v) / len(v) for g, v in groups.items()}
    std = {
        g: (sum((x - mean[g]) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else float("nan")
        for g, v in groups.items()
    }
    return groups, mean, std


def _loop_grpo(scores, ids, mask, norm, eps):
    groups, mean, std = _loop_group_stats(scores, ids)
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for i, (s, g) in enumerate(zip(scores, ids, strict=True)):
        if len(groups[g]) == 1:
            a = s / (1.0 + eps) if norm else s
        else:
            a = (s - mean[g]) / (std[g] + eps) if norm else s - mean[g]
        out[i] = a * mask[i].double()
    return out


def _loop_rloo(scores, ids, mask):
    groups, _, _ = _loop_group_stats(scores, ids)
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for i, (s, g) in enumerate(zip(scores, ids, strict=True)):
        n = len(groups[g])
        a = s - (sum(groups[g]) - s) / (n - 1) if n > 1 else s
        out[i] = a * mask[i].double()
    return out


def _loop_returns(rewards, mask, gamma):
    B, T = rewards.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        g = 0.0
        for t in reversed(range(T)):
            if mask[b, t]:
                g = float(rewards[b, t]) + gamma * g
                out[b, t] = g
    return out


def test_grpo_hand_derived():
    # group 7: scores 1, 3 -> mean 2, unbiased std sqrt(2); group 9: a single response -> mean 0, std 1.
    scores = torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    adv = A.grpo_advantages(scores, torch.tensor([7, 7, 9]), mask, eps=0.0)
    r2 = 2.0**0.5
    expected = torch.tensor([[-1 / r2, -1 / r2, 0.0], [1 / r2, 0.0, 0.0], [5.0, 5.0, 5.0]], dtype=torch.float64)
    torch.testing.assert_close(adv, expected)
    dr = A.grpo_advantages(scores, torch.tensor([7, 7, 9]), mask, norm_by_std=False)
    torch.testing.assert_close(dr[:, 0], torch.tensor([-1.0, 1.0, 5.0], dtype=torch.float64))


def test_rloo_hand_derived():
    # group 0: 1, 2, 6 -> baselines (2+6)/2=4, (1+6)/2=3.5, (1+2)/2=1.5; group 1 alone keeps its score.
    scores = torch.tensor([1.0, 2.0, 6.0, -4.0], dtype=torch.float64)
    adv = A.rloo_advantages(scores, torch.tensor([0, 0, 0, 1]), torch.ones(4, 2))
    torch.testing.assert_close(adv[:, 1], torch.tensor([-3.0, -1.5, 4.5, -4.0], dtype=torch.float64))


def test_discounted_returns_hand_derived_with_hole():
    r = torch.tensor([[1.0, 100.0, 2.0, 3.0, 0.0]], dtype=torch.float64)
    m = torch.tensor([[1, 0, 1, 1, 0]])
    # valid tokens 0, 2, 3: G3 = 3, G2 = 2 + 0.5*3, G0 = 1 + 0.5*G2; the masked reward 100 is ignored.
    g = A.discounted_returns(r, m, 0.5)
    torch.testing.assert_close(g, torch.tensor([[1 + 0.5 * 3.5, 0.0, 3.5, 3.0, 0.0]], dtype=torch.float64))


def test_place_on_last_token():
    m = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0]])
    out = A.place_on_last_token(torch.tensor([2.0, 3.0, 4.0]), m)
    torch.testing.assert_close(out, torch.tensor([[0, 2.0, 0, 0], [0, 0, 0, 3.0], [0, 0, 0, 0]]))


@pytest.mark.parametrize("B,n_groups", [(1, 1), (13, 4), (41, 41), (40, 5)])
@pytest.mark.parametrize("norm", [True, False])
def test_grpo_rloo_vs_loop(B, n_groups, norm):
    g = torch.Generator().manual_seed(B * 31 + n_groups)
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    ids = (torch.randint(0, n_groups, (B,), generator=g) * 97 - 300)  # sparse, negative ids
    mask = torch.rand(B, 11, generator=g) > 0.3
    mask[0] = False  # an all-masked row
    got = A.grpo_advantages(scores, ids, mask, norm_by_std=norm, eps=1e-6)
    exp = _loop_grpo(scores.tolist(), ids.tolist(), mask, norm, 1e-6)
    torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(A.rloo_advantages(scores, ids, mask), _loop_rloo(scores.tolist(), ids.tolist(), mask),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("B,T", [(1, 1), (3, 7), (5, 41), (2, 257)])
@pytest.mark.parametrize("gamma", [1.0, 0.99, 0.5, 1e-30, 0.0])
def test_discounted_returns_vs_loop(B, T, gamma):
    g = torch.Generator().manual_seed(B * 1000 + T)
    r = torch.randn(B, T, generator=g, dtype=torch.float64)
    m = torch.rand(B, T, generator=g) > 0.3
    if B > 1:
        m[1] = False
    torch.testing.assert_close(A.discounted_returns(r, m, gamma), _loop_returns(r, m, gamma), rtol=1e-12, atol=1e-12)


def test_discounted_returns_long_sequence_does_not_overflow():
    # 0.9 ** -4000 overflows float64; the chunked form only ever raises gamma to non-negative powers.
    T = 4000
    r = torch.zeros(1, T, dtype=torch.float64)
    r[0, -1] = 1.0
    m = torch.ones(1, T, dtype=torch.bool)
    g = A.discounted_returns(r, m, 0.9)
    assert torch.isfinite(g).all()
    exp = 0.9 ** torch.arange(T - 1, -1, -1, dtype=torch.float64)
    torch.testing.assert_close(g[0], exp, rtol=1e-12, atol=0)
    g32 = A.discounted_returns(r.float(), m, 0.99)
    assert torch.isfinite(g32).all() and g32.dtype == torch.float32


def test_reinforce_pp_whitening_and_score_placement():
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(6, 9, generator=g) > 0.3
    mask[:, 0] = True
    scores = torch.randn(6, generator=g, dtype=torch.float64)
    adv, ret = A.reinforce_pp_advantages(scores, mask, gamma=0.9)
    placed = A.place_on_last_token(scores, mask)
    exp_ret = _loop_returns(placed, mask, 0.9)
    torch.testing.assert_close(ret, exp_ret)
    valid = exp_ret[mask]
    exp_adv = torch.zeros_like(exp_ret)
    exp_adv[mask] = (valid - valid.mean()) / torch.sqrt(valid.var(unbiased=True) + 1e-8)
    torch.testing.assert_close(adv, exp_adv)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    raw, ret2 = A.reinforce_pp_advantages(placed, mask, gamma=0.9, whiten=False)
    torch.testing.assert_close(raw, exp_ret)
    torch.testing.assert_close(ret2, exp_ret)


def test_dense_group_ids():
    ids = A.dense_group_ids(torch.tensor([5, 5, -3, 7, 7, 7, 100]))
    assert ids.tolist() == [1, 1, 0, 2, 2, 2, 3]
    assert A.dense_group_ids(torch.tensor([], dtype=torch.int64)).numel() == 0
