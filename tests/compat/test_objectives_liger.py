"""Liger 0.8.5's ``LigerFusedLinearGRPOLoss`` (eager: ``compiled=False``, on CPU) against
``fastppo.ppo_loss_from_hidden`` on the torch and C++ backends, with the objective ``objective_from_grpo_config``
maps Liger's (TRL-named) options to: loss and gradients w.r.t. the hidden states and the LM-head weight, and the
metrics both compute.

Liger takes the same GRPO options as TRL and normalises like TRL's train mode with one accumulation step (its
grpo/sapo/dr_grpo divide by all rows of the batch, bnpo by its tokens, dapo/cispo by ``num_items_in_batch``), so the
mapping gets the batch's ``completion_mask`` and ``num_items_in_batch``. Liger computes log-probs in float32 from
``(h @ W.T).float()``: float32 inputs, float32 tolerances. Sequence-level ratios with cispo / sapo raise in Liger and
are not compared (TRL's are, tests/compat/test_objectives_trl.py).
"""

from __future__ import annotations

import zlib

import pytest
import torch

import fastppo
from fastppo.compat import trl as ft
from tests.compat.conftest import peer_module
from tests.tolerances import assert_close

liger = peer_module("liger_kernel.chunked_loss")

B, T, H, V = 5, 7, 16, 37
TEMPERATURE = 0.7
BACKENDS = [b for b in ("torch", "cpp") if fastppo.backends()[b].available]


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g) * 0.5
    weight = torch.randn(V, H, generator=g) * 0.5
    ids = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask &= torch.rand(B, T, generator=g) > 0.15
    mask[:, 0] = True
    mask[-1] = False  # a fully padded row
    with torch.no_grad():
        logp = torch.log_softmax((hidden @ weight.T) / TEMPERATURE, -1).gather(-1, ids[..., None])[..., 0]
    old = logp + torch.randn(B, T, generator=g) * 0.2
    old[0, :2] = logp[0, :2] - 1.2  # ratios e^1.2: beyond the PPO clip for either sign of A
    ref = logp + torch.randn(B, T, generator=g) * 0.2
    adv = torch.randn(B, generator=g)
    # row 1's sequence ratio above any clip range with A > 0, row 2's below with A < 0 (row 0 holds token outliers)
    old[1] -= 0.4
    old[2] += 0.4
    adv[:3] = torch.tensor([-1.0, 1.0, -1.0])
    return {"hidden": hidden, "weight": weight, "ids": ids, "mask": mask.long(), "old": old, "ref": ref, "adv": adv}


def _options(loss_type, level, beta, bias_corrected):
    return {"loss_type": loss_type, "importance_sampling_level": level, "beta": beta,
            "use_bias_correction_kl": bias_corrected, "temperature": TEMPERATURE, "max_completion_length": T + 2,
            # sequence-level ratios (exp of a mean log-ratio) stay near 1: a narrow clip range so the clip acts
            "epsilon": 0.2 if level == "token" else 0.02,
            "epsilon_high": 5.0 if loss_type == "cispo" else 0.28 if level == "token" else 0.03,
            "sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.25}


def _liger(opts, x):
    fn = liger.LigerFusedLinearGRPOLoss(
        beta=opts["beta"], compiled=False, use_ref_model=opts["beta"] != 0.0, loss_type=opts["loss_type"],
        epsilon_low=opts["epsilon"], epsilon_high=opts["epsilon_high"], temperature=opts["temperature"],
        importance_sampling_level=opts["importance_sampling_level"],
        max_completion_length=opts["max_completion_length"], use_bias_correction_kl=opts["use_bias_correction_kl"],
        sapo_temperature_pos=opts["sapo_temperature_pos"], sapo_temperature_neg=opts["sapo_temperature_neg"])
    h = x["hidden"].clone().requires_grad_(True)
    w = x["weight"].clone().requires_grad_(True)
    loss, metrics = fn(h, w, x["ids"], x["mask"], x["adv"], ref_per_token_logps=x["ref"],
                       old_per_token_logps=x["old"], num_items_in_batch=x["mask"].sum())
    loss.backward()
    return loss.detach(), h.grad, w.grad, metrics


def _fastppo(opts, x, backend):
    obj = ft.objective_from_grpo_config(**opts, completion_mask=x["mask"], num_items_in_batch=x["mask"].sum())
    h = x["hidden"].clone().requires_grad_(True)
    w = x["weight"].clone().requires_grad_(True)
    loss, stats = fastppo.ppo_loss_from_hidden(h, w, x["ids"], x["old"], x["adv"][:, None].expand(B, T), x["mask"],
                                               ref_logprobs=x["ref"], objective=obj, backend=backend)
    loss.backward()
    return loss.detach(), h.grad, w.grad, stats


CASES = [(lt, lvl) for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
         for lvl in ("token", "sequence") if lvl == "token" or lt not in ("cispo", "sapo")]


@pytest.mark.parametrize("loss_type,level", CASES)
@pytest.mark.parametrize("beta,bias_corrected", [(0.0, False), (0.04, False), (0.04, True)],
                         ids=["beta0", "beta.04", "beta.04-biascorr"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_grpo_loss(loss_type, level, beta, bias_corrected, backend):
    opts = _options(loss_type, level, beta, bias_corrected)
    x = _inputs(_seed(loss_type, level, beta, bias_corrected))
    loss_l, gh_l, gw_l, metrics = _liger(opts, x)
    loss_f, gh_f, gw_f, stats = _fastppo(opts, x, backend)
    assert_close(loss_f, loss_l, torch.float32)
    assert_close(gh_f, gh_l, torch.float32, "grad")
    assert_close(gw_f, gw_l, torch.float32, "grad")
    # metrics: (kl mean over valid tokens,) when beta != 0, then the clip fraction; Liger's PPO-type clip fraction
    # (low-clipped with A < 0 or high-clipped with A > 0, token-weighted at both levels) is fastppo's clipfrac.
    if beta != 0.0:
        assert_close(stats["kl"], metrics[0], torch.float32)
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        assert_close(stats["clipfrac"], metrics[-1], torch.float32)
        assert 0.0 < float(stats["clipfrac"]) < 1.0  # the clip acts on these inputs
