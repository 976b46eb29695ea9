"""The four PPO loss entry points share one objective and one validation: every bad argument of the README's
bad-input contract gets the same error class, naming the argument, from ``ppo_loss_from_logits``,
``ppo_loss_from_hidden`` (torch, cpp and the Triton interpreter) and the two vocabulary-parallel losses (a one-rank
gloo group); valid inputs give the same loss everywhere, also with NaN/inf at masked positions.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastppo
from fastppo import PPOObjective
from fastppo import reference as ref
from tests.ops.ppo_harness import ENTRIES, B, T, V, call, one_rank_group  # noqa: F401  (the group is a fixture)
from tests.ops.ppo_harness import make_inputs as _inputs
from tests.tolerances import assert_close

inf, nan = math.inf, math.nan

pytestmark = pytest.mark.usefixtures("one_rank_group")


def _poke(t: torch.Tensor, value: float, where=(1, 2)) -> torch.Tensor:
    t = t.clone()
    t[where] = value
    return t


# (id, how to call given the inputs, error class, what the message must name)
BAD = [
    ("old-nan", lambda e, b, x: call(e, b, x, old=_poke(x["old"], nan)), ValueError, "old_logprobs"),
    ("old-minus-inf", lambda e, b, x: call(e, b, x, old=_poke(x["old"], -inf)), ValueError, "old_logprobs"),
    ("old-plus-inf", lambda e, b, x: call(e, b, x, old=_poke(x["old"], inf)), ValueError, "old_logprobs"),
    ("adv-nan", lambda e, b, x: call(e, b, x, adv=_poke(x["adv"], nan)), ValueError, "advantages"),
    ("adv-inf", lambda e, b, x: call(e, b, x, adv=_poke(x["adv"], inf)), ValueError, "advantages"),
    ("adv-nan-on-policy", lambda e, b, x: call(e, b, x, old=None, adv=_poke(x["adv"], nan)), ValueError,
     "advantages"),
    ("ref-nan-with-kl", lambda e, b, x: call(e, b, x, ref_logprobs=_poke(x["ref"], nan), kl_coef=0.1), ValueError,
     "ref_logprobs"),
    ("ref-missing-with-kl", lambda e, b, x: call(e, b, x, ref_logprobs=None, kl_coef=0.1), ValueError,
     "ref_logprobs"),
    ("kl_coef-nan", lambda e, b, x: call(e, b, x, kl_coef=nan), ValueError, "kl_coef"),
    ("kl_coef-inf", lambda e, b, x: call(e, b, x, kl_coef=inf), ValueError, "kl_coef"),
    ("kl_coef-nan-on-policy", lambda e, b, x: call(e, b, x, old=None, kl_coef=nan), ValueError, "kl_coef"),
    ("entropy_coef-nan", lambda e, b, x: call(e, b, x, entropy_coef=nan), ValueError, "entropy_coef"),
    ("clip_low-nan", lambda e, b, x: call(e, b, x, clip_low=nan), ValueError, "clip_low"),
    ("clip_low-one", lambda e, b, x: call(e, b, x, clip_low=1.0), ValueError, "clip_low"),
    ("clip_high-inf", lambda e, b, x: call(e, b, x, clip_high=inf), ValueError, "clip_high"),
    ("dual_clip-nan", lambda e, b, x: call(e, b, x, dual_clip=nan), ValueError, "dual_clip"),
    ("dual_clip-below-one", lambda e, b, x: call(e, b, x, dual_clip=0.9), ValueError, "dual_clip"),
    ("temperature-nan", lambda e, b, x: call(e, b, x, temperature=nan), ValueError, "temperature"),
    ("temperature-zero", lambda e, b, x: call(e, b, x, temperature=0.0), ValueError, "temperature"),
    ("kl_kind", lambda e, b, x: call(e, b, x, kl_kind="k9"), ValueError, "kl_kind"),
    ("agg", lambda e, b, x: call(e, b, x, agg="sum"), ValueError, "agg"),
    ("unknown-keyword", lambda e, b, x: call(e, b, x, clip_ratio=0.2), TypeError, "clip_ratio"),
    ("old-shape", lambda e, b, x: call(e, b, x, old=x["old"][:, :-1]), ValueError, "old_logprobs"),
    ("adv-shape", lambda e, b, x: call(e, b, x, adv=x["adv"][:-1]), ValueError, "advantages"),
    ("ref-shape", lambda e, b, x: call(e, b, x, ref_logprobs=x["ref"][:, :-1]), ValueError, "ref_logprobs"),
    ("mask-shape", lambda e, b, x: call(e, b, x, mask=x["mask"][:, :-1]), ValueError, "mask"),
    ("old-dtype", lambda e, b, x: call(e, b, x, old=x["old"].long()), TypeError, "old_logprobs"),
    ("all-masked", lambda e, b, x: call(e, b, x, mask=torch.zeros(B, T)), ValueError, "mask"),
    ("labels-out-of-range", lambda e, b, x: call(e, b, {**x, "labels": _poke(x["labels"], V).long()}), ValueError,
     "labels"),
    ("objective-and-bad-type", lambda e, b, x: call(e, b, x, objective={"clip_low": 0.2}), TypeError, "objective"),
]


@pytest.mark.parametrize("entry,backend", ENTRIES)
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_every_entry_point_refuses_bad_input_alike(entry, backend, case):
    _, fn, exc, name = case
    with pytest.raises(exc, match=name):
        fn(entry, backend, _inputs())


@pytest.mark.parametrize("entry,backend", ENTRIES)
def test_non_finite_input_at_a_valid_token_names_its_source(entry, backend):
    x = _inputs()
    source = "hidden" if entry in ("hidden", "vp_hidden") else "logits"
    if source == "hidden":
        x["hidden"] = _poke(x["hidden"], nan, where=(1, 2, 3))
    else:
        x["logits"] = _poke(x["hidden"] @ x["weight"].T, nan, where=(1, 2, 3))
    with pytest.raises(ValueError, match=f"non-finite.*{source}"):
        call(entry, backend, x)


@pytest.mark.parametrize("entry,backend", ENTRIES)
def test_overflow_at_a_small_temperature_names_the_temperature(entry, backend):
    x = _inputs()
    if entry in ("hidden", "vp_hidden"):
        x["weight"] = _poke(x["weight"], 1e38 / 8, where=(0,))  # a logit near 1e38 for every token
        x["hidden"] = x["hidden"].abs() + 1.0
    else:
        x["logits"] = _poke(x["hidden"] @ x["weight"].T, 3e38, where=(1, 2, 3))
    with pytest.raises(ValueError, match=r"temperature=0\.5"):
        call(entry, backend, x, temperature=0.5)


@pytest.mark.parametrize("entry,backend", ENTRIES)
def test_masked_positions_may_hold_anything(entry, backend):
    """NaN/inf in every per-token input and in the logits / hidden row of a masked token: the loss and every
    gradient equal those of the same batch with finite values there (masked tokens contribute nothing)."""
    clean = _inputs()
    dirty = {k: v.clone() for k, v in clean.items()}
    where = (0, T - 1)  # masked in _inputs
    for k in ("old", "adv", "ref"):
        dirty[k][where] = nan
    dirty["hidden"][where] = inf
    results = []
    for x in (clean, dirty):
        h = x["hidden"].clone().requires_grad_(entry in ("hidden", "vp_hidden"))
        logits = (x["hidden"] @ x["weight"].T).requires_grad_(entry in ("logits", "vp_logits"))
        if x is dirty:
            logits = logits.detach().clone()
            logits[where] = nan
            logits.requires_grad_(entry in ("logits", "vp_logits"))
        loss, _ = call(entry, backend, {**x, "hidden": h, "logits": logits}, kl_coef=0.05, entropy_coef=0.01)
        leaf = h if entry in ("hidden", "vp_hidden") else logits
        (grad,) = torch.autograd.grad(loss, leaf)
        grad = torch.where(torch.isfinite(grad), grad, torch.full_like(grad, 12345.0))
        if x is dirty:
            grad[where] = 0.0 if torch.equal(grad[where], torch.zeros_like(grad[where])) else 12345.0
        results.append((loss.detach(), grad))
    assert torch.isfinite(results[1][0])
    assert_close(results[1][0], results[0][0], torch.float32)
    assert_close(results[1][1], results[0][1], torch.float32)


@pytest.mark.parametrize("entry,backend", ENTRIES)
@pytest.mark.parametrize("on_policy", [False, True])
def test_every_entry_point_computes_the_reference_objective(entry, backend, on_policy):
    x = _inputs(seed=3)
    obj = PPOObjective(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.05, kl_kind="k2", entropy_coef=0.01,
                       temperature=0.9, agg="seq-mean-token-mean")
    loss, stats = call(entry, backend, x, old=None if on_policy else x["old"], objective=obj)
    logits64 = (x["hidden"] @ x["weight"].T).double()
    want, want_stats = ref.ppo_loss_from_logits(logits64, x["labels"], None if on_policy else x["old"].double(),
                                                x["adv"].double(), x["mask"], ref_logprobs=x["ref"].double(),
                                                objective=obj)
    assert_close(loss, want, torch.float32)
    for k in ("pg_loss", "kl", "entropy", "clipfrac", "approx_kl", "ratio_mean"):
        assert_close(stats[k], want_stats[k], torch.float32)


def test_keywords_override_the_objective():
    base = PPOObjective(clip_low=0.1, kl_kind="k1")
    x = _inputs()
    a, _ = fastppo.ppo_loss_from_logits(x["hidden"] @ x["weight"].T, x["labels"], x["old"], x["adv"], x["mask"],
                                        objective=base, clip_low=0.3, backend="torch")
    b, _ = fastppo.ppo_loss_from_logits(x["hidden"] @ x["weight"].T, x["labels"], x["old"], x["adv"], x["mask"],
                                        clip_low=0.3, kl_kind="k1", backend="torch")
    assert torch.equal(a, b)


def test_objective_round_trips_through_its_packed_form():
    for obj in (PPOObjective(), PPOObjective(clip_low=0.1, clip_high=0.3, dual_clip=2.5, kl_coef=0.2, kl_kind="abs",
                                             entropy_coef=0.01, temperature=0.7, agg="seq-mean-token-sum-norm")):
        assert PPOObjective.unpack(obj.pack()) == obj
        assert all(isinstance(v, float) for v in obj.pack())
    assert PPOObjective(clip_low=0.3).clip_high == 0.3  # None means clip_low, resolved once
