"""``fastppo.compat.patch`` / ``unpatch`` on the installed frameworks: the swap reaches by-name copies and
registries, peer code paths then run on fastppo's ops (seen through a spy on the op), numbers are unchanged,
and ``unpatch`` restores every original object."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import numpy as np
import pytest
import torch

import fastppo
import fastppo.compat as compat
from fastppo.compat import openrlhf as fo
from fastppo.compat import trl as ft
from fastppo.compat import verl as fv
from tests.compat.conftest import load_openrlhf, peer_module


@pytest.fixture
def spy(monkeypatch):
    """Count calls of fastppo's public ops (the adapters look them up on the ``fastppo`` module at call time)."""
    calls: dict[str, int] = {}

    def wrap(name):
        real = getattr(fastppo, name)

        def counted(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return real(*args, **kwargs)

        monkeypatch.setattr(fastppo, name, counted)

    for name in ("token_logprobs", "token_entropy", "ppo_policy_loss", "grpo_advantages", "gae", "kl_penalty"):
        wrap(name)
    return calls


@pytest.fixture(autouse=True)
def _always_unpatch():
    yield
    for name in compat.FRAMEWORKS:
        compat.unpatch(name)


def test_unknown_and_missing_frameworks(monkeypatch):
    with pytest.raises(ValueError, match="unknown framework"):
        compat.patch("deepspeed-chat")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "trl" else real_find_spec(n, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install trl"):
        compat.patch("trl")
    assert compat.unpatch("trl") == 0


def test_trl_patch_and_unpatch(spy):
    tu = peer_module("trl.trainer.utils")
    sdpo = peer_module("trl.experimental.sdpo.loss_utils")  # imports selective_log_softmax by name
    originals = (tu.selective_log_softmax, tu.entropy_from_logits, tu.selective_log_softmax_and_entropy)
    assert sdpo.selective_log_softmax is originals[0]
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 97, generator=g), torch.randn(2, 5, 97, generator=g)
    ids = torch.randint(0, 97, (2, 5), generator=g)
    before = sdpo.compute_sampled_token_self_distillation_loss(student, teacher, ids, distillation_alpha=1.0)

    replaced = compat.patch("trl")
    assert replaced[:3] == ["trl.trainer.utils.selective_log_softmax", "trl.trainer.utils.entropy_from_logits",
                            "trl.trainer.utils.selective_log_softmax_and_entropy"]
    assert compat.is_patched("trl")
    assert tu.selective_log_softmax is ft.selective_log_softmax
    assert tu.entropy_from_logits is ft.entropy_from_logits
    assert sdpo.selective_log_softmax is ft.selective_log_softmax
    # TRL's own code paths now run on fastppo: the peer's function calling selective_log_softmax by name ...
    after = sdpo.compute_sampled_token_self_distillation_loss(student, teacher, ids, distillation_alpha=1.0)
    assert spy.get("token_logprobs", 0) == 2
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    assert compat.patch("trl") == replaced  # idempotent

    assert compat.unpatch("trl") > 0 and not compat.is_patched("trl")
    assert (tu.selective_log_softmax, tu.entropy_from_logits, tu.selective_log_softmax_and_entropy) == originals
    assert sdpo.selective_log_softmax is originals[0]


def test_verl_patch_and_unpatch(spy):
    ca = peer_module("verl.trainer.ppo.core_algos")
    vF = peer_module("verl.utils.torch_functional")
    losses = peer_module("verl.workers.utils.losses")  # imports agg_loss / kl_penalty by name
    orig = {
        "logprobs": vF.logprobs_from_logits, "entropy": vF.entropy_from_logits, "agg": ca.agg_loss,
        "kl": ca.kl_penalty, "vanilla": ca.POLICY_LOSS_REGISTRY["vanilla"], "gae": ca.ADV_ESTIMATOR_REGISTRY["gae"],
        "grpo": ca.ADV_ESTIMATOR_REGISTRY["grpo"],
    }
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 53, generator=g)
    mask = (torch.rand(3, 6, generator=g) > 0.2).float()
    rewards = torch.randn(3, 6, generator=g)
    uids = np.array(["a", "a", "b"], dtype=object)
    lp, old, adv = (torch.randn(3, 6, generator=g) - 1 for _ in range(3))
    from verl.workers.config import ActorConfig

    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1)

    def run():
        return (
            ca.compute_entropy_loss(logits, mask),  # calls verl_F.entropy_from_logits and agg_loss by name
            ca.get_adv_estimator_fn("grpo")(rewards, mask, uids)[0],  # through verl's registry
            losses.get_policy_loss_fn("vanilla")(old, lp, adv, mask, "token-mean", cfg)[0],  # by-name importer
            losses.kl_penalty(lp, old, "mse"),
        )

    before = run()
    replaced = compat.patch("verl")
    assert len(replaced) >= 16 and "verl.trainer.ppo.core_algos.compute_policy_loss_vanilla" in replaced
    assert vF.logprobs_from_logits is fv.logprobs_from_logits and ca.agg_loss is fv.agg_loss
    assert losses.agg_loss is fv.agg_loss and losses.kl_penalty is fv.kl_penalty
    assert ca.POLICY_LOSS_REGISTRY["vanilla"] is fv.compute_policy_loss_vanilla
    assert ca.ADV_ESTIMATOR_REGISTRY["gae"] is fv.compute_gae_advantage_return
    after = run()
    assert spy.get("token_entropy", 0) == 1 and spy.get("grpo_advantages", 0) == 1
    assert spy.get("ppo_policy_loss", 0) == 1 and spy.get("kl_penalty", 0) == 1
    for a, b in zip(after, before, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # A module imported after the patch copies the replacement by name; unpatch restores it too.
    sys.modules.pop("verl.trainer.distillation.losses", None)
    late = importlib.import_module("verl.trainer.distillation.losses")
    assert late.agg_loss is fv.agg_loss

    compat.unpatch("verl")
    assert vF.logprobs_from_logits is orig["logprobs"] and vF.entropy_from_logits is orig["entropy"]
    assert ca.agg_loss is orig["agg"] and losses.agg_loss is orig["agg"] and late.agg_loss is orig["agg"]
    assert ca.kl_penalty is orig["kl"] and losses.kl_penalty is orig["kl"]
    assert ca.POLICY_LOSS_REGISTRY["vanilla"] is orig["vanilla"]
    assert ca.ADV_ESTIMATOR_REGISTRY["gae"] is orig["gae"] and ca.ADV_ESTIMATOR_REGISTRY["grpo"] is orig["grpo"]


def test_openrlhf_patch_and_unpatch(spy):
    utils, loss = load_openrlhf()
    orig = (utils.log_probs_from_logits, utils.compute_approx_kl, loss.PolicyLoss, loss.ValueLoss)
    g = torch.Generator().manual_seed(2)
    lp, old, adv = (torch.randn(3, 6, generator=g) - 1 for _ in range(3))
    mask = (torch.rand(3, 6, generator=g) > 0.2).float()
    before = loss.PolicyLoss(dual_clip=3.0)(lp, old, adv, mask)[0]

    compat.patch("openrlhf")
    models = sys.modules["openrlhf.models"]
    assert utils.log_probs_from_logits is fo.log_probs_from_logits and utils.compute_approx_kl is fo.compute_approx_kl
    assert loss.PolicyLoss is fo.PolicyLoss and loss.ValueLoss is fo.ValueLoss
    if hasattr(models, "PolicyLoss"):  # the real package init re-exports them by name
        assert models.PolicyLoss is fo.PolicyLoss
    after = sys.modules["openrlhf.models.loss"].PolicyLoss(dual_clip=3.0)(lp, old, adv, mask)[0]
    assert spy.get("ppo_policy_loss", 0) == 1
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)

    compat.unpatch("openrlhf")
    assert (utils.log_probs_from_logits, utils.compute_approx_kl, loss.PolicyLoss, loss.ValueLoss) == orig


def test_trl_patch_replaces_only_what_the_installed_version_defines(monkeypatch):
    # TRL 1.12 / 1.13 have no selective_log_softmax_and_entropy (added in 1.14): patch the rest, say what it did
    tu = peer_module("trl.trainer.utils")
    original = tu.selective_log_softmax
    monkeypatch.delattr(tu, "selective_log_softmax_and_entropy")
    replaced = compat.patch("trl")
    assert "trl.trainer.utils.selective_log_softmax" in replaced and "trl.trainer.utils.entropy_from_logits" in replaced
    assert not any(n.endswith("selective_log_softmax_and_entropy") for n in replaced)
    assert tu.selective_log_softmax is ft.selective_log_softmax
    compat.unpatch("trl")
    assert tu.selective_log_softmax is original


def test_openrlhf_patch_without_flash_attn(monkeypatch):
    # openrlhf.models/__init__ imports the actor, which needs flash-attn's CUDA build; the patched functions don't
    peer_module("openrlhf")
    for name in [n for n in sys.modules if n == "openrlhf" or n.startswith("openrlhf.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn -> ImportError, on any machine
    with pytest.raises(ImportError, match="flash_attn"):
        importlib.import_module("openrlhf.models")
    replaced = compat.patch("openrlhf")
    assert replaced == ["openrlhf.models.utils.log_probs_from_logits", "openrlhf.models.utils.compute_approx_kl",
                        "openrlhf.models.loss.PolicyLoss", "openrlhf.models.loss.ValueLoss"]
    from openrlhf.models.loss import PolicyLoss
    from openrlhf.models.utils import compute_approx_kl

    assert PolicyLoss is fo.PolicyLoss and compute_approx_kl is fo.compute_approx_kl
    with pytest.raises(AttributeError, match="Actor is unavailable.*flash_attn"):
        sys.modules["openrlhf.models"].Actor  # noqa: B018
    compat.unpatch("openrlhf")
    assert sys.modules["openrlhf.models.loss"].PolicyLoss is not fo.PolicyLoss
