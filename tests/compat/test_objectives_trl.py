"""``objective_from_grpo_config`` against TRL 1.16's own ``GRPOTrainer._compute_loss``: loss, gradients w.r.t. the
current log-probs and entropies, and the metrics both compute, for every GRPOConfig option fastppo represents.

TRL's loss method runs unchanged on a stand-in ``self`` that holds only what it reads (the trainer attributes, the
config fields, a single-process accelerator) and whose ``_get_per_token_logps_and_entropies`` returns the test's
log-probs and entropies: the model forward is not what is compared here. fastppo's side is the float64 reference
``fastppo.reference.losses.ppo_loss_from_logprobs`` with the mapped objective (the public entry points equal the
reference: tests/ops). Inputs are fresh per test, float64 unless a test says otherwise, padded, with holes and a fully
padded row (TRL's ``mask_truncated_completions`` zeroes such rows).
"""

from __future__ import annotations

import math
import types
import zlib
from collections import defaultdict

import pytest
import torch

from fastppo.compat import trl as ft
from fastppo.reference.losses import ppo_loss_from_logprobs
from tests.compat.conftest import peer_module
from tests.tolerances import assert_close

grpo = peer_module("trl.trainer.grpo_trainer")
GRPOTrainer = grpo.GRPOTrainer

B, T = 6, 9


class _Accelerator:
    """One process: gather/reduce are the identity (TRL's metrics then use this process's numbers)."""

    sync_gradients = True

    def __init__(self, num_processes: int = 1) -> None:
        self.num_processes = num_processes

    def gather(self, x):
        return x.reshape(-1) if x.dim() == 0 else x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def _config(**over):
    """The GRPOConfig fields as a plain namespace (a real GRPOConfig is a TrainingArguments: slow, and it needs an
    output directory). TRL's defaults, then the test's settings."""
    cfg = dict(ft.GRPO_CONFIG_DEFAULTS)
    cfg.update(vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0, entropy_target=0.2)
    cfg.update(over)
    if cfg["steps_per_generation"] is None:
        cfg["steps_per_generation"] = cfg["gradient_accumulation_steps"]
    return types.SimpleNamespace(**cfg)


def _trainer(args, logps, entropies, num_processes=1):
    """The ``self`` GRPOTrainer._compute_loss reads: trainer attributes as GRPOTrainer.__init__ sets them from
    ``args``, TRL's own mask helpers, and log-probs / entropies in place of the model forward."""
    s = types.SimpleNamespace(
        args=args, accelerator=_Accelerator(num_processes), model=types.SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        current_gradient_accumulation_steps=args.gradient_accumulation_steps, aux_loss_enabled=False,
        loss_type=args.loss_type, importance_sampling_level=args.importance_sampling_level, beta=args.beta,
        epsilon_low=args.epsilon, epsilon_high=args.epsilon if args.epsilon_high is None else args.epsilon_high,
        use_vllm=args.use_vllm, vllm_importance_sampling_correction=args.vllm_importance_sampling_correction,
        vllm_importance_sampling_mode=args.vllm_importance_sampling_mode,
        max_completion_length=args.max_completion_length, top_entropy_quantile=args.top_entropy_quantile,
        off_policy_mask_threshold=args.off_policy_mask_threshold, entropy_coef=args.entropy_coef,
        use_adaptive_entropy=args.use_adaptive_entropy,
        _entropy_bonus_enabled=args.entropy_coef != 0.0 or args.use_adaptive_entropy,
    )
    s._get_per_token_logps_and_entropies = lambda *a, **k: (logps, entropies, None)
    s.get_off_policy_mask = GRPOTrainer.get_off_policy_mask
    s.get_gamma_weights = GRPOTrainer.get_gamma_weights
    s.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, s)
    return s


def _vllm_is_ratio(args, old, sampling, mask):
    """``inputs["importance_sampling_ratio"]`` as TRL's ``_generate_and_score_completions`` builds it (no grad):
    ``exp`` of ``old - sampling`` per token or summed over the sequence, then truncated or masked to the band."""
    d = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if args.vllm_importance_sampling_mode.startswith("sequence"):
        d = d.sum(-1, keepdim=True)
    rho = torch.exp(d)
    lo, hi = args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max
    if args.vllm_importance_sampling_mode.endswith("truncate"):
        return rho.clamp(min=lo, max=hi)
    out_of_band = (rho < (-math.inf if lo is None else lo)) | (rho > (math.inf if hi is None else hi))
    return rho.masked_fill(out_of_band, 0.0)


def _seed(*parts) -> int:
    """A per-test seed that does not change between runs (``hash`` of a string does)."""
    return zlib.crc32(repr(parts).encode())


def _inputs(seed, dtype=torch.float64, sampling_noise=0.1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask &= torch.rand(B, T, generator=g) > 0.15  # tool-output holes inside a completion
    mask[:, 0] = True
    mask[-1] = False  # a fully padded row
    mask = mask.long()  # TRL's completion_mask dtype
    r = lambda s=1.0: (torch.randn(B, T, generator=g, dtype=torch.float64) * s).to(dtype)  # noqa: E731
    base = r(0.4) - 1.2
    # Entropies exactly representable in float32: TRL takes the quantile of float32 entropies, fastppo of float64.
    ent = (torch.rand(B, T, generator=g, dtype=torch.float64) * 3).float().to(dtype)
    return {
        "logps": base, "entropies": ent, "mask": mask,
        "old": base + r(0.15), "ref": base + r(0.2), "sampling": base + r(sampling_noise),
        "adv": torch.randn(B, generator=g, dtype=torch.float64).to(dtype),
    }


def _run_trl(args, x, num_processes=1, num_items=None):
    lp = x["logps"].clone().requires_grad_(True)
    ent = x["entropies"].clone().requires_grad_(True)
    mask = x["mask"]
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask, "advantages": x["adv"],
        "old_per_token_logps": x["old"], "ref_per_token_logps": x["ref"], "sampling_per_token_logps": x["sampling"],
        "num_items_in_batch": mask.sum() if num_items is None else torch.tensor(num_items),
    }
    if args.use_vllm and args.vllm_importance_sampling_correction:
        inputs["importance_sampling_ratio"] = _vllm_is_ratio(args, x["old"], x["sampling"], mask)
    s = _trainer(args, lp, ent, num_processes)
    loss = GRPOTrainer._compute_loss(s, None, inputs)
    g_lp, g_ent = torch.autograd.grad(loss, [lp, ent], allow_unused=True)
    metrics = {k: v[-1] for k, v in s._metrics["train"].items()}
    return loss.detach(), g_lp, g_ent, metrics


def _run_fastppo(args, x, num_processes=1, num_items=None):
    lp = x["logps"].clone().requires_grad_(True)
    ent = x["entropies"].clone().requires_grad_(True)
    mask = x["mask"]
    obj = ft.objective_from_grpo_config(args, num_items_in_batch=mask.sum() if num_items is None else num_items,
                                        num_processes=num_processes, completion_mask=mask)
    adv = x["adv"][:, None].expand(B, T)
    loss, stats = ppo_loss_from_logprobs(lp, ent, x["old"], adv, mask, ref_logprobs=x["ref"],
                                         rollout_logprobs=x["sampling"], objective=obj)
    g_lp, g_ent = torch.autograd.grad(loss, [lp, ent], allow_unused=True)
    return loss.detach(), g_lp, g_ent, stats


def _compare(args, x, dtype=torch.float64, **kw):
    loss_t, g_t, h_t, metrics = _run_trl(args, x, **kw)
    loss_f, g_f, h_f, stats = _run_fastppo(args, x, **kw)
    assert_close(loss_f, loss_t, dtype)
    assert_close(g_f, g_t, dtype, "grad")
    if h_t is None:  # no entropy bonus in TRL: no gradient reaches the entropies
        assert h_f is None or not h_f.any()
    else:
        assert_close(h_f, h_t, dtype, "grad")
    # The metrics both compute: the entropy and the (bias-corrected) KL means over valid tokens, and at token level
    # the PPO clip fraction (TRL's region_mean: low-clipped with A < 0 or high-clipped with A > 0, fastppo's clipfrac:
    # where the clipped branch is the larger loss -- the same tokens). At sequence level TRL averages the per-row flag
    # over all rows, fastppo over tokens; CISPO's TRL metric also requires A > 0: neither is compared. TRL counts the
    # clipped flags in float32 (``.float()``), hence that tolerance.
    assert_close(stats["entropy"], torch.tensor(metrics["entropy"], dtype=torch.float64), dtype)
    if args.beta != 0.0:
        assert_close(stats["kl"], torch.tensor(metrics["kl"], dtype=torch.float64), dtype)
    if args.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo") and args.importance_sampling_level == "token":
        assert_close(stats["clipfrac"], torch.tensor(metrics["clip_ratio/region_mean"], dtype=torch.float64),
                     torch.float32)


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]
KL = [(0.0, True), (0.04, False), (0.04, True)]


def _loss_type_settings(loss_type):
    """TRL recommends epsilon_high=5 for CISPO (an absolute cap); clip-higher for the PPO types. SAPO's temperatures
    are float32 numbers: TRL builds them with ``torch.where(A > 0, tau_pos, tau_neg)`` from Python floats, i.e. as
    a float32 tensor, so its default 1.05 is 1.0499999523 (a 6e-9 loss difference against an exact 1.05, TRL's
    rounding, not a different formula; verl builds them in the advantages' dtype)."""
    return {"epsilon_high": 5.0 if loss_type == "cispo" else 0.28, "max_completion_length": T + 3,
            "sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.25}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta,bias_corrected", KL, ids=["beta0", "beta.04", "beta.04-biascorr"])
def test_loss_types(loss_type, level, beta, bias_corrected):
    args = _config(loss_type=loss_type, importance_sampling_level=level, beta=beta,
                   use_bias_correction_kl=bias_corrected, **_loss_type_settings(loss_type))
    _compare(args, _inputs(_seed(loss_type, level, beta, bias_corrected)))


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "sapo", "cispo"])
def test_float32(loss_type):
    args = _config(loss_type=loss_type, beta=0.04, **_loss_type_settings(loss_type))
    _compare(args, _inputs(7, dtype=torch.float32), dtype=torch.float32)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("grpo", "sequence"), ("cispo", "token")])
def test_vllm_importance_sampling(mode, loss_type, level):
    # Bounds the random sampler noise crosses on both sides, so every mode truncates / masks some units.
    lo, hi = (0.9, 1.1) if mode.startswith("token") else (0.7, 1.4)
    args = _config(loss_type=loss_type, importance_sampling_level=level, beta=0.04, use_vllm=True,
                   vllm_importance_sampling_correction=True, vllm_importance_sampling_mode=mode,
                   vllm_importance_sampling_clip_min=lo, vllm_importance_sampling_clip_max=hi,
                   **_loss_type_settings(loss_type))
    x = _inputs(_seed(mode, loss_type), sampling_noise=0.15)
    x["sampling"][0] += 0.3  # row 0's ratios below the band, row 1's above (whatever the noise)
    x["sampling"][1] -= 0.3
    raw = _vllm_is_ratio(_config(vllm_importance_sampling_mode=mode.replace("mask", "truncate"),
                                 vllm_importance_sampling_clip_max=math.inf), x["old"], x["sampling"], x["mask"])
    valid = x["mask"].bool() if mode.startswith("token") else x["mask"].bool().any(-1, keepdim=True)
    assert ((raw < lo) & valid).any() and ((raw > hi) & valid).any()  # both bounds matter for these inputs
    _compare(args, x)


def test_vllm_importance_sampling_one_sided_defaults():
    # TRL's default mode and cap (sequence_mask, clip_max 3, no clip_min), and an upper-only token truncation.
    _compare(_config(use_vllm=True), _inputs(11, sampling_noise=0.3))
    args = _config(use_vllm=True, vllm_importance_sampling_mode="token_truncate",
                   vllm_importance_sampling_clip_max=1.2)
    _compare(args, _inputs(12, sampling_noise=0.3))


@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("grpo", "sequence"), ("sapo", "token")])
@pytest.mark.parametrize("use_vllm", [False, True])
def test_off_policy_mask(loss_type, level, use_vllm):
    # TRL compares the sampling log-probs when it has them, else the old ones; fastppo the rollout log-probs.
    args = _config(loss_type=loss_type, importance_sampling_level=level, off_policy_mask_threshold=0.02, beta=0.04,
                   use_vllm=use_vllm, vllm_importance_sampling_mode="token_truncate",
                   vllm_importance_sampling_clip_max=2.0, **_loss_type_settings(loss_type))
    x = _inputs(_seed(loss_type, use_vllm), sampling_noise=0.05)
    if not use_vllm:  # without vLLM TRL's loss never reads the sampling log-probs: the mask compares the old ones
        x["sampling"] = x["old"]
    # Rows 0 and 1 have A < 0; the sampler is far from the current policy on row 0 (dropped), close on row 1 (kept).
    x["adv"][:2] = -x["adv"][:2].abs() - 0.1
    x["sampling"][0] += 0.5
    x["sampling"][1] -= 0.5
    _compare(args, x)


@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("grpo", "sequence"), ("cispo", "token"),
                                             ("sapo", "sequence")])
@pytest.mark.parametrize("quantile", [0.5, 0.2])
def test_top_entropy_quantile(loss_type, level, quantile):
    args = _config(loss_type=loss_type, importance_sampling_level=level, top_entropy_quantile=quantile, beta=0.04,
                   **_loss_type_settings(loss_type))
    _compare(args, _inputs(_seed(loss_type, level, quantile)))


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("quantile", [1.0, 0.4])
def test_entropy_bonus(loss_type, quantile):
    # TRL's bonus is a token mean over the micro-batch's (kept) tokens whatever the policy normaliser is.
    args = _config(loss_type=loss_type, entropy_coef=0.03, top_entropy_quantile=quantile, beta=0.04,
                   **_loss_type_settings(loss_type))
    _compare(args, _inputs(_seed(loss_type, quantile)))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradient_accumulation_and_processes(loss_type):
    # A micro-batch of a window of 4 accumulation steps (one generation per 2 steps), 2 processes, the generation
    # batch holding 57 tokens: every normaliser of TRL's train mode.
    args = _config(loss_type=loss_type, gradient_accumulation_steps=4, steps_per_generation=2, entropy_coef=0.01,
                   beta=0.04, **_loss_type_settings(loss_type))
    _compare(args, _inputs(_seed("ga", loss_type)), num_processes=2, num_items=57)


def test_delta_is_the_dual_clip():
    args = _config(loss_type="dapo", delta=1.6, epsilon_high=0.28)
    obj = ft.objective_from_grpo_config(args)
    assert obj.dual_clip == 1.6
    x = _inputs(21)
    x["old"] = x["logps"] - torch.randn(B, T, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _compare(args, x)  # log-ratios of +-1..2: ratios above delta with A < 0 and A > 0


def test_mapping_fields():
    obj = ft.objective_from_grpo_config(loss_type="cispo", epsilon_high=5.0, beta=0.04, temperature=0.7,
                                        num_items_in_batch=40, num_processes=2, gradient_accumulation_steps=2,
                                        steps_per_generation=4)
    assert (obj.policy_loss, obj.clip_low, obj.clip_high) == ("cispo", 1.0, 4.0)
    assert (obj.kl_coef, obj.kl_kind, obj.kl_ratio_weighted, obj.temperature) == (0.04, "k3", True, 0.7)
    assert obj.loss_normalizer == 40 / 2 * 2 / 4
    sapo = ft.objective_from_grpo_config(loss_type="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=2.0)
    assert (sapo.policy_loss, sapo.sapo_tau_pos, sapo.sapo_tau_neg, sapo.agg) == ("sapo", 0.5, 2.0,
                                                                                "seq-mean-token-mean")
    vllm = ft.objective_from_grpo_config(use_vllm=True, vllm_importance_sampling_cap=2.5)  # deprecated alias
    assert (vllm.rollout_is_level, vllm.rollout_is_mode, vllm.rollout_is_min, vllm.rollout_is_max) == (
        "sequence", "mask", None, 2.5)
    assert ft.objective_from_grpo_config(use_vllm=True, vllm_importance_sampling_correction=False).rollout_is_level \
        is None
    assert ft.objective_from_grpo_config(loss_type="dr_grpo", max_completion_length=64).max_completion_length == 64


def test_not_representable():
    for loss_type in ("luspo", "vespo"):
        with pytest.raises(NotImplementedError, match=loss_type):
            ft.objective_from_grpo_config(loss_type=loss_type)
    with pytest.raises(NotImplementedError, match="delta"):
        ft.objective_from_grpo_config(loss_type="grpo", delta=1.2, epsilon_high=0.28)
    with pytest.raises(NotImplementedError, match="CISPO"):
        ft.objective_from_grpo_config(loss_type="cispo", epsilon_high=0.28)
    with pytest.raises(NotImplementedError, match="use_adaptive_entropy"):
        ft.objective_from_grpo_config(use_adaptive_entropy=True)
    with pytest.raises(TypeError, match="unknown GRPOConfig field"):
        ft.objective_from_grpo_config(epsilon_low=0.2)
    with pytest.raises(ValueError, match="completion_mask"):
        ft.objective_from_grpo_config(loss_type="grpo", gradient_accumulation_steps=4)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        ft.objective_from_grpo_config(importance_sampling_level="sequence_token")


def test_a_real_grpo_config():
    trl = peer_module("trl")
    args = trl.GRPOConfig(output_dir="/tmp/fastppo-grpo-config", loss_type="grpo", beta=0.04, epsilon_high=0.28,
                          importance_sampling_level="sequence", report_to="none", use_cpu=True, bf16=False)
    obj = ft.objective_from_grpo_config(args)
    assert (obj.agg, obj.importance_sampling_level, obj.clip_low, obj.clip_high, obj.kl_ratio_weighted) == (
        "seq-mean-token-mean", "sequence", 0.2, 0.28, True)
