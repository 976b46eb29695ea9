"""fastppo.compat.openrlhf against the real OpenRLHF functions and loss modules: values and gradients,
fp32/fp64, padded masks (left padding and holes included)."""

from __future__ import annotations

import pytest
import torch

from fastppo.compat import openrlhf as fo
from tests.compat.conftest import load_openrlhf, load_openrlhf_returns
from tests.tolerances import assert_close

DTYPES = [torch.float32, torch.float64]


@pytest.fixture(scope="module")
def peer():
    utils, loss = load_openrlhf()
    return utils, loss


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(shape, seed, dtype, scale=1.0):
    return (torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype)


def _mask(B=6, T=13, seed=0, dtype=torch.float32):
    g = _gen(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    m = torch.arange(T)[None, :] < lengths[:, None]
    m[1] = torch.rand(T, generator=g) > 0.4  # holes and left padding in one row
    m[1, 5] = True
    return m.to(dtype)


def _vg(fn, x, seed=99):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    first = out[0] if isinstance(out, tuple) else out
    up = torch.randn(first.shape, generator=_gen(seed), dtype=torch.float64)
    (first.double() * up).sum().backward()
    return out, x.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_log_probs_from_logits(peer, dtype, temperature):
    utils, _ = peer
    g = _gen(1)
    logits = (torch.randn(3, 7, 131, generator=g, dtype=torch.float64) * 2).to(dtype)
    labels = torch.randint(0, 131, (3, 7), generator=g)

    def run(fn):
        x = logits.clone().requires_grad_(True)
        scaled = x * 1.0  # non-leaf: the peer divides its input in place when temperature != 1
        out = fn(scaled, labels, temperature=temperature)
        (out.double() * torch.randn(out.shape, generator=_gen(2), dtype=torch.float64)).sum().backward()
        return out.detach(), x.grad, scaled.detach()

    mine, peer_out = run(fo.log_probs_from_logits), run(utils.log_probs_from_logits)
    assert_close(mine[0], peer_out[0], dtype)
    assert_close(mine[1], peer_out[1], dtype, "grad")
    assert_close(mine[2], peer_out[2], dtype)  # same in-place scaling of the caller's logits


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_compute_approx_kl(peer, dtype, estimator, unbiased):
    utils, _ = peer
    lp, base, old = _rand((6, 13), 3, dtype, 3), _rand((6, 13), 4, dtype, 3), _rand((6, 13), 5, dtype, 3)
    lp[0, :3] = torch.tensor([-30.0, 25.0, 11.0], dtype=dtype)  # hit the -10 log-ratio and +-10 estimate clamps
    for lp_old in (None, old):
        mine, g_mine = _vg(lambda a, o=lp_old: fo.compute_approx_kl(a, base, o, estimator, unbiased), lp)
        theirs, g_theirs = _vg(lambda a, o=lp_old: utils.compute_approx_kl(a, base, o, estimator, unbiased), lp)
        assert mine.dtype == theirs.dtype == torch.float32  # OpenRLHF computes the KL in float32
        assert_close(mine, theirs, torch.float32)
        assert_close(g_mine, g_theirs, torch.float32, "grad")


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_compute_approx_kl_forward_is_bitwise_openrlhfs(peer, estimator):
    # OpenRLHF evaluates k3 as exp(-d) - 1 + d; its own test (test_kl_estimator_gradient.py::
    # test_flag_off_matches_legacy) compares at allclose's default tolerance, which exp(-d) + d - 1 misses by ~6e-8
    utils, _ = peer
    for seed in range(4):
        lp, base = _rand((64, 97), 20 + seed, torch.float32, 0.5), _rand((64, 97), 30 + seed, torch.float32, 0.5)
        assert torch.equal(fo.compute_approx_kl(lp, base, kl_estimator=estimator),
                           utils.compute_approx_kl(lp, base, kl_estimator=estimator))


def _ppo_inputs(dtype, seed):
    lp = _rand((6, 13), seed, dtype, 0.3) - 1
    old = lp + _rand((6, 13), seed + 1, dtype, 0.3)
    rollout = old + _rand((6, 13), seed + 2, dtype, 0.2)
    adv = _rand((6, 13), seed + 3, dtype, 2)
    return lp, old, rollout, adv, _mask(seed=seed, dtype=dtype)


POLICY_CONFIGS = [
    {},
    {"clip_eps_low": 0.2, "clip_eps_high": 0.28, "dual_clip": 3.0},
    {"token_level_loss": False},
    {"policy_loss_type": "gspo", "clip_eps_low": 3e-4, "clip_eps_high": 4e-4},
    {"is_correction_level": "token", "is_correction_mode": "clip"},
    {"is_correction_level": "seq", "is_correction_mode": "mask", "is_correction_threshold": (0.8, 1.25)},
    {"is_correction_level": "token", "is_correction_gating": "tv", "is_correction_threshold": (0.0, 0.05)},
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", POLICY_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("global_batch", [False, True])
def test_policy_loss(peer, dtype, cfg, global_batch):
    _, loss = peer
    lp, old, rollout, adv, m = _ppo_inputs(dtype, 6)
    kw = {"dp_size": 2, "batch_num_tokens": 50.0, "global_batch_size": 7.0} if global_batch else {}
    mine_mod, peer_mod = fo.PolicyLoss(**cfg), loss.PolicyLoss(**cfg)
    (mine, *mine_stats), g_mine = _vg(lambda a: mine_mod(a, old, adv, m, rollout, **kw), lp)
    (theirs, *peer_stats), g_peer = _vg(lambda a: peer_mod(a, old, adv, m, rollout, **kw), lp)
    assert_close(mine, theirs, dtype)
    assert_close(g_mine, g_peer, dtype, "grad")
    for a, b in zip(mine_stats, peer_stats, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b, dtype)


def test_policy_loss_without_mask_and_constructor_checks(peer):
    _, loss = peer
    lp, old, _, adv, _ = _ppo_inputs(torch.float64, 7)
    mine = fo.PolicyLoss(dual_clip=2.0)(lp, old, adv)
    theirs = loss.PolicyLoss(dual_clip=2.0)(lp, old, adv)
    assert_close(mine[0], theirs[0], torch.float64)
    assert_close(mine[1], theirs[1], torch.float64)
    with pytest.raises(ValueError):
        fo.PolicyLoss(dual_clip=0.5)
    with pytest.raises(ValueError):
        fo.PolicyLoss(is_correction_level="seq", is_correction_mode="clip")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("token_level_loss", [True, False])
def test_value_loss(peer, dtype, clip_eps, token_level_loss):
    _, loss = peer
    v, old, ret = _rand((6, 13), 8, dtype), _rand((6, 13), 9, dtype), _rand((6, 13), 10, dtype)
    m = _mask(seed=8, dtype=dtype)
    mine_mod, peer_mod = fo.ValueLoss(clip_eps, token_level_loss), loss.ValueLoss(clip_eps, token_level_loss)
    for kw in ({}, {"dp_size": 2, "batch_num_tokens": 40.0, "global_batch_size": 5.0}):
        mine, g_mine = _vg(lambda a, kw=kw: mine_mod(a, old, ret, m, **kw), v)
        theirs, g_peer = _vg(lambda a, kw=kw: peer_mod(a, old, ret, m, **kw), v)
        assert_close(mine, theirs, dtype)
        assert_close(g_mine, g_peer, dtype, "grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.0, 0.5)])
def test_gae_and_cumulative_returns(dtype, gamma, lam):
    fns = load_openrlhf_returns()
    values, rewards = _rand((6, 13), 11, dtype), _rand((6, 13), 12, dtype)
    m = _mask(seed=11, dtype=dtype)
    adv, ret = fo.get_advantages_and_returns(values, rewards, m, gamma, lam)
    e_adv, e_ret = fns["get_advantages_and_returns"](values, rewards, m, gamma, lam)
    assert_close(adv, e_adv, dtype)
    assert_close(ret, e_ret, dtype)
    assert_close(fo.get_cumulative_returns(rewards, m, gamma), fns["get_cumulative_returns"](rewards, m, gamma), dtype)
