"""``objective_from_actor_config`` and the registry adapters against verl 0.9.1's own functions: the registered
policy losses (vanilla, gspo, sapo, cispo) with an ActorConfig, ``agg_loss`` with ``global_batch_info``,
``kl_penalty`` of every kind, the actor loss as ``verl.workers.utils.losses.ppo_loss`` composes it, and the decoupled
rollout correction's IS weights (``compute_rollout_correction_and_rejection_mask``) with the metrics fastppo also
computes. Loss and gradient w.r.t. the current log-probs (and entropies); fresh float64 inputs per test, padded, with
holes and a fully padded row. fastppo's side is the float64 reference (``fastppo.reference``).

verl divides each sequence of ``seq-mean-token-mean`` by ``|y| + 1e-8`` and its masked means by ``count + 1e-8``
(fastppo: exact means): those comparisons use the float32 row of the tolerance table (a ~1e-9 relative difference).
"""

from __future__ import annotations

import zlib

import pytest
import torch

import fastppo.compat as compat
from fastppo.compat import verl as fv
from fastppo.reference.kl import kl_penalty as ref_kl_penalty
from fastppo.reference.losses import agg_loss as ref_agg_loss
from fastppo.reference.losses import objective_agg, ppo_loss_from_logprobs
from fastppo.reference.objective import rollout_weights
from tests.compat.conftest import peer_module
from tests.tolerances import assert_close

ca = peer_module("verl.trainer.ppo.core_algos")
rc = peer_module("verl.trainer.ppo.rollout_corr_helper")
vcfg = peer_module("verl.workers.config")
valgo = peer_module("verl.trainer.config.algorithm")

B, T = 6, 11
LOSS_MODES = ["vanilla", "gspo", "sapo", "cispo"]
AGG = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
GLOBAL = {"dp_size": 2, "batch_num_tokens": 57, "global_batch_size": 9, "loss_scale_factor": 16}


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
    old[0, :2] = lp[0, :2] - 1.5  # ratios e^1.5 beyond verl's dual clip, with A < 0 and A > 0
    adv[0, :2] = torch.tensor([-1.0, 1.0], dtype=dtype)
    return {"lp": lp, "old": old, "ref": lp + r(0.3), "rollout": old + r(0.1), "adv": adv,
            "entropy": torch.rand(B, T, generator=g, dtype=torch.float64).to(dtype) * 3, "mask": mask}


def _actor(loss_mode="vanilla", **kw):
    """An ActorConfig (frozen: one per setting) with clip-higher, a dual clip and SAPO temperatures that are not
    verl's defaults, so the mapping has to carry each of them."""
    settings = dict(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=0.2,
                    clip_ratio_high=0.28, clip_ratio_c=2.5, tau_pos=0.8, tau_neg=1.25)
    if loss_mode == "cispo":
        settings.update(clip_ratio_low=0.5, clip_ratio_high=0.1)  # bounds the random ratios cross on both sides
    if loss_mode == "gspo":
        settings.update(clip_ratio_low=0.03, clip_ratio_high=0.04)  # sequence means of the log-ratios are small
    settings.update(kw)
    return vcfg.ActorConfig(policy_loss=vcfg.PolicyLossConfig(loss_mode=loss_mode), **settings)


def _f64(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def _tol(agg):
    return torch.float32 if agg == "seq-mean-token-mean" else torch.float64


def _grad(fn, *xs):
    """``(fn(*xs), d/dxs)``; a per-token output is reduced with a fixed random upstream gradient."""
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    out = fn(*xs)
    loss = out[0] if isinstance(out, tuple) else out
    if loss.dim():
        up = torch.randn(loss.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
        loss = (loss * up.to(loss.dtype)).sum()  # the same upstream for a float32 peer and the float64 reference
    grads = torch.autograd.grad(loss, xs, allow_unused=True)
    return out, grads


@pytest.mark.parametrize("loss_mode", LOSS_MODES)
@pytest.mark.parametrize("agg", AGG)
@pytest.mark.parametrize("global_info", [False, True])
def test_registered_policy_losses(loss_mode, agg, global_info):
    """verl's registered loss vs the reference with the mapped objective, and vs the registry adapter."""
    cfg = _actor(loss_mode, loss_agg_mode=agg)
    info = dict(GLOBAL) if global_info else {"dp_size": 1}
    cfg.global_batch_info.update(info)
    x = _inputs(_seed(loss_mode, agg, global_info))
    peer_fn = ca.POLICY_LOSS_REGISTRY[loss_mode]
    mine_fn = {"vanilla": fv.compute_policy_loss_vanilla, "gspo": fv.compute_policy_loss_gspo,
               "sapo": fv.compute_policy_loss_sapo, "cispo": fv.compute_policy_loss_cispo}[loss_mode]
    args = lambda a: (x["old"], a, x["adv"], x["mask"], agg, cfg, None)  # noqa: E731
    (peer, peer_metrics), (g_peer,) = _grad(lambda a: peer_fn(*args(a)), x["lp"])
    (mine, mine_metrics), (g_mine,) = _grad(lambda a: mine_fn(*args(a)), x["lp"])
    obj = fv.objective_from_actor_config(cfg)
    (ref, stats), (g_ref,) = _grad(lambda a: ppo_loss_from_logprobs(a, torch.zeros_like(a), x["old"], x["adv"],
                                                                    x["mask"], objective=obj), x["lp"])
    dt = _tol("seq-mean-token-mean" if loss_mode == "sapo" else agg)
    assert_close(ref, peer, dt)
    assert_close(g_ref, g_peer, dt, "grad")
    assert_close(mine, peer, dt)
    assert_close(g_mine, g_peer, dt, "grad")
    assert mine_metrics.keys() == peer_metrics.keys()
    for k in peer_metrics:
        assert mine_metrics[k] == pytest.approx(peer_metrics[k], rel=1e-6, abs=1e-9), k
    # fastppo's clip fractions are verl's (verl's masked mean has +1e-8 in the denominator)
    if loss_mode != "sapo":
        assert float(stats["clipfrac"]) == pytest.approx(peer_metrics["actor/pg_clipfrac"], rel=1e-6)
        assert 0.0 < float(stats["clipfrac"]) < 1.0  # the clip matters for these inputs
    if loss_mode == "vanilla":
        assert float(stats["dual_clipfrac"]) > 0.0
        assert float(stats["dual_clipfrac"]) == pytest.approx(peer_metrics["actor/pg_clipfrac_lower"], rel=1e-6,
                                                              abs=1e-12)


@pytest.mark.parametrize("loss_mode", LOSS_MODES)
def test_registered_policy_losses_with_rollout_weights(loss_mode):
    cfg = _actor(loss_mode, loss_agg_mode="token-mean")
    cfg.global_batch_info.update(dp_size=1)
    x = _inputs(_seed("weights", loss_mode))
    w = torch.rand(B, T, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 * x["mask"]
    mine_fn = getattr(fv, "compute_policy_loss_" + loss_mode)
    (peer, _), (g_peer,) = _grad(lambda a: ca.POLICY_LOSS_REGISTRY[loss_mode](x["old"], a, x["adv"], x["mask"],
                                                                             "token-mean", cfg, w), x["lp"])
    (mine, _), (g_mine,) = _grad(lambda a: mine_fn(x["old"], a, x["adv"], x["mask"], "token-mean", cfg, w), x["lp"])
    dt = _tol("seq-mean-token-mean" if loss_mode == "sapo" else "token-mean")
    assert_close(mine, peer, dt)
    assert_close(g_mine, g_peer, dt, "grad")


@pytest.mark.parametrize("mode", AGG)
@pytest.mark.parametrize("info", [{}, {"dp_size": 1, "batch_num_tokens": 37, "global_batch_size": 7},
                                  GLOBAL, {**GLOBAL, "loss_scale_factor": 6.5}], ids=["local", "dp1", "dp2", "frac"])
def test_agg_loss_with_global_batch_info(mode, info):
    x = _inputs(_seed("agg", mode, tuple(info.items())))
    obj = fv.objective_from_actor_config(_actor(), loss_agg_mode=mode, global_batch_info=info)
    (peer,), (g_peer,) = _grad(lambda a: (ca.agg_loss(a, x["mask"], mode, **info),), x["lp"])
    (mine,), (g_mine,) = _grad(lambda a: (ref_agg_loss(a, x["mask"], **objective_agg(obj)),), x["lp"])
    assert_close(mine, peer, _tol(mode))
    assert_close(g_mine, g_peer, _tol(mode), "grad")


KL_KINDS = ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "kl+", "k1+", "abs+", "mse+", "k2+", "low_var_kl+",
            "k3+"]


@pytest.mark.parametrize("kind", KL_KINDS)
def test_kl_penalty_kinds(kind):
    x = _inputs(_seed("kl", kind))
    lp, ref = x["lp"] * 3, x["ref"] * 3
    lp[0, :3] = torch.tensor([-40.0, 30.0, 12.0], dtype=lp.dtype)  # verl's +-20 log-ratio and +-10 estimate clamps
    obj = fv.objective_from_actor_config(_actor(use_kl_loss=True, kl_loss_type=kind))
    (peer,), (g_peer,) = _grad(lambda a: (ca.kl_penalty(a, ref, kind),), lp)
    (mine,), (g_mine,) = _grad(lambda a: (ref_kl_penalty(a, ref, obj.kl_kind),), lp)
    assert_close(mine, peer, torch.float64)
    assert_close(g_mine, g_peer, torch.float64, "grad")


def _verl_actor_loss(cfg, x, lp, entropy):
    """``verl.workers.utils.losses.ppo_loss`` (l.57-144) from verl's own pieces: the registered policy loss with
    ``config.loss_agg_mode``, minus ``entropy_coeff * agg_loss(entropy)``, plus ``kl_loss_coef *
    agg_loss(kl_penalty(lp, ref, kl_loss_type))`` when ``use_kl_loss``, all with ``global_batch_info``. (ppo_loss
    itself takes padded-free nested tensors from the engine; the composition is all it adds.)"""
    mask = x["mask"]
    pg, _ = ca.get_policy_loss_fn(cfg.policy_loss.loss_mode)(x["old"], lp, x["adv"], mask, cfg.loss_agg_mode, cfg,
                                                             None)
    loss = pg - cfg.entropy_coeff * ca.agg_loss(entropy, mask, cfg.loss_agg_mode, **cfg.global_batch_info)
    if cfg.use_kl_loss:
        kld = ca.kl_penalty(lp, x["ref"], cfg.kl_loss_type)
        loss = loss + cfg.kl_loss_coef * ca.agg_loss(kld, mask, cfg.loss_agg_mode, **cfg.global_batch_info)
    return loss


@pytest.mark.parametrize("loss_mode", LOSS_MODES)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("kl_type", [None, "low_var_kl", "k3+", "k2", "abs"])
@pytest.mark.parametrize("global_info", [False, True])
def test_actor_loss(loss_mode, agg, kl_type, global_info):
    kw = {"use_kl_loss": kl_type is not None, "kl_loss_type": kl_type or "low_var_kl", "kl_loss_coef": 0.05,
          "entropy_coeff": 0.01, "loss_agg_mode": agg}
    cfg = _actor(loss_mode, **kw)
    cfg.global_batch_info.update(GLOBAL if global_info else {"dp_size": 1})
    x = _inputs(_seed("actor", loss_mode, agg, kl_type, global_info))
    if loss_mode == "sapo" and agg != "seq-mean-token-mean" and (kl_type is not None or global_info):
        # verl aggregates SAPO's policy term per sequence but its KL / entropy with loss_agg_mode (and the global
        # counts): one objective cannot aggregate them differently.
        with pytest.raises(NotImplementedError, match="SAPO"):
            fv.objective_from_actor_config(cfg)
        return
    obj = fv.objective_from_actor_config(cfg)
    peer, g_peer = _grad(lambda a, h: _verl_actor_loss(cfg, x, a, h), x["lp"], x["entropy"])
    mine, g_mine = _grad(lambda a, h: ppo_loss_from_logprobs(a, h, x["old"], x["adv"], x["mask"],
                                                             ref_logprobs=x["ref"], objective=obj)[0],
                         x["lp"], x["entropy"])
    dt = torch.float32 if "seq-mean-token-mean" in (agg, obj.agg) else torch.float64
    assert_close(mine, peer, dt)
    for a, b in zip(g_mine, g_peer, strict=True):
        assert_close(a, b, dt, "grad")


ROLLOUT_SPECS = [("token", 1.5), ("token", "1.3"), ("token", "0.8_1.25"), ("sequence", 2.0), ("sequence", "0.5_2.0")]


@pytest.mark.parametrize("level,threshold", ROLLOUT_SPECS)
def test_rollout_correction_weights(level, threshold):
    x = _inputs(_seed("is", level, threshold))
    x["rollout"][0] += 0.4  # a sequence far above and one far below the thresholds (token noise crosses anyway)
    x["rollout"][1] -= 0.4
    out, mask_after, metrics = rc.compute_rollout_correction_and_rejection_mask(
        x["old"], x["rollout"], x["mask"], rollout_is=level, rollout_is_threshold=threshold)
    assert torch.equal(mask_after.bool(), x["mask"])  # no rejection sampling: the mask is unchanged
    peer_w = out.batch["rollout_is_weights"]
    cfg = valgo.RolloutCorrectionConfig(rollout_is=level, rollout_is_threshold=threshold)
    obj = fv.objective_from_actor_config(_actor(), rollout_correction=cfg)
    w, stats = rollout_weights(x["old"], x["rollout"], x["mask"], obj)
    assert_close(w, peer_w, torch.float64)
    icepop = isinstance(threshold, str) and "_" in threshold
    upper = float(str(threshold).rpartition("_")[2])
    valid = x["mask"]
    assert (w[valid] == upper).any() if not icepop else ((w == 0) & valid).any()  # the threshold acts
    # verl's masked means divide by count + 1e-8: float32 tolerance.
    assert_close(stats["rollout_is_mean"], _f64(metrics["rollout_corr/rollout_is_mean"]), torch.float32)
    if level == "token":  # at sequence level verl's max is of the untruncated sequence ratios, fastppo's of weights
        assert_close(stats["rollout_is_max"], _f64(metrics["rollout_corr/rollout_is_max"]), torch.float64)
    # ESS: verl computes 1 / E[(w / (E[w] + 1e-8))^2] with masked means over count + 1e-8, fastppo E[w]^2 / E[w^2]:
    # the same fraction up to those epsilons (relative ~1e-8 / E[w]).
    assert float(stats["rollout_is_ess"]) == pytest.approx(metrics["rollout_corr/rollout_is_eff_sample_size"],
                                                           rel=1e-6)
    if icepop:  # the out-of-band fraction of valid tokens is the fraction fastppo's mask zeroes
        assert float(stats["rollout_masked_fraction"]) == pytest.approx(metrics["rollout_corr/rollout_is_oob_ratio"],
                                                                        rel=1e-6)


@pytest.mark.parametrize("loss_mode", LOSS_MODES)
@pytest.mark.parametrize("level,threshold", [("token", 1.3), ("sequence", "0.5_2.0")])
def test_decoupled_rollout_correction_in_the_loss(loss_mode, level, threshold):
    """verl's decoupled mode: weights from old vs rollout log-probs multiply the policy term; fastppo computes the
    same weights from ``rollout_logprobs``."""
    cfg = _actor(loss_mode, loss_agg_mode="token-mean")
    cfg.global_batch_info.update(dp_size=1)
    x = _inputs(_seed("decoupled", loss_mode, level))
    out, _, _ = rc.compute_rollout_correction_and_rejection_mask(x["old"], x["rollout"], x["mask"], rollout_is=level,
                                                                 rollout_is_threshold=threshold)
    weights = out.batch["rollout_is_weights"]
    obj = fv.objective_from_actor_config(cfg, rollout_correction=valgo.RolloutCorrectionConfig(
        rollout_is=level, rollout_is_threshold=threshold))
    (peer, _), (g_peer,) = _grad(lambda a: ca.POLICY_LOSS_REGISTRY[loss_mode](x["old"], a, x["adv"], x["mask"],
                                                                             "token-mean", cfg, weights), x["lp"])
    (mine, _), (g_mine,) = _grad(lambda a: ppo_loss_from_logprobs(a, torch.zeros_like(a), x["old"], x["adv"],
                                                                  x["mask"], rollout_logprobs=x["rollout"],
                                                                  objective=obj), x["lp"])
    dt = _tol("seq-mean-token-mean" if loss_mode == "sapo" else "token-mean")
    assert_close(mine, peer, dt)
    assert_close(g_mine, g_peer, dt, "grad")


def test_patch_swaps_the_registered_losses():
    x = _inputs(_seed("patch"))
    originals = {m: ca.POLICY_LOSS_REGISTRY[m] for m in LOSS_MODES}
    before = {}
    for m in LOSS_MODES:
        cfg = _actor(m)
        cfg.global_batch_info.update(dp_size=1)
        before[m] = _grad(lambda a, m=m, cfg=cfg: ca.get_policy_loss_fn(m)(x["old"], a, x["adv"], x["mask"],
                                                                          "token-mean", cfg, None), x["lp"])
    try:
        replaced = compat.patch("verl")
        for m in ("gspo", "sapo", "cispo"):
            assert f"verl.trainer.ppo.core_algos.compute_policy_loss_{m}" in replaced
            assert ca.POLICY_LOSS_REGISTRY[m] is getattr(fv, f"compute_policy_loss_{m}")
        assert ca.POLICY_LOSS_REGISTRY["vanilla"] is fv.compute_policy_loss_vanilla
        for m in LOSS_MODES:
            cfg = _actor(m)
            cfg.global_batch_info.update(dp_size=1)
            (loss, metrics), (g,) = _grad(lambda a, m=m, cfg=cfg: ca.get_policy_loss_fn(m)(
                x["old"], a, x["adv"], x["mask"], "token-mean", cfg, None), x["lp"])
            (loss0, metrics0), (g0,) = before[m]
            dt = _tol("seq-mean-token-mean" if m == "sapo" else "token-mean")
            assert_close(loss, loss0, dt)
            assert_close(g, g0, dt, "grad")
            assert metrics.keys() == metrics0.keys()
    finally:
        compat.unpatch("verl")
    assert {m: ca.POLICY_LOSS_REGISTRY[m] for m in LOSS_MODES} == originals


def test_mapping_fields():
    base = vcfg.ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1)
    obj = fv.objective_from_actor_config(base)
    assert (obj.policy_loss, obj.clip_low, obj.clip_high, obj.dual_clip, obj.agg) == ("ppo", 0.2, 0.2, 3.0,
                                                                                      "token-mean")
    assert obj.kl_coef == 0.0 and obj.rollout_is_level is None
    gspo = fv.objective_from_actor_config(base, "gspo")
    assert (gspo.importance_sampling_level, gspo.dual_clip) == ("sequence_token", None)
    assert fv.objective_from_actor_config(base, "sapo", loss_agg_mode="token-mean").agg == "seq-mean-token-mean"
    kl = fv.objective_from_actor_config(_actor(use_kl_loss=True, kl_loss_type="k3", kl_loss_coef=0.01))
    assert (kl.kl_coef, kl.kl_kind) == (0.01, "low_var_kl")  # verl's "k3" is its clamped low_var_kl
    dp = fv.objective_from_actor_config(base, loss_agg_mode="token-sum", global_batch_info={"dp_size": 4})
    assert (dp.agg, dp.loss_normalizer) == ("token-mean", 0.25)
    tis = fv.objective_from_actor_config(base, rollout_correction=valgo.RolloutCorrectionConfig.decoupled_token_is())
    assert (tis.rollout_is_level, tis.rollout_is_mode, tis.rollout_is_min, tis.rollout_is_max) == (
        "token", "truncate", None, 2.0)
    icepop = valgo.RolloutCorrectionConfig.decoupled_token_icepop()
    ice = fv.objective_from_actor_config(base, rollout_correction=icepop)
    assert (ice.rollout_is_mode, ice.rollout_is_min, ice.rollout_is_max) == ("mask", 0.5, 5.0)
    # a DictConfig / plain mapping with verl's field names works too
    plain = fv.objective_from_actor_config({"clip_ratio": 0.1, "clip_ratio_low": None, "clip_ratio_high": None,
                                            "policy_loss": {"loss_mode": "vanilla"}, "global_batch_info": {}})
    assert (plain.clip_low, plain.clip_high, plain.dual_clip) == (0.1, 0.1, 3.0)


def test_not_representable():
    base = vcfg.ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1)
    for mode in ("dppo_tv", "dppo_kl", "gpg", "clip_cov", "kl_cov", "geo_mean", "dro", "bypass_mode"):
        assert mode in ca.POLICY_LOSS_REGISTRY
        with pytest.raises(NotImplementedError, match=mode):
            fv.objective_from_actor_config(base, mode)
    with pytest.raises(ValueError, match="Unsupported loss mode"):
        fv.objective_from_actor_config(base, "ppo")
    for bad in (valgo.RolloutCorrectionConfig(rollout_is="token", rollout_rs="token_k1", rollout_rs_threshold=2.0),
                valgo.RolloutCorrectionConfig(rollout_is="token", rollout_is_batch_normalize=True),
                valgo.RolloutCorrectionConfig.bypass_pg_is()):
        with pytest.raises(NotImplementedError):
            fv.objective_from_actor_config(base, rollout_correction=bad)
    with pytest.raises(NotImplementedError, match="full"):
        fv.objective_from_actor_config(_actor(use_kl_loss=True, kl_loss_type="full"))
    with pytest.raises(ValueError, match="batch_num_tokens"):
        fv.objective_from_actor_config(base, global_batch_info={"dp_size": 2})
