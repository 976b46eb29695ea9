"""Bad input gets a clear error, never a silent wrong number, the same on every backend.

The structure checks (shapes, dtypes, devices, label ranges, option values) live once in ``fastppo._validate``; the
first part calls the ops on the default backend. The rest requests each CPU backend by name (the torch reference,
C++ ``cpp``, Triton under ``TRITON_INTERPRET=1``, set by tests/conftest.py), so a missing one fails with its import
error instead of being skipped: -inf logits, in-place backward on overlapping memory, non-finite hyperparameters and
per-token inputs, anything at masked tokens, tiny temperatures and the GAE gradient. What the four PPO loss entry
points must refuse alike is in test_ppo_entry_points.py; the default device-side asserts on CUDA are last.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastppo
from fastppo import _validate
from fastppo import reference as ref
from tests.tolerances import assert_close

BACKENDS = ("torch", "cpp", "triton")
inf, nan = math.inf, math.nan


# ------------------------------------------------------------------------ structure and options, on the default backend
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
    for raw, mode in [("1", "on"), ("sync", "sync"), ("SYNC", "sync"), ("0", "off"), ("off", "off")]:
        monkeypatch.setenv("FASTPPO_CHECKS", raw)
        assert _validate.value_check_mode() == mode
    monkeypatch.delenv("FASTPPO_CHECKS")
    assert _validate.value_check_mode() == "on"


# -------------------------------------------------------------------------------------------- every CPU backend by name
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ppo_inputs(b=2, t=5, v=37, seed=0):
    g = _gen(seed)
    logits = torch.randn(b, t, v, generator=g) * 2
    labels = torch.randint(0, v, (b, t), generator=g)
    old = torch.randn(b, t, generator=g) * 0.1 - math.log(v)
    adv = torch.randn(b, t, generator=g)
    ref_lp = torch.randn(b, t, generator=g) * 0.1 - math.log(v)
    mask = torch.ones(b, t)
    return logits, labels, old, adv, ref_lp, mask


# --------------------------------------------------------------- -inf logits: exact gradients, zero at the -inf entries
def _entropy_and_grad_fp64(x: torch.Tensor, labels: torch.Tensor, g_lp: torch.Tensor, g_h: torch.Tensor):
    """By hand, in float64: H = -sum p log p over entries with p > 0 (p log p -> 0 as p -> 0) and
    dx_j = g_lp*(1[j=t] - p_j) - g_h*p_j*(log p_j + H), which is 0 at -inf logits."""
    x = x.double()
    logp = x - torch.logsumexp(x, -1, keepdim=True)
    p = logp.exp()
    plogp = torch.where(p > 0, p * torch.where(p > 0, logp, 0.0), 0.0)
    h = -plogp.sum(-1)
    onehot = torch.nn.functional.one_hot(labels, x.shape[-1]).double()
    term = torch.where(p > 0, p * (torch.where(p > 0, logp, 0.0) + h[..., None]), 0.0)
    dx = g_lp[..., None].double() * (onehot - p) - g_h[..., None].double() * term
    return h, dx


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_gradient_is_exact_and_zero_at_minus_inf_logits(backend):
    x = torch.randn(1, 8, generator=_gen(1))
    x[0, :3] = -inf  # p = 0 there: autograd of p*log p would give 0 * -inf = NaN
    xr = x.clone().requires_grad_()
    h = fastppo.token_entropy(xr, backend=backend)
    h.sum().backward()
    e_h, e_dx = _entropy_and_grad_fp64(x, torch.zeros(1, dtype=torch.long), torch.zeros(1), torch.ones(1))
    assert_close(h, e_h, torch.float32)
    assert_close(xr.grad, e_dx, torch.float32, "grad")
    assert (xr.grad[0, :3] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_and_entropy_gradient_is_exact_with_minus_inf_logits(backend):
    g = _gen(2)
    x = torch.randn(41, 67, generator=g) * 3
    x[torch.rand(41, 67, generator=g) < 0.3] = -inf
    labels = torch.randint(0, 67, (41,), generator=g)
    x[torch.arange(41), labels] = torch.randn(41, generator=g)  # the sampled token itself is finite
    g_lp, g_h = torch.randn(41, generator=g), torch.randn(41, generator=g)
    xr = x.clone().requires_grad_()
    lp, h = fastppo.logprobs_and_entropy(xr, labels, backend=backend)
    ((lp * g_lp).sum() + (h * g_h).sum()).backward()
    e_h, e_dx = _entropy_and_grad_fp64(x, labels, g_lp, g_h)
    assert_close(h, e_h, torch.float32)
    assert_close(xr.grad, e_dx, torch.float32, "grad")


def test_float64_reference_entropy_gradient_is_exact_with_minus_inf_logits():
    x = torch.randn(5, 13, dtype=torch.float64, generator=_gen(3))
    x[:, ::3] = -inf
    g_h = torch.randn(5, dtype=torch.float64, generator=_gen(4))
    xr = x.clone().requires_grad_()
    (ref.token_entropy(xr) * g_h).sum().backward()
    _, e_dx = _entropy_and_grad_fp64(x, torch.zeros(5, dtype=torch.long), torch.zeros(5), g_h)
    assert_close(xr.grad, e_dx, torch.float64, "grad")


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_ppo_loss_entropy_bonus_gradient_is_zero_at_minus_inf_logits(backend):
    # "auto" with float64 logits takes the float64 reference, whose entropy autograd must not make NaN either
    logits, labels, old, adv, _, mask = _ppo_inputs(seed=5)
    logits[..., :10] = -inf
    labels = labels.clamp_min(10)
    dtype = torch.float64 if backend == "auto" else torch.float32
    x = logits.to(dtype).clone().requires_grad_()
    loss, _ = fastppo.ppo_loss_from_logits(x, labels, old, adv, mask, entropy_coef=0.1, backend=backend)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[..., :10] == 0).all()
    xe = logits.double().requires_grad_()
    e_loss, _ = ref.ppo_loss_from_logits(xe, labels, old.double(), adv.double(), mask, entropy_coef=0.1)
    e_loss.backward()
    assert_close(loss, e_loss, dtype)
    assert_close(x.grad, xe.grad, dtype, "grad")


# ----------------------------------------------------------------------------- in-place backward and overlapping memory
@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_refuses_overlapping_logits(backend):
    b = torch.randn(4, 53, generator=_gen(6), requires_grad=True)
    labels = torch.randint(0, 53, (3, 4), generator=_gen(7))
    with pytest.raises(ValueError, match="inplace_backward=True needs logits whose elements do not overlap"):
        fastppo.token_logprobs(b.expand(3, 4, 53), labels, backend=backend, inplace_backward=True)
    with pytest.raises(ValueError, match="do not overlap"):
        fastppo.logprobs_and_entropy(b.expand(3, 4, 53), labels, backend=backend, inplace_backward=True)
    _, _, old, adv, _, mask = _ppo_inputs(3, 4, 53)
    with pytest.raises(ValueError, match="do not overlap"):
        fastppo.ppo_loss_from_logits(b.expand(3, 4, 53), labels, old, adv, mask, backend=backend,
                                     inplace_backward=True)
    # out of place, the same expanded logits give the exact gradient (3 copies of each row's gradient)
    lp = fastppo.token_logprobs(b.expand(3, 4, 53), labels, backend=backend)
    lp.sum().backward()
    xe = b.detach().double().expand(3, 4, 53).clone().requires_grad_()
    ref.token_logprobs(xe, labels).sum().backward()
    assert_close(b.grad, xe.grad.sum(0), torch.float32, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_on_a_strided_non_overlapping_view_is_exact(backend):
    big = torch.randn(2, 9, 41, generator=_gen(8))
    labels = torch.randint(0, 41, (2, 8), generator=_gen(9))
    leaf = big.clone().requires_grad_()
    view = leaf[:, :-1, :] * 1.0  # a fresh non-leaf buffer the in-place backward may overwrite
    view = view.as_strided(view.shape, view.stride())
    fastppo.token_logprobs(view, labels, backend=backend, inplace_backward=True).sum().backward()
    xe = big.double().requires_grad_()
    ref.token_logprobs(xe[:, :-1, :], labels).sum().backward()
    assert_close(leaf.grad, xe.grad, torch.float32, "grad")


@pytest.mark.parametrize(
    ("shape", "stride", "overlaps"),
    [((3, 4, 5), (0, 5, 1), True), ((3, 4, 5), (20, 5, 1), False), ((3, 4, 5), (5, 15, 1), False),
     ((3, 4, 5), (5, 4, 1), True), ((2, 1, 5), (5, 0, 1), False), ((4, 5), (3, 1), True)],
)
def test_overlap_detection_on_strided_layouts(shape, stride, overlaps):
    t = torch.empty(100).as_strided(shape, stride)
    if overlaps:
        with pytest.raises(ValueError, match="do not overlap"):
            _validate.no_overlap("logits", t)
    else:
        _validate.no_overlap("logits", t)


# ----------------------------------------------------------------------- non-finite hyperparameters are refused by name
# kl_coef NaN/inf, entropy_coef NaN and temperature NaN refused by the logits loss on these backends (and by the other
# three entry points): test_ppo_entry_points.py's BAD table
_PPO_HYPER = [("clip_low", nan), ("clip_high", nan), ("dual_clip", nan), ("entropy_coef", -inf), ("clip_high", inf),
              ("dual_clip", inf)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("arg", "value"), _PPO_HYPER)
def test_nonfinite_loss_hyperparameters_are_refused_by_name(backend, arg, value):
    logits, labels, old, adv, ref_lp, mask = _ppo_inputs()
    with pytest.raises(ValueError, match=arg):
        fastppo.ppo_loss_from_logits(logits, labels, old, adv, mask, ref_logprobs=ref_lp, backend=backend,
                                     **{arg: value})
    if arg in ("clip_low", "clip_high", "dual_clip"):
        with pytest.raises(ValueError, match=arg):
            fastppo.ppo_policy_loss(old + 0.01, old, adv, mask, backend=backend, **{arg: value})


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_hyperparameters_of_the_other_ops_are_refused_by_name(backend):
    logits, labels, old, adv, _, mask = _ppo_inputs()
    with pytest.raises(ValueError, match="clip"):
        fastppo.value_loss(adv, adv + 0.1, adv - 0.1, mask, clip=nan, backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        fastppo.token_logprobs(logits, labels, temperature=nan, backend=backend)
    for arg in ("gamma", "lam"):
        with pytest.raises(ValueError, match=arg):
            fastppo.gae(adv, old, mask.bool(), backend=backend, **{arg: nan})
    with pytest.raises(ValueError, match="eps"):
        fastppo.masked_whiten(adv, mask, eps=nan, backend=backend)
    with pytest.raises(ValueError, match="eps"):
        fastppo.grpo_advantages(adv[:, 0], torch.tensor([0, 0]), mask, eps=nan, backend=backend)
    with pytest.raises(ValueError, match="eps"):
        fastppo.reinforce_pp_advantages(adv, mask, eps=nan, backend=backend)


# ------------------------------------------------------------------------ a non-finite per-token input at a valid token
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "poison"), [("old_logprobs", nan), ("advantages", nan), ("ref_logprobs", nan),
                                              ("old_logprobs", -inf), ("advantages", inf)])
def test_nonfinite_per_token_input_at_a_valid_token_is_refused(backend, name, poison):
    logits, labels, old, adv, ref_lp, mask = _ppo_inputs()
    tensors = {"old_logprobs": old, "advantages": adv, "ref_logprobs": ref_lp}
    tensors[name][0, 1] = poison
    with pytest.raises(ValueError, match=f"{name} has a non-finite value .* at a valid"):
        fastppo.ppo_loss_from_logits(logits, labels, old, adv, mask, ref_logprobs=ref_lp, kl_coef=0.1,
                                     backend=backend)
    if name != "ref_logprobs":
        with pytest.raises(ValueError, match=f"{name} has a non-finite value"):
            fastppo.ppo_policy_loss(old + 0.01, old, adv, mask, backend=backend)


@pytest.mark.parametrize("name", ["old_logprobs", "advantages"])
def test_with_value_checks_off_a_nan_input_gives_nan_on_every_backend(monkeypatch, name):
    # FASTPPO_CHECKS=0 skips value checks; the backends must then still agree: NaN in, NaN out.
    monkeypatch.setenv("FASTPPO_CHECKS", "0")
    logits, labels, old, adv, _, mask = _ppo_inputs()
    {"old_logprobs": old, "advantages": adv}[name][0, 1] = nan
    for backend in BACKENDS:
        loss, _ = fastppo.ppo_loss_from_logits(logits, labels, old, adv, mask, backend=backend)
        assert torch.isnan(loss), backend
        for dual in (None, 3.0):
            loss, _ = fastppo.ppo_loss_from_logits(logits, labels, old, adv, mask, dual_clip=dual, clip_high=0.3,
                                                   backend=backend)
            assert torch.isnan(loss), (backend, dual)


# ----------------------------------------------------------------------------------- non-finite inputs at masked tokens
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_nonfinite_inputs_at_masked_tokens_get_zero_gradient(backend, agg):
    logits, labels, old, adv, ref_lp, mask = _ppo_inputs(seed=11)
    mask[0, 1] = mask[1, 3] = mask[1, 4] = 0
    old[0, 1], adv[0, 1], ref_lp[0, 1] = nan, inf, nan
    old[1, 3], adv[1, 3], ref_lp[1, 3] = -inf, nan, inf
    old[1, 4], adv[1, 4], ref_lp[1, 4] = inf, -inf, -inf
    kw = dict(ref_logprobs=ref_lp, kl_coef=0.1, kl_kind="k3", entropy_coef=0.01, dual_clip=3.0, agg=agg)
    x = logits.clone().requires_grad_()
    loss, stats = fastppo.ppo_loss_from_logits(x, labels, old, adv, mask, backend=backend, **kw)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in stats.values()), stats
    assert (x.grad[0, 1] == 0).all() and (x.grad[1, 3:] == 0).all()
    # the valid tokens match the float64 reference fed with clean values at the masked positions
    clean = [torch.where(mask.bool(), t, 0.0).double() for t in (old, adv, ref_lp)]
    xe = logits.double().requires_grad_()
    e_loss, _ = ref.ppo_loss_from_logits(xe, labels, clean[0], clean[1], mask, ref_logprobs=clean[2],
                                         **{k: v for k, v in kw.items() if k != "ref_logprobs"})
    e_loss.backward()
    assert_close(loss, e_loss, torch.float32)
    assert_close(x.grad, xe.grad, torch.float32, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_inputs_at_masked_tokens_of_the_policy_and_value_loss(backend):
    _, _, old, adv, _, mask = _ppo_inputs(seed=12)
    mask[1, 2] = 0
    old[1, 2], adv[1, 2] = nan, inf
    lp = (old + 0.05).clone()
    lp[1, 2] = -inf
    lp.requires_grad_()
    loss, stats = fastppo.ppo_policy_loss(lp, old, adv, mask, dual_clip=2.0, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in stats.values())
    assert torch.isfinite(lp.grad).all() and lp.grad[1, 2] == 0
    v = adv.clone()
    v[1, 2] = nan
    v.requires_grad_()
    ret = adv + 0.3
    ret[1, 2] = inf
    vloss, vstats = fastppo.value_loss(v, v.detach() + 0.1, ret, mask, clip=0.2, backend=backend)
    vloss.backward()
    assert torch.isfinite(vloss) and all(torch.isfinite(s) for s in vstats.values())
    assert torch.isfinite(v.grad).all() and v.grad[1, 2] == 0


def test_nan_logits_at_a_masked_row_on_the_float64_reference():
    logits, labels, old, adv, _, mask = _ppo_inputs(seed=13)
    mask[0, 0] = 0
    logits[0, 0] = nan  # a padding row; kernels never read it
    x = logits.double().requires_grad_()
    loss, _ = fastppo.ppo_loss_from_logits(x, labels, old, adv, mask, entropy_coef=0.1, backend="torch")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and (x.grad[0, 0] == 0).all()


# ---------------------------------------------------------------------------------------------------- tiny temperatures
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1e-20, 1e-5])
def test_tiny_temperature_is_computed(backend, temperature):
    g = _gen(14)
    x = torch.randn(6, 23, generator=g)
    labels = torch.randint(0, 23, (6,), generator=g)
    labels[:3] = x[:3].argmax(-1)  # logp -> 0 at the argmax, -(x_max - x_t)/T elsewhere
    g_lp, g_h = torch.randn(6, generator=g), torch.randn(6, generator=g)
    xr = x.clone().requires_grad_()
    lp, h = fastppo.logprobs_and_entropy(xr, labels, temperature=temperature, backend=backend)
    ((lp * g_lp).sum() + (h * g_h).sum()).backward()
    y = x.double() / temperature
    e_h, e_dx = _entropy_and_grad_fp64(y, labels, g_lp, g_h)
    e_lp = ref.token_logprobs(y, labels)
    # the kernels scale by 1/T in float32: relative to |x/T| ~ 1e20 that is a few float32 ulps
    assert torch.isfinite(lp).all() and torch.isfinite(h).all() and torch.isfinite(xr.grad).all()
    torch.testing.assert_close(lp.double(), e_lp, rtol=1e-5, atol=1e-5)
    assert (lp[:3] == 0).all()
    torch.testing.assert_close(h.double(), e_h, rtol=0, atol=1e-5)
    torch.testing.assert_close(xr.grad.double(), e_dx / temperature, rtol=1e-5, atol=1e-5 / temperature)


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_below_float32_reciprocal_is_refused_by_name(backend):
    x = torch.randn(3, 11, generator=_gen(15))
    labels = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"temperature=1e-40 is too small"):
        fastppo.token_logprobs(x, labels, temperature=1e-40, backend=backend)
    # finite logits whose x / T leaves float32: the error names the temperature
    with pytest.raises(ValueError, match=r"temperature=1e-38"):
        fastppo.token_logprobs(x * 100, labels, temperature=1e-38, backend=backend)


# ----------------------------------------------------------------------------------------------------- the GAE gradient
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("whiten", [False, True])
def test_gae_is_differentiable_on_every_backend(backend, whiten):
    g = _gen(16)
    B, T = 3, 13
    r, v, boot = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g), torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    g_adv, g_ret = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    leaves = [t.clone().requires_grad_() for t in (r, v, boot)]
    adv, ret = fastppo.gae(leaves[0], leaves[1], mask, gamma=0.97, lam=0.9, bootstrap_value=leaves[2],
                           whiten_advantages=whiten, backend=backend)
    ((adv * g_adv).sum() + (ret * g_ret).sum()).backward()
    e_leaves = [t.double().requires_grad_() for t in (r, v, boot)]
    e_adv, e_ret = ref.gae(e_leaves[0], e_leaves[1], mask, gamma=0.97, lam=0.9, bootstrap_value=e_leaves[2])
    if whiten:
        e_adv = ref.masked_whiten(e_adv, mask) * mask
    ((e_adv * g_adv.double()).sum() + (e_ret * g_ret.double()).sum()).backward()
    for got, want in zip(leaves, e_leaves, strict=True):
        assert_close(got.grad, want.grad, torch.float32, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_gradient_of_the_values_alone(backend):
    r = torch.randn(2, 7, generator=_gen(17))
    v = torch.randn(2, 7, generator=_gen(18), requires_grad=True)
    adv, _ = fastppo.gae(r, v, torch.ones(2, 7, dtype=torch.bool), backend=backend)
    adv.sum().backward()
    e_v = v.detach().double().requires_grad_()
    ref.gae(r.double(), e_v, torch.ones(2, 7, dtype=torch.bool))[0].sum().backward()
    assert_close(v.grad, e_v.grad, torch.float32, "grad")


# -------------------------------------------------------------------------------------------- CUDA: device-side asserts
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
