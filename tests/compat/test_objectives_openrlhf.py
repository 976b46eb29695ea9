"""``objective_from_policy_loss`` against OpenRLHF 0.11.2's own ``PolicyLoss`` (PPO with dual clip, GSPO, token-level
``is_correction`` clip / mask), ``compute_approx_kl`` and the actor loss ``ppo_actor.training_step`` composes: loss,
gradient w.r.t. the current log-probs (and entropies), and the metrics both compute. Fresh inputs per test, float64
unless OpenRLHF casts (its KL estimators work in float32), padded with holes and a fully padded row, per-token
advantages (OpenRLHF's GAE advantages). fastppo's side is the float64 reference (``fastppo.reference``).
"""

from __future__ import annotations

import zlib

import pytest
import torch

from fastppo.compat import openrlhf as fo
from fastppo.reference.kl import kl_penalty as ref_kl_penalty
from fastppo.reference.losses import ppo_loss_from_logprobs
from tests.compat.conftest import load_openrlhf
from tests.tolerances import assert_close

B, T = 6, 11
LOCAL: dict = {}
GLOBAL = {"dp_size": 2, "batch_num_tokens": 57.0, "global_batch_size": 9.0}


@pytest.fixture(scope="module")
def peer():
    return load_openrlhf()


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _inputs(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask &= torch.rand(B, T, generator=g) > 0.15
    mask[:, 0] = True
    mask[-1] = False  # a fully padded row
    r = lambda s=1.0: (torch.randn(B, T, generator=g, dtype=torch.float64) * s).to(dtype)  # noqa: E731
    lp = r(0.4) - 1.2
    old, adv = lp + r(0.3), r(1.0)
    old[0, :2] = lp[0, :2] - 1.5  # ratios e^1.5 beyond a dual clip of 3 (with A < 0) and the PPO clip (A > 0)
    adv[0, :2] = torch.tensor([-1.0, 1.0], dtype=dtype)
    return {"lp": lp, "old": old, "ref": lp + r(0.3), "rollout": old + r(0.1), "adv": adv,
            "entropy": torch.rand(B, T, generator=g, dtype=torch.float64).to(dtype) * 3, "mask": mask}


def _grad(fn, *xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    out = fn(*xs)
    loss = out[0] if isinstance(out, tuple) else out
    if loss.dim():
        up = torch.randn(loss.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
        loss = (loss * up.to(loss.dtype)).sum()  # the same upstream for a float32 peer and the float64 reference
    return out, torch.autograd.grad(loss, xs, allow_unused=True)


POLICY_CONFIGS = [
    {},
    {"clip_eps_low": 0.2, "clip_eps_high": 0.28, "dual_clip": 3.0},
    {"token_level_loss": False, "dual_clip": 3.0},
    {"policy_loss_type": "gspo", "clip_eps_low": 0.03, "clip_eps_high": 0.04},
    {"policy_loss_type": "gspo", "clip_eps_low": 0.03, "clip_eps_high": 0.04, "dual_clip": 1.05},
    {"is_correction_level": "token", "is_correction_mode": "clip", "is_correction_threshold": (0.9, 1.1)},
    {"is_correction_level": "token", "is_correction_mode": "mask", "is_correction_threshold": (0.9, 1.1)},
    {"is_correction_level": "token", "is_correction_mode": "mask", "is_correction_threshold": (0.0, 1.05),
     "dual_clip": 3.0},
    {"is_correction_level": "token", "is_correction_mode": "clip", "is_correction_threshold": (0.9, 1.1),
     "token_level_loss": False},
    # GSPO with the correction on: its ratio is taken against the rollout log-probs, no weight applied
    {"policy_loss_type": "gspo", "is_correction_level": "token", "clip_eps_low": 0.03, "clip_eps_high": 0.04},
]


def _ids(cfg):
    return ",".join(f"{k}={v}" for k, v in cfg.items()) or "default"


def _fastppo_policy(cfg, x, info, lp, dtype=torch.float64):
    obj = fo.objective_from_policy_loss(**cfg, **info)
    gspo_vs_rollout = cfg.get("policy_loss_type") == "gspo" and cfg.get("is_correction_level", "off") != "off"
    old = x["rollout"] if gspo_vs_rollout else x["old"]
    up = lambda t: t.to(torch.float64)  # noqa: E731  (the float64 reference, also for float32 peer runs)
    return ppo_loss_from_logprobs(up(lp), torch.zeros_like(up(lp)), up(old), up(x["adv"]), x["mask"],
                                  rollout_logprobs=up(x["rollout"]), objective=obj)


@pytest.mark.parametrize("cfg", POLICY_CONFIGS, ids=_ids)
@pytest.mark.parametrize("info", [LOCAL, GLOBAL], ids=["local", "global"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_policy_loss(peer, cfg, info, dtype):
    _, loss_mod = peer
    x = _inputs(_seed(_ids(cfg), tuple(info), str(dtype)), dtype)
    mod = loss_mod.PolicyLoss(**cfg)
    (loss, clip_ratio, _, vllm_kl, filtered), (g_peer,) = _grad(
        lambda a: mod(a, x["old"], x["adv"], x["mask"], x["rollout"], **info), x["lp"])
    (mine, stats), (g_mine,) = _grad(lambda a: _fastppo_policy(cfg, x, info, a, dtype), x["lp"])
    assert_close(mine, loss, dtype)
    assert_close(g_mine.to(dtype), g_peer, dtype, "grad")
    # OpenRLHF's clip ratio counts the tokens where the clipped surrogate is the smaller (before the dual clip):
    # fastppo's clipfrac. OpenRLHF counts its flags in float32 (``.float()``), hence that tolerance.
    assert_close(stats["clipfrac"], clip_ratio, torch.float32)
    assert 0.0 < float(stats["clipfrac"]) < 1.0
    if cfg.get("dual_clip") and cfg.get("policy_loss_type", "ppo") == "ppo":
        assert float(stats["dual_clipfrac"]) > 0.0  # the dual clip acts on these inputs
    if cfg.get("is_correction_mode") == "mask" and cfg.get("policy_loss_type", "ppo") == "ppo":
        # the tokens OpenRLHF's gate filters are those fastppo's mask zeroes
        assert_close(stats["rollout_masked_fraction"], filtered, torch.float32)
        assert 0.0 < float(filtered) < 1.0
    if cfg.get("is_correction_mode") == "clip":
        assert 0.0 < float(filtered) < 1.0  # the band truncates some tokens


@pytest.mark.parametrize("cfg", POLICY_CONFIGS, ids=_ids)
def test_the_adapter_runs_the_objective_where_representable(peer, cfg, monkeypatch):
    """fastppo's PolicyLoss computes every representable configuration through the objective (the plain token-level
    PPO through ``fastppo.ppo_policy_loss``), and equals OpenRLHF's."""
    _, loss_mod = peer
    calls = []
    real = fo.objective_terms
    monkeypatch.setattr(fo, "objective_terms", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = _inputs(_seed("adapter", _ids(cfg)))
    mine, (g_mine,) = _grad(lambda a: fo.PolicyLoss(**cfg)(a, x["old"], x["adv"], x["mask"], x["rollout"], **GLOBAL),
                            x["lp"])
    theirs, (g_peer,) = _grad(lambda a: loss_mod.PolicyLoss(**cfg)(a, x["old"], x["adv"], x["mask"], x["rollout"],
                                                                   **GLOBAL), x["lp"])
    assert calls
    assert_close(mine[0], theirs[0], torch.float64)
    assert_close(g_mine, g_peer, torch.float64, "grad")
    for a, b in zip(mine[1:], theirs[1:], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b, torch.float64)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_compute_approx_kl(peer, estimator, unbiased):
    """OpenRLHF's estimators (in float32) vs fastppo's kinds: k1 -> k1, k2 -> k2, k3 -> low_var_kl (equal through
    both implementations' clamps); ``unbiased_gradient`` without old log-probs -> the ``+`` kind (k2's gradient)."""
    utils, _ = peer
    x = _inputs(_seed("kl", estimator, unbiased), torch.float32)
    lp, ref = x["lp"], x["ref"]
    if estimator == "k3":  # k3's clamps: log-ratios beyond -10 (OpenRLHF bounds it) and estimates beyond 10
        lp[0, :3] = ref[0, :3] + torch.tensor([-14.0, -25.0, 12.0])
    kind = {"k1": "k1", "k2": "k2", "k3": "low_var_kl"}[estimator]
    if unbiased and kind != "k2":
        kind += "+"
    (theirs,), (g_peer,) = _grad(lambda a: (utils.compute_approx_kl(a, ref, kl_estimator=estimator,
                                                                    unbiased_gradient=unbiased),), lp)
    (mine,), (g_mine,) = _grad(lambda a: (ref_kl_penalty(a.double(), ref.double(), kind),), lp)
    assert_close(mine, theirs, torch.float32)
    assert_close(g_mine, g_peer, torch.float32, "grad")


def _openrlhf_actor_loss(loss_mod, utils, cfg, x, lp, entropy, info, kl_coef, estimator, entropy_coef):
    """``PPOActor.training_step`` (openrlhf/trainer/ray/ppo_actor.py l.303-353): the policy loss, plus
    ``kl_ctl * aggregate_loss(compute_approx_kl(lp, ref, old, estimator))``, minus ``entropy_coef *
    aggregate_loss(entropy)``, the side terms aggregated per token with the same ``loss_batch_info``."""
    mask = x["mask"]
    loss = loss_mod.PolicyLoss(**cfg)(lp, x["old"], x["adv"], mask, x["rollout"], **info)[0]
    side = {"dp_size": info.get("dp_size", 1), "batch_num_tokens": info.get("batch_num_tokens"),
            "global_batch_size": info.get("global_batch_size")}
    kl = utils.compute_approx_kl(lp, x["ref"], log_probs_old=x["old"], kl_estimator=estimator)
    loss = loss + kl_coef * loss_mod.aggregate_loss(kl, mask, **side)
    return loss - entropy_coef * loss_mod.aggregate_loss(entropy, mask, **side)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("info", [LOCAL, GLOBAL], ids=["local", "global"])
@pytest.mark.parametrize("cfg", [{"dual_clip": 3.0}, {"is_correction_level": "token", "is_correction_mode": "mask",
                                                      "is_correction_threshold": (0.9, 1.1)}], ids=_ids)
def test_actor_loss(peer, estimator, info, cfg):
    utils, loss_mod = peer
    # OpenRLHF's KL estimators cast to float32: float32 inputs, compared with that tolerance.
    x = _inputs(_seed("actor", estimator, tuple(info), _ids(cfg)), torch.float32)
    theirs, (g_peer, h_peer) = _grad(lambda a, h: _openrlhf_actor_loss(loss_mod, utils, cfg, x, a, h, info, 0.05,
                                                                       estimator, 0.01), x["lp"], x["entropy"])
    obj = fo.objective_from_policy_loss(**cfg, **info, kl_coef=0.05, kl_estimator=estimator, entropy_coef=0.01)
    d = lambda t: t.double()  # noqa: E731
    mine, (g_mine, h_mine) = _grad(lambda a, h: ppo_loss_from_logprobs(
        d(a), d(h), d(x["old"]), d(x["adv"]), x["mask"], ref_logprobs=d(x["ref"]), rollout_logprobs=d(x["rollout"]),
        objective=obj)[0], x["lp"], x["entropy"])
    assert_close(mine, theirs, torch.float32)
    assert_close(g_mine, g_peer, torch.float32, "grad")
    assert_close(h_mine, h_peer, torch.float32, "grad")


def test_gspo_entropy_bonus_is_a_local_token_mean(peer):
    """A per-sequence policy loss (GSPO) with OpenRLHF's token-level entropy bonus, local aggregation."""
    utils, loss_mod = peer
    cfg = {"policy_loss_type": "gspo", "clip_eps_low": 0.03, "clip_eps_high": 0.04}
    x = _inputs(_seed("gspo-entropy"))
    theirs, grads_peer = _grad(lambda a, h: loss_mod.PolicyLoss(**cfg)(a, x["old"], x["adv"], x["mask"])[0]
                               - 0.01 * loss_mod.aggregate_loss(h, x["mask"]), x["lp"], x["entropy"])
    obj = fo.objective_from_policy_loss(**cfg, entropy_coef=0.01)
    assert obj.entropy_agg == "token-mean"
    mine, grads_mine = _grad(lambda a, h: ppo_loss_from_logprobs(a, h, x["old"], x["adv"], x["mask"],
                                                                 objective=obj)[0], x["lp"], x["entropy"])
    assert_close(mine, theirs, torch.float64)
    for a, b in zip(grads_mine, grads_peer, strict=True):
        assert_close(a, b, torch.float64, "grad")


def test_mapping_fields():
    obj = fo.objective_from_policy_loss()
    assert (obj.policy_loss, obj.clip_low, obj.clip_high, obj.dual_clip, obj.agg) == ("ppo", 0.2, 0.2, None,
                                                                                      "token-mean")
    gspo = fo.objective_from_policy_loss(policy_loss_type="gspo", token_level_loss=True, **GLOBAL)
    assert (gspo.importance_sampling_level, gspo.agg, gspo.loss_normalizer) == ("sequence", "seq-mean-token-mean", 4.5)
    tis = fo.objective_from_policy_loss(is_correction_level="token", is_correction_mode="clip")
    assert (tis.rollout_is_level, tis.rollout_is_mode, tis.rollout_is_min, tis.rollout_is_max) == (
        "token", "truncate", 0.5, 5.0)  # OpenRLHF's TIS is two-sided, lower bound 0.5 by default
    icepop = fo.objective_from_policy_loss(is_correction_level="token", is_correction_threshold=(0.0, 2.0))
    assert (icepop.rollout_is_mode, icepop.rollout_is_min, icepop.rollout_is_max) == ("mask", None, 2.0)
    kl = fo.objective_from_policy_loss(kl_coef=0.01, kl_estimator="k3", **GLOBAL)
    assert (kl.kl_kind, kl.kl_coef, kl.loss_normalizer) == ("low_var_kl", 0.01, 28.5)


def test_not_representable():
    with pytest.raises(NotImplementedError, match="geometric-mean"):
        fo.objective_from_policy_loss(is_correction_level="seq")
    for gate in ("binary_kl", "tv"):
        with pytest.raises(NotImplementedError, match=gate):
            fo.objective_from_policy_loss(is_correction_level="token", is_correction_gating=gate,
                                          is_correction_threshold=(0.0, 0.1))
    with pytest.raises(NotImplementedError, match="unbiased_gradient"):
        fo.objective_from_policy_loss(kl_coef=0.01, unbiased_gradient=True)
    with pytest.raises(NotImplementedError, match="KL"):
        fo.objective_from_policy_loss(token_level_loss=False, kl_coef=0.01)
    with pytest.raises(NotImplementedError, match="entropy"):
        fo.objective_from_policy_loss(policy_loss_type="gspo", entropy_coef=0.01, **GLOBAL)
    with pytest.raises(ValueError, match="kl_estimator"):
        fo.objective_from_policy_loss(kl_coef=0.01, kl_estimator="k4")
    # GSPO never applies the correction weight: its seq level is representable (the ratio is against the rollout)
    assert fo.objective_from_policy_loss(policy_loss_type="gspo", is_correction_level="seq").rollout_is_level is None
