"""Bad input gets a clear error, never a silent wrong number."""

from __future__ import annotations

import math

import pytest
import torch

import fastppo


def _logits(n=4, v=11):
    return torch.randn(n, v), torch.randint(0, v, (n,))


def test_labels_shape_mismatch():
    x, _ = _logits()
    with pytest.raises(ValueError, match="labels has shape"):
        fastppo.token_logprobs(x, torch.zeros(5, dtype=torch.long))


def test_labels_must_be_integer():
    x, _ = _logits()
    with pytest.raises(TypeError, match="integer"):
        fastppo.token_logprobs(x, torch.zeros(4))


def test_logits_must_be_floating():
    with pytest.raises(TypeError, match="floating"):
        fastppo.token_entropy(torch.zeros(4, 3, dtype=torch.long))


@pytest.mark.parametrize("bad", [-1, 11, 10_000])
def test_labels_out_of_range(bad):
    x, lab = _logits()
    lab[2] = bad
    with pytest.raises(ValueError, match=r"labels out of range.*\[0, 11\)"):
        fastppo.token_logprobs(x, lab)


@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_nan_or_inf_logits(poison):
    x, lab = _logits()
    x[1, 3] = poison
    with pytest.raises(ValueError, match="non-finite"):
        fastppo.logprobs_and_entropy(x, lab)


def test_fully_masked_vocabulary_row():
    x, lab = _logits()
    x[0] = -math.inf
    with pytest.raises(ValueError, match="every logit is -inf"):
        fastppo.token_logprobs(x, lab)


def test_minus_inf_entries_are_fine():
    x, lab = _logits()
    x[:, 0] = -math.inf
    lab[:] = 5
    lp, h = fastppo.logprobs_and_entropy(x, lab)
    assert torch.isfinite(lp).all() and torch.isfinite(h).all()


def test_bad_temperature():
    x, lab = _logits()
    for t in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature"):
            fastppo.token_logprobs(x, lab, temperature=t)


def test_empty_logits_give_empty_outputs():
    lp = fastppo.token_logprobs(torch.randn(0, 7), torch.zeros(0, dtype=torch.long))
    assert lp.shape == (0,)


def test_device_mismatch_message():
    from fastppo import _validate

    a = torch.zeros(2)
    b = torch.zeros(2, device="meta")
    with pytest.raises(ValueError, match="one device"):
        _validate.same_device(a=a, b=b)


def _loss_args(b=2, t=5):
    return torch.randn(b, t), torch.randn(b, t), torch.randn(b, t), torch.ones(b, t)


def test_policy_loss_all_masked():
    lp, old, adv, m = _loss_args()
    with pytest.raises(ValueError, match="all-masked"):
        fastppo.ppo_policy_loss(lp, old, adv, torch.zeros_like(m))


def test_policy_loss_empty_batch():
    with pytest.raises(ValueError, match="empty batch"):
        fastppo.ppo_policy_loss(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3))


def test_policy_loss_shape_mismatch():
    lp, old, adv, m = _loss_args()
    with pytest.raises(ValueError, match="old_logprobs has shape"):
        fastppo.ppo_policy_loss(lp, old[:, :3], adv, m)
    with pytest.raises(ValueError, match="mask has shape"):
        fastppo.ppo_policy_loss(lp, old, adv, m[:1])


def test_policy_loss_bad_options():
    lp, old, adv, m = _loss_args()
    with pytest.raises(ValueError, match="unknown agg"):
        fastppo.ppo_policy_loss(lp, old, adv, m, agg="mean")
    with pytest.raises(ValueError, match="dual_clip"):
        fastppo.ppo_policy_loss(lp, old, adv, m, dual_clip=1.0)
    with pytest.raises(ValueError, match="clip_low"):
        fastppo.ppo_policy_loss(lp, old, adv, m, clip_low=1.5)
    with pytest.raises(ValueError, match="needs per-token tensors"):
        fastppo.ppo_policy_loss(lp[0], old[0], adv[0], m[0], agg="seq-mean-token-mean")


def test_value_loss_bad_clip():
    v, old, ret, m = _loss_args()
    with pytest.raises(ValueError, match="value clip"):
        fastppo.value_loss(v, old, ret, m, clip=0.0)


def test_ppo_loss_from_logits_needs_ref_for_kl():
    logits = torch.randn(2, 5, 13)
    labels = torch.randint(0, 13, (2, 5))
    _, old, adv, m = _loss_args()
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        fastppo.ppo_loss_from_logits(logits, labels, old, adv, m, kl_coef=0.1)
    with pytest.raises(ValueError, match="unknown KL kind"):
        fastppo.ppo_loss_from_logits(logits, labels, old, adv, m, ref_logprobs=old, kl_kind="k9")
    with pytest.raises(ValueError, match="old_logprobs has shape"):
        fastppo.ppo_loss_from_logits(logits, labels, old[:, :4], adv[:, :4], m[:, :4])


def test_masked_stats_errors():
    x = torch.randn(6)
    with pytest.raises(ValueError, match="no valid element"):
        fastppo.masked_mean(x, torch.zeros(6))
    with pytest.raises(ValueError, match="at least 2"):
        fastppo.masked_var(x, torch.tensor([1, 0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="empty"):
        fastppo.masked_mean(torch.zeros(0), torch.zeros(0))


def test_gae_errors():
    r = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        fastppo.gae(r[0], r[0], torch.ones(4))
    with pytest.raises(ValueError, match="bootstrap_value"):
        fastppo.gae(r, r, torch.ones(2, 4), bootstrap_value=torch.zeros(3))
    with pytest.raises(ValueError, match="gamma"):
        fastppo.gae(r, r, torch.ones(2, 4), gamma=1.5)


def test_value_checks_can_be_disabled(monkeypatch):
    monkeypatch.setenv("FASTPPO_CHECKS", "0")
    x, lab = _logits()
    x[0, 0] = math.nan
    out = fastppo.token_logprobs(x, lab)  # no error: the user opted out of value checks
    assert torch.isnan(out[0])


def test_kl_penalty_bad_clamp():
    lp = torch.randn(3)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="clamp"):
            fastppo.kl_penalty(lp, lp, "k3", clamp=bad)


def test_check_mode_is_read_from_the_environment(monkeypatch):
    from fastppo import _validate

    for raw, mode in [("1", "on"), ("sync", "sync"), ("SYNC", "sync"), ("0", "off"), ("off", "off")]:
        monkeypatch.setenv("FASTPPO_CHECKS", raw)
        assert _validate.value_check_mode() == mode
    monkeypatch.delenv("FASTPPO_CHECKS")
    assert _validate.value_check_mode() == "on"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_default_checks_on_cuda_are_device_side_asserts_with_the_message(backend):
    # The default never syncs the host: a NaN logit on CUDA is a device-side assert that names the problem and ends
    # the CUDA context, so it runs in a child process (the suite itself runs with FASTPPO_CHECKS=sync).
    import os
    import subprocess
    import sys

    code = (
        "import torch, fastppo\n"
        "x = torch.randn(4, 300, device='cuda'); x[2, 7] = float('nan')\n"
        "lab = torch.randint(0, 300, (4,), device='cuda')\n"
        f"fastppo.token_logprobs(x, lab, backend={backend!r})\n"
        "torch.cuda.synchronize()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FASTPPO_CHECKS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "non-finite result" in out.stderr, out.stderr[-3000:]
