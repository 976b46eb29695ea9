"""fastppo.compat.verl against the real verl functions: values and gradients, fp32/fp64, padded masks with
holes, every aggregation mode, GRPO/RLOO/REINFORCE++ against verl's own estimators."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastppo import reference as fastppo_ref
from fastppo.compat import verl as fv
from tests.compat.conftest import peer_module
from tests.tolerances import assert_close

ca = peer_module("verl.trainer.ppo.core_algos")
vF = peer_module("verl.utils.torch_functional")

DTYPES = [torch.float32, torch.float64]
AGG = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _mask(B=6, T=13, seed=0, dtype=torch.float32, holes=True):
    g = _gen(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    m = torch.arange(T)[None, :] < lengths[:, None]
    if holes:  # observation tokens inside a response (multi-turn): mask 0 between valid tokens
        m &= torch.rand(B, T, generator=g) > 0.2
        m[:, 0] = True
    m[-1] = False  # a fully padded row
    return m.to(dtype)


def _rand(shape, seed, dtype, scale=1.0):
    return (torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype)


def _vg(fn, inputs, argnums, seed=99):
    """Call ``fn(*inputs)`` with grads on ``argnums``; return (first output, grads) under a random upstream."""
    xs = [x.detach().clone().requires_grad_(i in argnums) if torch.is_tensor(x) and x.is_floating_point() else x
          for i, x in enumerate(inputs)]
    out = fn(*xs)
    first = out[0] if isinstance(out, tuple) else out
    up = torch.randn(first.shape, generator=_gen(seed), dtype=torch.float64)
    (first.double() * up).sum().backward()
    return out, [xs[i].grad for i in argnums]


@pytest.mark.parametrize("dtype", DTYPES)
def test_logprobs_and_entropy(dtype):
    g = _gen(1)
    logits = (torch.randn(3, 7, 131, generator=g, dtype=torch.float64) * 2).to(dtype)
    labels = torch.randint(0, 131, (3, 7), generator=g)
    mine, g_mine = _vg(fv.logprobs_from_logits, [logits, labels], [0])
    peer, g_peer = _vg(vF.logprobs_from_logits, [logits, labels], [0])
    assert_close(mine, peer, dtype)
    assert_close(g_mine[0], g_peer[0], dtype, "grad")
    mine, g_mine = _vg(fv.entropy_from_logits, [logits], [0])
    peer, g_peer = _vg(vF.entropy_from_logits, [logits], [0])
    assert_close(mine, peer, dtype)
    assert_close(g_mine[0], g_peer[0], dtype, "grad")
    assert_close(fv.entropy_from_logits_with_chunking(logits.reshape(21, 131)),
                 vF.entropy_from_logits_with_chunking(logits.reshape(21, 131), chunk_size=4), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_stats(dtype):
    x = _rand((6, 13), 2, dtype, scale=3)
    m = _mask(seed=2, dtype=dtype)
    x = torch.where(m.bool(), x, torch.full_like(x, float("nan")))  # NaN outside the mask must not leak in
    assert_close(fv.masked_mean(x, m), vF.masked_mean(x, m), dtype)
    torch.testing.assert_close(fv.masked_mean(x, m, axis=-1), vF.masked_mean(x, m, axis=-1))
    for unbiased in (True, False):
        assert_close(fv.masked_var(x, m, unbiased), vF.masked_var(x, m, unbiased), dtype)
    for shift in (True, False):
        mine, peer = fv.masked_whiten(x, m, shift), vF.masked_whiten(x, m, shift)
        torch.testing.assert_close(mine, peer, equal_nan=True)
    one = torch.zeros_like(m)
    one[0, 0] = 1
    with pytest.raises(ValueError, match="sum of the mask is one"):
        fv.masked_var(x, one)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.0, 0.0)])
def test_gae(dtype, gamma, lam):
    r, v = _rand((6, 13), 3, dtype), _rand((6, 13), 4, dtype)
    m = _mask(seed=3, dtype=dtype)
    adv, ret = fv.compute_gae_advantage_return(r, v, m, gamma, lam)
    e_adv, e_ret = ca.compute_gae_advantage_return(r, v, m, gamma, lam)  # floats, as verl's trainer passes
    assert_close(adv, e_adv, dtype)
    assert_close(ret, e_ret, dtype)


def _uids(B, n_groups, seed):
    g = np.random.default_rng(seed)
    return np.array([f"uid-{i}" for i in g.integers(0, n_groups, B)], dtype=object)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("name", ["compute_grpo_outcome_advantage", "compute_grpo_vectorized_outcome_advantage"])
def test_grpo(dtype, norm, name):
    B, T = 17, 9
    m = _mask(B, T, seed=5, dtype=dtype, holes=False)
    rewards = torch.zeros(B, T, dtype=dtype)
    rewards[:, 3] = _rand((B,), 5, dtype, scale=2)
    idx = _uids(B, 5, 5)
    idx[0] = "singleton"
    mine, mine2 = getattr(fv, name)(rewards, m, idx, norm_adv_by_std_in_grpo=norm)
    peer, _ = getattr(ca, name)(rewards.clone(), m, idx, norm_adv_by_std_in_grpo=norm)
    assert mine is mine2
    assert_close(mine, peer, peer.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["compute_rloo_outcome_advantage", "compute_rloo_vectorized_outcome_advantage"])
def test_rloo(dtype, name):
    B, T = 15, 6
    m = _mask(B, T, seed=6, dtype=dtype, holes=False)
    rewards = _rand((B, T), 6, dtype) * m
    idx = _uids(B, 4, 6)
    idx[3] = "alone"
    mine, _ = getattr(fv, name)(rewards, m, idx)
    peer, _ = getattr(ca, name)(rewards.clone(), m, idx)
    assert_close(mine, peer, peer.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_plus_plus(dtype, gamma):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"gamma": gamma})
    r, m = _rand((6, 13), 7, dtype), _mask(seed=7, dtype=dtype)
    adv, ret = fv.compute_reinforce_plus_plus_outcome_advantage(r, m, config=cfg)
    e_adv, e_ret = ca.compute_reinforce_plus_plus_outcome_advantage(r, m, config=cfg)
    assert_close(ret, e_ret, dtype)
    assert_close(adv, e_adv, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", AGG)
def test_agg_loss(dtype, mode):
    x, m = _rand((6, 13), 8, dtype), _mask(seed=8, dtype=dtype)
    mine, g_mine = _vg(lambda a: fv.agg_loss(a, m, mode), [x], [0])
    peer, g_peer = _vg(lambda a: ca.agg_loss(a, m, mode), [x], [0])
    assert_close(mine, peer, dtype)
    assert_close(g_mine[0], g_peer[0], dtype, "grad")
    kw = {"dp_size": 2, "batch_num_tokens": 40, "global_batch_size": 9, "loss_scale_factor": 7}
    assert_close(fv.agg_loss(x, m, mode, **kw), ca.agg_loss(x, m, mode, **kw), dtype)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_fastppo_agg_modes_mean_what_verl_means(mode):
    """fastppo's own ``agg=`` modes carry verl's names: the same name must give verl's number (up to verl's
    ``+1e-8`` per-sequence epsilon in seq-mean-token-mean, hence the float32 tolerance on fp64 inputs)."""
    x, m = _rand((6, 13), 18, torch.float64), _mask(seed=18, dtype=torch.float64)
    assert_close(fastppo_ref.agg_loss(x, m, mode), ca.agg_loss(x, m, mode), torch.float32)


def _ppo_inputs(dtype, seed):
    lp = _rand((6, 13), seed, dtype) * 0.3 - 1
    old = lp.detach() + _rand((6, 13), seed + 1, dtype) * 0.3
    adv = _rand((6, 13), seed + 2, dtype) * 2
    return old, lp, adv, _mask(seed=seed, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", AGG)
@pytest.mark.parametrize("weighted", [False, True])
def test_policy_loss_vanilla_with_actor_config(dtype, mode, weighted):
    from verl.workers.config import ActorConfig

    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_high=0.28,
                      clip_ratio_c=2.5)
    old, lp, adv, m = _ppo_inputs(dtype, 10)
    w = _rand((6, 13), 20, dtype).abs() if weighted else None  # rollout importance weights
    (mine, mine_stats), g_mine = _vg(lambda a: fv.compute_policy_loss_vanilla(old, a, adv, m, mode, cfg, w), [lp], [0])
    (peer, peer_stats), g_peer = _vg(lambda a: ca.compute_policy_loss_vanilla(old, a, adv, m, mode, cfg, w), [lp], [0])
    assert_close(mine, peer, dtype)
    assert_close(g_mine[0], g_peer[0], dtype, "grad")
    assert mine_stats.keys() == peer_stats.keys()
    for k in peer_stats:
        assert mine_stats[k] == pytest.approx(peer_stats[k], rel=1e-6, abs=1e-7), k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_legacy_compute_policy_loss(dtype, mode):
    old, lp, adv, m = _ppo_inputs(dtype, 11)
    mine, g_mine = _vg(lambda a: fv.compute_policy_loss(old, a, adv, m, 0.2, None, 0.3, 3.0, mode), [lp], [0])
    with pytest.warns(FutureWarning):
        peer, g_peer = _vg(lambda a: ca.compute_policy_loss(old, a, adv, m, 0.2, None, 0.3, 3.0, mode), [lp], [0])
    for a, b in zip(mine, peer, strict=True):
        assert_close(a, b, dtype)
    assert_close(g_mine[0], g_peer[0], dtype, "grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_value_loss(dtype, mode):
    vpreds, ret, values = _rand((6, 13), 12, dtype), _rand((6, 13), 13, dtype), _rand((6, 13), 14, dtype)
    m = _mask(seed=12, dtype=dtype)
    (mine, mine_cf), g_mine = _vg(lambda a: fv.compute_value_loss(a, ret, values, m, 0.5, mode), [vpreds], [0])
    (peer, peer_cf), g_peer = _vg(lambda a: ca.compute_value_loss(a, ret, values, m, 0.5, mode), [vpreds], [0])
    assert_close(mine, peer, dtype)
    assert_close(mine_cf, peer_cf, dtype)
    assert_close(g_mine[0], g_peer[0], dtype, "grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k3+", "low_var_kl+", "k1+"])
def test_kl_penalty(dtype, kind):
    lp = _rand((6, 13), 15, dtype) * 3
    ref = _rand((6, 13), 16, dtype) * 3
    lp[0, :3] = torch.tensor([-40.0, 30.0, 12.0], dtype=dtype)  # hit the +-20 log-ratio and +-10 estimate clamps
    mine, g_mine = _vg(lambda a: fv.kl_penalty(a, ref, kind), [lp], [0])
    peer, g_peer = _vg(lambda a: ca.kl_penalty(a, ref, kind), [lp], [0])
    assert_close(mine, peer, dtype)
    assert_close(g_mine[0], g_peer[0], dtype, "grad")
    with pytest.raises(NotImplementedError):
        fv.kl_penalty(lp, ref, "full")
    if kind in ("low_var_kl", "k3", "kl", "k1", "abs"):
        assert torch.equal(mine, peer)  # verl's own operation order, bit for bit
