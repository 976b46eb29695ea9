"""Log-probs over the sampler's truncated support (``top_k`` / ``top_p``): the support is exactly what
``sample_tokens`` draws from (same filter, same tie rule), the log-probs are renormalised over it on every backend and
fused path, and 10^5 draws of the sampler land with the frequencies ``exp(logprob)`` says."""

from __future__ import annotations

import math

import pytest
import torch

import fastppo
from fastppo import PPOObjective
from fastppo import reference as ref
from fastppo.reference.sampling import filter_logits, support_threshold
from tests.ops.ppo_harness import ENTRIES, call, make_inputs, one_rank_group  # noqa: F401  (fixture)
from tests.tolerances import assert_close

F32, F64 = torch.float32, torch.float64
BACKENDS = ("torch", "cpp", "triton")
SUPPORTS = [(5, 1.0), (0, 0.7), (8, 0.9), (1, 1.0)]


def _logits(n: int, v: int, seed: int, ties: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g) * 2
    return x.round() if ties else x


@pytest.mark.parametrize("ties", [False, True])
def test_the_support_is_an_upper_set_equal_to_the_samplers_filter(ties):
    for seed in range(40):
        v = 3 + seed * 3
        z = _logits(6, v, seed, ties).double()
        for k, p in [(0, 1.0), (1, 1.0), (v // 2, 1.0), (0, 0.5), (0, 0.95), (v // 3, 0.8), (v + 5, 0.3)]:
            keep_ref = filter_logits(z, k, p) > -math.inf
            keep = z >= support_threshold(z, k, p).unsqueeze(-1)
            assert torch.equal(keep, keep_ref), (seed, k, p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k,top_p", SUPPORTS)
def test_logprobs_and_entropy_are_renormalised_over_the_support(backend, top_k, top_p):
    x = _logits(7, 301, seed=top_k + int(10 * top_p))
    z64 = x.double() / 0.8
    keep = filter_logits(z64, top_k, top_p) > -math.inf
    # labels drawn inside the support (as a sampler's would be)
    labels = torch.multinomial(torch.softmax(torch.where(keep, z64, -math.inf), -1), 1).squeeze(-1)
    xr = x.clone().requires_grad_()
    lp, ent = fastppo.logprobs_and_entropy(xr, labels, temperature=0.8, top_k=top_k, top_p=top_p, backend=backend)
    g_lp, g_h = torch.randn(7, dtype=F64), torch.randn(7, dtype=F64)
    (lp * g_lp.float() + ent * g_h.float()).sum().backward()
    x64 = x.double().requires_grad_()
    w = torch.log_softmax(torch.where(keep, x64 / 0.8, torch.tensor(-math.inf, dtype=F64)), -1)
    e_lp = w.gather(-1, labels[:, None]).squeeze(-1)
    p = w.exp()
    e_ent = -(p * torch.where(p > 0, w, torch.zeros_like(w))).sum(-1)  # the where first: no 0 * -inf in backward
    (e_lp * g_lp + e_ent * g_h).sum().backward()
    assert_close(lp, e_lp, F32)
    assert_close(ent, e_ent, F32)
    assert_close(xr.grad, x64.grad, F32, "grad")
    assert torch.all(xr.grad[~keep] == 0)  # outside the support: no gradient


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (12, 0.85)])
def test_samplers_frequencies_match_exp_logprob(top_k, top_p):
    """10^5 draws of ``sample_tokens`` from one row: every draw lies in the support and each token's frequency is
    ``exp(token_logprobs(top_k, top_p))`` within 5 standard errors."""
    v, n = 40, 100_000
    row = _logits(1, v, seed=3)[0]
    z = row.double() / 0.9
    keep = filter_logits(z[None], top_k, top_p)[0] > -math.inf
    labels_in = torch.arange(v)[keep]
    lp = fastppo.token_logprobs(row.expand(len(labels_in), v), labels_in, temperature=0.9, top_k=top_k, top_p=top_p)
    prob = torch.zeros(v, dtype=F64)
    prob[labels_in] = lp.double().exp()
    assert abs(float(prob.sum()) - 1.0) < 1e-5
    seeds = torch.arange(n, dtype=torch.int64) * 7919 + 17
    draws = fastppo.sample_tokens(row.expand(n, v), temperature=0.9, top_k=top_k, top_p=top_p, seeds=seeds)
    assert bool(keep[draws].all()), "a draw outside the support"
    freq = torch.bincount(draws, minlength=v).double() / n
    se = (prob * (1 - prob) / n).sqrt()
    assert torch.all((freq - prob).abs() <= 5 * se + 1e-4), (freq - prob).abs().max()


def test_a_label_outside_the_support_is_an_error_unless_masked():
    x = _logits(4, 50, seed=1)
    labels = x.argmin(-1)  # never in a top-5 support
    with pytest.raises(ValueError, match="outside the top_k/top_p support"):
        fastppo.token_logprobs(x, labels, top_k=5)
    lp = fastppo.token_logprobs(x, labels, top_k=5, mask=torch.tensor([0, 0, 0, 0]))
    assert torch.equal(lp, torch.zeros(4))
    with pytest.raises(ValueError, match="top_p"):
        fastppo.token_logprobs(x, labels, top_p=0.0)
    with pytest.raises(TypeError, match="top_k"):
        fastppo.token_logprobs(x, labels, top_k=2.5)
    with pytest.raises(ValueError, match="inplace_backward"):
        fastppo.token_logprobs(x, labels, top_k=5, inplace_backward=True, backend="cpp")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k,top_p", SUPPORTS)
def test_linear_ops_truncate_each_chunk(backend, top_k, top_p):
    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(2, 9, 16, generator=g), torch.randn(97, 16, generator=g) * 0.5
    z64 = (h.double() @ w.double().T) / 0.8
    keep = filter_logits(z64.reshape(-1, 97), top_k, top_p).view(2, 9, 97) > -math.inf
    labels = torch.where(keep, z64, torch.tensor(-math.inf, dtype=F64)).argmax(-1)
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = fastppo.linear_logprobs_and_entropy(hr, wr, labels, temperature=0.8, top_k=top_k, top_p=top_p,
                                                  backend=backend, chunk_size=5)
    # A random upstream gradient, zero on some rows: the CPU backward recomputes only the rows that have one, and
    # must filter those with the same support.
    u_lp, u_ent = torch.randn(2, 9, generator=g, dtype=F64), torch.randn(2, 9, generator=g, dtype=F64)
    u_lp[:, ::3], u_ent[:, ::3] = 0.0, 0.0
    ((lp * u_lp.float()).sum() + (ent * u_ent.float()).sum()).backward()
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    e_lp, e_ent = ref.logprobs_and_entropy(h64 @ w64.T, labels, temperature=0.8, top_k=top_k, top_p=top_p)
    ((e_lp * u_lp).sum() + (e_ent * u_ent).sum()).backward()
    assert_close(lp, e_lp, F32)
    assert_close(ent, e_ent, F32)
    assert_close(hr.grad, h64.grad, F32, "grad")
    assert_close(wr.grad, w64.grad, F32, "grad")


@pytest.mark.usefixtures("one_rank_group")
@pytest.mark.parametrize("entry,backend", ENTRIES)
@pytest.mark.parametrize("settings", [{"top_k": 6}, {"top_p": 0.8, "policy_loss": "cispo", "clip_low": 1.0,
                                                      "clip_high": 4.0},
                                      {"top_k": 10, "top_p": 0.9, "importance_sampling_level": "sequence"}],
                         ids=["top-k", "top-p-cispo", "both-gspo"])
def test_the_fused_losses_take_the_truncated_support(entry, backend, settings):
    x = make_inputs(seed=11)
    obj = PPOObjective(kl_coef=0.05, entropy_coef=0.01, temperature=0.9, **settings)
    logits = x["hidden"] @ x["weight"].T
    z64 = logits.double() / 0.9
    keep = filter_logits(z64.reshape(-1, z64.shape[-1]), obj.top_k, obj.top_p).view(z64.shape) > -math.inf
    x["labels"] = torch.where(keep, z64, torch.tensor(-math.inf, dtype=F64)).argmax(-1)  # sampled inside
    if entry in ("vp_logits", "vp_hidden"):
        with pytest.raises(NotImplementedError, match="top_k/top_p"):
            call(entry, backend, x, objective=obj)
        return
    on_logits = entry == "logits"
    lg = logits.clone().requires_grad_(on_logits)
    h = x["hidden"].clone().requires_grad_(not on_logits)
    loss, stats = call(entry, backend, {**x, "hidden": h, "logits": lg}, objective=obj)
    (grad,) = torch.autograd.grad(loss, lg if on_logits else h)
    h64 = x["hidden"].double().requires_grad_()
    l64 = h64 @ x["weight"].double().T
    l64.retain_grad()
    want, want_stats = ref.ppo_loss_from_logits(l64, x["labels"], x["old"].double(), x["adv"].double(), x["mask"],
                                                ref_logprobs=x["ref"].double(), objective=obj)
    want.backward()
    assert_close(loss, want, F32)
    assert_close(grad, l64.grad if on_logits else h64.grad, F32, "grad")
    for k in ("entropy", "ratio_mean", "kl"):
        assert_close(stats[k], want_stats[k], F32)
