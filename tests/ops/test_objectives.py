"""Every objective setting of ``PPOObjective`` on every fused path: the four entry points (logits on torch, cpp and
the Triton interpreter; the fused LM head on the same; both vocabulary-parallel losses) give the float64 reference's
loss, gradient and statistics; the closed-form per-token derivatives equal autograd's."""

from __future__ import annotations

import pytest
import torch

from fastppo import PPOObjective
from fastppo import reference as ref
from fastppo.reference.objective import objective_terms, rollout_weights, token_term_grads
from tests.ops.ppo_harness import ENTRIES, B, T, call, make_inputs, one_rank_group  # noqa: F401  (fixture)
from tests.tolerances import assert_close

pytestmark = pytest.mark.usefixtures("one_rank_group")
F64 = torch.float64

BASE = {"kl_coef": 0.05, "entropy_coef": 0.01, "temperature": 0.9}
VARIANTS = {
    "cispo-trl": {"policy_loss": "cispo", "clip_low": 1.0, "clip_high": 4.0},
    "cispo-verl": {"policy_loss": "cispo", "clip_low": 0.2, "clip_high": 0.28},
    "sapo": {"policy_loss": "sapo", "agg": "seq-mean-token-mean"},
    "gspo": {"importance_sampling_level": "sequence", "agg": "seq-mean-token-mean"},
    "gspo-token": {"importance_sampling_level": "sequence_token", "clip_high": 0.28},
    "gspo-cispo": {"policy_loss": "cispo", "importance_sampling_level": "sequence", "clip_low": 1.0, "clip_high": 4.0},
    "low_var_kl": {"kl_kind": "low_var_kl", "kl_coef": 0.1},
    "k3+": {"kl_kind": "k3+", "kl_coef": 0.1},
    "k1+": {"kl_kind": "k1+", "kl_coef": 0.1},
    "kl-ratio-weighted": {"kl_ratio_weighted": True, "kl_coef": 0.04},
    "kl-ratio-weighted-sequence": {"kl_ratio_weighted": True, "importance_sampling_level": "sequence"},
    "dapo-normaliser": {"loss_normalizer": 50.0, "clip_high": 0.28},
    "dr-grpo": {"agg": "seq-mean-token-sum-norm", "max_completion_length": 8, "loss_normalizer": 3.0},
    "entropy-token-mean": {"agg": "seq-mean-token-mean", "entropy_agg": "token-mean"},
    "tis-token": {"rollout_is_level": "token", "rollout_is_mode": "truncate", "rollout_is_max": 1.1},
    "tis-two-sided": {"rollout_is_level": "token", "rollout_is_mode": "truncate", "rollout_is_min": 0.9,
                      "rollout_is_max": 1.1},
    "mis-sequence": {"rollout_is_level": "sequence", "rollout_is_mode": "mask", "rollout_is_min": 0.5,
                     "rollout_is_max": 2.0},
    "icepop": {"rollout_is_level": "token", "rollout_is_mode": "mask", "rollout_is_min": 0.8, "rollout_is_max": 1.25},
    "off-policy-mask": {"off_policy_mask_threshold": 0.02},
    "top-entropy": {"top_entropy_quantile": 0.5},
    "everything": {"policy_loss": "sapo", "importance_sampling_level": "sequence", "kl_kind": "low_var_kl+",
                   "kl_ratio_weighted": True, "rollout_is_level": "sequence", "rollout_is_mode": "truncate",
                   "rollout_is_max": 1.5, "off_policy_mask_threshold": 0.05, "top_entropy_quantile": 0.7,
                   "entropy_agg": "token-mean", "agg": "seq-mean-token-sum", "loss_normalizer": 4.0},
}


def _objective(name: str) -> PPOObjective:
    return PPOObjective(**{**BASE, **VARIANTS[name]})


@pytest.mark.parametrize("entry,backend", ENTRIES)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_entry_point_computes_every_objective(entry, backend, name):
    obj = _objective(name)
    x = make_inputs(seed=hash(name) % 1000)
    rollout = x["rollout"] if obj.rollout_is_level is not None or obj.off_policy_mask_threshold is not None else None
    on_logits = entry in ("logits", "vp_logits")
    logits = (x["hidden"] @ x["weight"].T).requires_grad_(on_logits)
    h = x["hidden"].clone().requires_grad_(not on_logits)
    w = x["weight"].clone().requires_grad_(not on_logits)
    loss, stats = call(entry, backend, {**x, "hidden": h, "weight": w, "logits": logits}, objective=obj,
                       rollout_logprobs=rollout)
    leaves = (logits,) if on_logits else (h, w)
    grads = torch.autograd.grad(loss * 1.3, leaves)  # an upstream gradient other than 1

    h64, w64 = x["hidden"].double().requires_grad_(), x["weight"].double().requires_grad_()
    logits64 = (h64 @ w64.T)
    logits64.retain_grad()
    want, want_stats = ref.ppo_loss_from_logits(logits64, x["labels"], x["old"].double(), x["adv"].double(),
                                                x["mask"], ref_logprobs=x["ref"].double(),
                                                rollout_logprobs=None if rollout is None else rollout.double(),
                                                objective=obj)
    (want * 1.3).backward()
    want_grads = (logits64.grad,) if on_logits else (h64.grad, w64.grad)
    assert_close(loss, want, torch.float32)
    for got, exp in zip(grads, want_grads, strict=True):
        assert_close(got, exp, torch.float32, "grad")
    assert set(stats) == set(want_stats), set(stats) ^ set(want_stats)
    for k in want_stats:
        assert_close(stats[k], want_stats[k], torch.float32)


def _token_inputs(seed: int, kind: str, n: int = 64):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(n, generator=g, dtype=F64) * 4 - 0.1
    old = lp + 0.4 * torch.randn(n, generator=g, dtype=F64)
    old[:2] = lp[:2] + torch.tensor([-25.0, 25.0], dtype=F64)  # beyond the log-ratio clamp, both sides
    ref_lp = lp + 0.5 * torch.randn(n, generator=g, dtype=F64)
    if kind.startswith("low_var_kl"):  # its input clamp (elsewhere exp(30) terms would cancel to rounding noise)
        ref_lp[2] = lp[2] + 30.0
    adv = torch.randn(n, generator=g, dtype=F64)
    w = torch.rand(n, generator=g, dtype=F64) + 0.5
    return lp, old, ref_lp, adv, w


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "abs", "low_var_kl", "k1+", "k3+", "abs+", "low_var_kl+"])
@pytest.mark.parametrize("policy", ["ppo", "ppo-dual", "cispo", "cispo-no-lower", "sapo"])
@pytest.mark.parametrize("ratio_weighted", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_closed_form_token_derivatives_equal_autograd(kind, policy, ratio_weighted, weighted):
    lp, old, ref_lp, adv, w = _token_inputs(len(kind) + len(policy), kind)
    extra = {"ppo": {}, "ppo-dual": {"dual_clip": 2.0}, "cispo": {"policy_loss": "cispo", "clip_high": 0.28},
             "cispo-no-lower": {"policy_loss": "cispo", "clip_low": 1.0, "clip_high": 4.0},
             "sapo": {"policy_loss": "sapo"}}[policy]
    obj = PPOObjective(kl_kind=kind, kl_ratio_weighted=ratio_weighted, kl_coef=0.1, **extra)
    mask = torch.ones_like(lp)
    x = lp.clone().requires_grad_()
    t = objective_terms(x, torch.zeros_like(x), old, adv, mask, ref_lp, obj, is_weight=w if weighted else None)
    dpg_auto = torch.autograd.grad(t["pg"].sum(), x, retain_graph=True)[0]
    dkl_auto = torch.autograd.grad(t["kl"].sum(), x)[0]
    dpg, dkl = token_term_grads(lp, old, adv, ref_lp, obj, is_weight=w if weighted else None)
    assert_close(dpg, dpg_auto, F64, "grad")
    assert_close(dkl, dkl_auto, F64, "grad")


def test_rollout_weights_follow_their_definition():
    x = make_inputs(seed=5)
    old, roll, m = x["old"].double(), x["rollout"].double(), x["mask"]
    lr = (old - roll) * m
    tok = torch.exp(lr)
    seq = torch.exp(lr.sum(-1, keepdim=True)).expand_as(lr)
    cases = {
        ("token", "truncate", None, 1.1): tok.clamp(max=1.1),
        ("token", "truncate", 0.9, 1.1): tok.clamp(0.9, 1.1),
        ("token", "mask", 0.8, 1.25): torch.where((tok >= 0.8) & (tok <= 1.25), tok, 0.0),
        ("sequence", "mask", 0.5, 2.0): torch.where((seq >= 0.5) & (seq <= 2.0), seq, 0.0),
        ("sequence", "truncate", None, 1.5): seq.clamp(max=1.5),
    }
    for (level, mode, lo, hi), want in cases.items():
        obj = PPOObjective(rollout_is_level=level, rollout_is_mode=mode, rollout_is_min=lo, rollout_is_max=hi)
        w, stats = rollout_weights(old, roll, m, obj)
        assert_close(w, want * m, F64)
        valid = m != 0
        assert_close(stats["rollout_is_mean"], want[valid].mean(), F64)
        assert_close(stats["rollout_is_ess"], want[valid].mean() ** 2 / want[valid].square().mean(), F64)
        assert_close(stats["rollout_logp_diff_max"], (old - roll)[valid].abs().max(), F64)
    assert (rollout_weights(old, roll, m, PPOObjective(rollout_is_level="token", rollout_is_mode="mask",
                                                       rollout_is_min=0.8, rollout_is_max=1.25))[0][m != 0] == 0).any()


def test_sequence_level_ratio_is_the_sequence_geometric_mean():
    x = make_inputs(seed=8)
    lp, old, m = x["old"].double() + 0.1, x["old"].double(), x["mask"]
    obj = PPOObjective(importance_sampling_level="sequence")
    t = objective_terms(lp * m, torch.zeros_like(lp), old * m, x["adv"].double(), m, None, obj)
    want = torch.exp(((lp - old) * m).sum(-1) / m.sum(-1))
    assert_close(t["ratio"][:, 0], want, F64)
    assert torch.equal(t["ratio"], t["ratio"][:, :1].expand(B, T))


def test_settings_that_work_per_sequence_need_b_t_shapes():
    x = make_inputs()
    flat = {k: v.reshape(-1) if k in ("old", "adv", "ref", "rollout", "mask") else v for k, v in x.items()}
    flat["hidden"] = x["hidden"].reshape(-1, x["hidden"].shape[-1])
    flat["labels"] = x["labels"].reshape(-1)
    for setting in ({"importance_sampling_level": "sequence"}, {"off_policy_mask_threshold": 0.1},
                    {"rollout_is_level": "sequence"}):
        with pytest.raises(ValueError, match="per sequence"):
            call("logits", "torch", flat, rollout_logprobs=flat["rollout"], **setting)


def test_rollout_correction_needs_the_rollout_logprobs():
    with pytest.raises(ValueError, match="rollout_logprobs"):
        call("hidden", "torch", make_inputs(), rollout_is_level="token")
    with pytest.raises(ValueError, match="rollout_is_min"):
        PPOObjective(rollout_is_level="token", rollout_is_max=None)
    with pytest.raises(ValueError, match="dual_clip"):
        PPOObjective(policy_loss="cispo", dual_clip=3.0)
