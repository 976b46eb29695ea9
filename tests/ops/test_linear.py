"""Fused LM head (``linear_logprobs``, ``linear_logprobs_and_entropy``, ``ppo_loss_from_hidden``) against the
float64 reference (``fastppo.reference.linear``: materialised logits + the logits references), on every CPU
backend: torch (chunked PyTorch), cpp (C++ row kernels), triton (row kernels under ``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import fastppo
from fastppo.autograd_linear import chunk_rows
from fastppo.linear import ppo_loss_and_terms_from_hidden
from fastppo.reference import agg_loss
from fastppo.reference import linear as RL
from fastppo.reference.losses import AGG_MODES
from tests.helpers import input_grads, leaves, linear_inputs
from tests.tolerances import assert_close, assert_no_worse_than_torch

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


def _backends() -> list[str]:
    avail = fastppo.backends()
    out = ["torch"]
    for name in ("cpp", "triton"):
        if avail[name].available or (name == "triton" and avail["triton-interpret"].available):
            out.append(name)
    return out


BACKENDS = _backends()


def _lp_case(backend, dtype, lead=(3, 5), h=13, v=257, bias=True, temperature=0.8, chunk=None, seed=0):
    """Run linear_logprobs_and_entropy with random upstream grads; return (ours, fp64 reference) values + grads."""
    hid, w, b, lab = linear_inputs(lead, h, v, dtype, bias=bias, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    g_lp, g_h = torch.randn(lead, generator=g), torch.randn(lead, generator=g)
    x = leaves(hid, w, b)
    lp, ent = fastppo.linear_logprobs_and_entropy(x[0], x[1], lab, bias=x[2], temperature=temperature,
                                                  backend=backend, chunk_size=chunk)
    grads = input_grads((lp * g_lp + ent * g_h).sum(), x)
    r = leaves(hid, w, b, dtype=F64)
    e_lp, e_ent = RL.linear_logprobs_and_entropy(r[0], r[1], lab, bias=r[2], temperature=temperature)
    e_grads = input_grads((e_lp * g_lp.double() + e_ent * g_h.double()).sum(), r)
    return (lp, ent, *grads), (e_lp, e_ent, *e_grads), (hid, w, b, lab, g_lp, g_h)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_grads_fp32(backend, bias):
    ours, ref64, _ = _lp_case(backend, F32, bias=bias, chunk=4)
    assert ours[0].dtype == F32 and ours[0].shape == (3, 5)
    for i, (a, e) in enumerate(zip(ours, ref64, strict=True)):
        if e is not None:
            assert_close(a, e, F32, "value" if i < 2 else "grad")


def test_float64_reference_path():
    # float64 inputs take the PyTorch row formulas (auto dispatch; kernels take fp32/bf16/fp16): exact to 1e-10.
    ours, ref64, _ = _lp_case(None, F64, chunk=3, h=7, v=61)
    for i, (a, e) in enumerate(zip(ours, ref64, strict=True)):
        assert_close(a, e, F64, "value" if i < 2 else "grad")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_low_precision_no_worse_than_pytorch(backend, dtype):
    ours, ref64, (hid, w, b, lab, g_lp, g_h) = _lp_case(backend, dtype, lead=(4, 6), h=24, v=301, chunk=5, seed=3)
    # Eager PyTorch in the same dtype: linear + log_softmax + gather + entropy, backward in that dtype.
    x = leaves(hid, w, b)
    logits = torch.nn.functional.linear(x[0], x[1], x[2]) / 0.8
    lsm = torch.log_softmax(logits, -1)
    lp = lsm.gather(-1, lab[..., None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    eager = [lp, ent, *input_grads((lp * g_lp.to(dtype) + ent * g_h.to(dtype)).sum(), x)]
    for a, e, t in zip(ours, ref64, eager, strict=True):
        assert a.dtype == (F32 if a.dim() == 2 and a.shape == (4, 6) else dtype)
        assert_no_worse_than_torch(a, e, t)


@pytest.mark.parametrize("v", [1, 17, 32001, 151936])
def test_vocabulary_sizes(v):
    backend = "cpp" if "cpp" in BACKENDS else "torch"
    ours, ref64, _ = _lp_case(backend, F32, lead=(3,), h=9, v=v, chunk=2, seed=v)
    for i, (a, e) in enumerate(zip(ours, ref64, strict=True)):
        assert_close(a, e, F32, "value" if i < 2 else "grad")
    if v == 1:
        assert ours[0].abs().max() < 1e-6 and ours[1].abs().max() < 1e-6  # one token: logp 0, entropy 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_sizes_agree(backend):
    n = 11
    results = [_lp_case(backend, F32, lead=(n,), h=6, v=97, chunk=c, seed=7)[0] for c in (1, 3, n, 4 * n)]
    for other in results[1:]:
        for a, e in zip(results[0], other, strict=True):
            if e is not None:
                assert_close(a, e.double(), F32, "grad")


def test_default_chunk_is_independent_of_the_batch():
    c = chunk_rows(151936, 4096, BF16, torch.device("cuda"))
    assert c == chunk_rows(151936, 4096, BF16, torch.device("cuda"))  # no N argument at all
    assert c % 8 == 0 and c * 151936 * 2 <= 512 * 2**20
    assert chunk_rows(151936, 512, F32, torch.device("cpu"), budget_bytes=1) == 1
    assert chunk_rows(17, 8, F32, torch.device("cpu")) > 10_000
    # the torch backend's row math copies the chunk a few times: it gets a quarter of the budget
    cpu = chunk_rows(151936, 512, F32, torch.device("cpu"))
    assert cpu == chunk_rows(151936, 512, F32, torch.device("cpu"), budget_bytes=192 * 2**20) == 328
    assert chunk_rows(151936, 512, F32, torch.device("cpu"), backend="torch") == chunk_rows(
        151936, 512, F32, torch.device("cpu"), budget_bytes=48 * 2**20) == 80
    # a row's values do not depend on how many other rows there are (fixed chunk size)
    hid, w, b, lab = linear_inputs((40,), 8, 211, seed=9)
    full = fastppo.linear_logprobs(hid, w, lab, bias=b, chunk_size=8)
    part = fastppo.linear_logprobs(hid[:13], w, lab[:13], bias=b, chunk_size=8)
    assert_close(part, full[:13].double(), F32)


def test_non_scalar_upstream_and_leading_shapes():
    hid, w, b, lab = linear_inputs((2, 3, 4), 5, 33, seed=2)
    x = leaves(hid, w, b)
    lp = fastppo.linear_logprobs(x[0], x[1], lab, bias=x[2], chunk_size=5)
    assert lp.shape == (2, 3, 4)
    up = torch.randn(2, 3, 4)
    grads = torch.autograd.grad(lp, x, grad_outputs=up)
    r = leaves(hid, w, b, dtype=F64)
    e = RL.linear_logprobs(r[0], r[1], lab, bias=r[2])
    e_grads = torch.autograd.grad(e, r, grad_outputs=up.double())
    assert_close(lp, e, F32)
    for a, eg in zip(grads, e_grads, strict=True):
        assert_close(a, eg, F32, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_weight_accumulates(backend):
    # The LM head shares its weight with the input embedding: both uses add into one .grad.
    g = torch.Generator().manual_seed(11)
    v, h = 53, 10
    emb = torch.randn(v, h, generator=g) * 0.5
    ids = torch.randint(0, v, (3, 6), generator=g)
    lab = torch.randint(0, v, (3, 6), generator=g)

    def run(e, fn):
        hidden = torch.tanh(torch.nn.functional.embedding(ids, e) * 1.3)
        lp, ent = fn(hidden, e)
        return (lp * 0.7 + ent * 0.2).sum()

    e1 = emb.clone().requires_grad_()
    run(e1, lambda hh, ee: fastppo.linear_logprobs_and_entropy(hh, ee, lab, backend=backend, chunk_size=4)).backward()
    e2 = emb.double().requires_grad_()
    run(e2, lambda hh, ee: RL.linear_logprobs_and_entropy(hh, ee, lab)).backward()
    assert_close(e1.grad, e2.grad, F32, "grad")


def test_frozen_weight_only_hidden_grad():
    hid, w, _, lab = linear_inputs((7,), 6, 40, bias=False, seed=5)
    x = hid.clone().requires_grad_()
    lp = fastppo.linear_logprobs(x, w, lab, chunk_size=3)
    lp.sum().backward()
    r = hid.double().requires_grad_()
    RL.linear_logprobs(r, w.double(), lab).sum().backward()
    assert w.grad is None
    assert_close(x.grad, r.grad, F32, "grad")


def test_empty_batch():
    hid, w, b, lab = linear_inputs((0,), 6, 40)
    x = leaves(hid, w, b)
    lp, ent = fastppo.linear_logprobs_and_entropy(x[0], x[1], lab, bias=x[2])
    assert lp.shape == (0,) and ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert x[0].grad.shape == (0, 6) and torch.all(x[1].grad == 0) and torch.all(x[2].grad == 0)
    hid, w, b, lab = linear_inputs((2, 0), 6, 40)
    with pytest.raises(ValueError, match="empty batch"):
        fastppo.ppo_loss_from_hidden(hid, w, lab, torch.zeros(2, 0), torch.zeros(2, 0), torch.ones(2, 0))


def test_clear_errors():
    hid, w, b, lab = linear_inputs((2, 4), 6, 40)
    with pytest.raises(ValueError, match="labels out of range"):
        fastppo.linear_logprobs(hid, w, lab + 40)
    with pytest.raises(ValueError, match="labels out of range"):
        fastppo.linear_logprobs(hid, w, lab - 40, backend="torch")
    bad = hid.clone()
    bad[1, 2, 3] = float("nan")
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="non-finite"):
            fastppo.linear_logprobs_and_entropy(bad, w, lab, backend=backend)
    with pytest.raises(ValueError, match="non-finite"):
        fastppo.ppo_loss_from_hidden(bad, w, lab, torch.zeros(2, 4), torch.ones(2, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="H = 6"):
        fastppo.linear_logprobs(hid, w[:, :5], lab)
    with pytest.raises(TypeError, match="one dtype"):
        fastppo.linear_logprobs(hid, w.double(), lab)
    with pytest.raises(ValueError, match=r"bias must be \[V\]"):
        fastppo.linear_logprobs(hid, w, lab, bias=b[:3])
    with pytest.raises(ValueError, match="labels has shape"):
        fastppo.linear_logprobs(hid, w, lab[:, :3])
    with pytest.raises(TypeError, match="integer"):
        fastppo.linear_logprobs(hid, w, lab.float())
    with pytest.raises(ValueError, match="chunk_size"):
        fastppo.linear_logprobs(hid, w, lab, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        fastppo.linear_logprobs(hid, w, lab, temperature=0.0)
    with pytest.raises(ValueError, match="all-masked"):
        fastppo.ppo_loss_from_hidden(hid, w, lab, torch.zeros(2, 4), torch.ones(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        fastppo.ppo_loss_from_hidden(hid, w, lab, torch.zeros(2, 4), torch.ones(2, 4), torch.ones(2, 4), kl_coef=0.1)


# ------------------------------------------------------------------------------------------------ PPO loss
def _ppo_inputs(lead, v, seed):
    hid, w, b, lab = linear_inputs(lead, 11, v, seed=seed)
    with torch.no_grad():
        lp = RL.linear_logprobs(hid.double(), w.double(), lab, bias=b.double())
    g = torch.Generator().manual_seed(seed + 1)
    old = (lp + 0.3 * torch.randn(lead, generator=g, dtype=F64)).float()
    ref_lp = (lp + 0.3 * torch.randn(lead, generator=g, dtype=F64)).float()
    adv = torch.randn(lead, generator=g)
    mask = torch.rand(lead, generator=g) > 0.3
    mask.view(-1)[0] = True
    return hid, w, b, lab, old, ref_lp, adv, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg,kl_kind,dual", [("token-mean", "k3", 3.0), ("seq-mean-token-mean", "k1", None),
                                              ("seq-mean-token-sum", "k2", None),
                                              ("seq-mean-token-sum-norm", "abs", 2.0)])
def test_ppo_loss_from_hidden_matches_fp64(backend, agg, kl_kind, dual):
    hid, w, b, lab, old, ref_lp, adv, mask = _ppo_inputs((3, 7), 89, seed=21)
    kw = dict(ref_logprobs=ref_lp, kl_coef=0.05, kl_kind=kl_kind, entropy_coef=0.02, clip_high=0.28,
              dual_clip=dual, temperature=0.9, agg=agg)
    x = leaves(hid, w, b)
    loss, stats = fastppo.ppo_loss_from_hidden(x[0], x[1], lab, old, adv, mask, bias=x[2], backend=backend,
                                               chunk_size=4, **kw)
    grads = input_grads(loss * 1.7, x)  # an upstream gradient other than 1
    r = leaves(hid, w, b, dtype=F64)
    e_loss, e_stats = RL.ppo_loss_from_hidden(r[0], r[1], lab, old.double(), adv.double(), mask, bias=r[2],
                                              **{**kw, "ref_logprobs": ref_lp.double()})
    e_grads = input_grads(e_loss * 1.7, r)
    assert loss.dtype == F32 and loss.shape == ()
    assert_close(loss, e_loss, F32)
    for a, e in zip(grads, e_grads, strict=True):
        assert_close(a, e, F32, "grad")
    assert set(stats) == set(e_stats)
    for k in stats:
        assert_close(stats[k], e_stats[k], F32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_loss_from_hidden_on_policy(backend):
    """``old_logprobs=None``: each token's own log-prob, detached, is its old one (ratio 1, no clipping), the same
    loss and gradients as passing the float64 log-probs of the same weights explicitly."""
    hid, w, b, lab, _, ref_lp, adv, mask = _ppo_inputs((3, 7), 89, seed=5)
    kw = dict(ref_logprobs=ref_lp, kl_coef=0.05, entropy_coef=0.02, temperature=0.9, agg="seq-mean-token-mean")
    x = leaves(hid, w, b)
    loss, stats, tok = ppo_loss_and_terms_from_hidden(x[0], x[1], lab, None, adv, mask, bias=x[2], backend=backend,
                                                      chunk_size=4, **kw)
    grads = input_grads(loss * 0.7, x)
    r = leaves(hid, w, b, dtype=F64)
    with torch.no_grad():
        e_lp, e_ent = RL.linear_logprobs_and_entropy(r[0], r[1], lab, bias=r[2], temperature=0.9)
    e_loss, e_stats = RL.ppo_loss_from_hidden(r[0], r[1], lab, e_lp, adv.double(), mask, bias=r[2],
                                              **{**kw, "ref_logprobs": ref_lp.double()})
    e_grads = input_grads(e_loss * 0.7, r)
    assert_close(loss, e_loss, F32)
    for a, e in zip(grads, e_grads, strict=True):
        assert_close(a, e, F32, "grad")
    assert stats["clipfrac"] == 0 and abs(float(stats["ratio_mean"]) - 1.0) < 1e-6
    for k in stats:
        assert_close(stats[k], e_stats[k], F32)
    valid = mask.bool()
    assert_close(tok["logprobs"][valid], e_lp[valid], F32)
    assert_close(tok["entropy"][valid], e_ent[valid], F32)
    # the public op gives the same loss
    l2, _ = fastppo.ppo_loss_from_hidden(hid, w, lab, None, adv, mask, bias=b, backend=backend, chunk_size=4, **kw)
    assert torch.equal(l2, loss.detach())


def test_ppo_loss_matches_from_logits_op():
    hid, w, b, lab, old, ref_lp, adv, mask = _ppo_inputs((2, 9), 130, seed=4)
    kw = dict(ref_logprobs=ref_lp, kl_coef=0.1, entropy_coef=0.01)
    loss, stats = fastppo.ppo_loss_from_hidden(hid, w, lab, old, adv, mask, bias=b, chunk_size=5, **kw)
    l2, s2 = fastppo.ppo_loss_from_logits(torch.nn.functional.linear(hid, w, b), lab, old, adv, mask, **kw)
    assert_close(loss, l2.double(), F32)
    for k in s2:
        assert_close(stats[k], s2[k].double(), F32)


def test_ppo_without_grad_and_without_ref():
    hid, w, b, lab, old, _, adv, mask = _ppo_inputs((4, 5), 64, seed=8)
    x = leaves(hid, w, b)
    with torch.no_grad():
        loss, stats = fastppo.ppo_loss_from_hidden(x[0], x[1], lab, old, adv, mask, bias=x[2])
    assert not loss.requires_grad and "kl" not in stats
    e_loss, _ = RL.ppo_loss_from_hidden(hid.double(), w.double(), lab, old.double(), adv.double(), mask,
                                        bias=b.double())
    assert_close(loss, e_loss, F32)


def test_agg_weights_equal_agg_loss():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(4, 6, generator=g) > 0.4
    mask[2] = False
    mask[0, 0] = True
    lmat = torch.randn(4, 6, generator=g, dtype=F64)
    for agg in AGG_MODES:
        w = RL.agg_weights(mask.double(), agg)
        assert torch.allclose((w * lmat).sum(), agg_loss(lmat, mask, agg), atol=1e-12, rtol=1e-12)
        assert torch.all(w[~mask] == 0)


# ------------------------------------------------------------------------------ compile, checkpointing
def test_compile_fullgraph():
    hid, w, b, lab, old, ref_lp, adv, mask = _ppo_inputs((2, 6), 70, seed=12)

    def step(h, w_, b_):
        lp, ent = fastppo.linear_logprobs_and_entropy(h, w_, lab, bias=b_, chunk_size=5)
        loss, stats = fastppo.ppo_loss_from_hidden(h, w_, lab, old, adv, mask, bias=b_, ref_logprobs=ref_lp,
                                                   kl_coef=0.05, entropy_coef=0.01, chunk_size=5)
        return loss + 0.1 * (lp * ent).mean(), stats["clipfrac"]

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = leaves(hid, w, b)
    out, cf = compiled(*x)
    grads = input_grads(out, x)
    y = leaves(hid, w, b)
    e_out, e_cf = step(*y)
    e_grads = input_grads(e_out, y)
    assert_close(out, e_out.double(), F32)
    assert_close(cf, e_cf.double(), F32)
    for a, e in zip(grads, e_grads, strict=True):
        assert_close(a, e.double(), F32, "grad")


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing(reentrant):
    hid, w, b, lab, old, ref_lp, adv, mask = _ppo_inputs((2, 6), 70, seed=13)
    proj = torch.randn(11, 11, generator=torch.Generator().manual_seed(1)) * 0.3

    def block(h, w_, b_):
        h = torch.tanh(h @ proj)
        loss, _ = fastppo.ppo_loss_from_hidden(h, w_, lab, old, adv, mask, bias=b_, ref_logprobs=ref_lp,
                                               kl_coef=0.05, entropy_coef=0.01, chunk_size=5)
        lp = fastppo.linear_logprobs(h, w_, lab, bias=b_, chunk_size=3)
        return loss + 0.01 * lp.sum()

    x = leaves(hid, w, b)
    checkpoint(block, *x, use_reentrant=reentrant).backward()  # reentrant checkpointing forbids autograd.grad
    y = leaves(hid, w, b)
    block(*y).backward()
    for a, e in zip(x, y, strict=True):
        assert_close(a.grad, e.grad.double(), F32, "grad")


def test_tied_weight_accumulates_through_the_ppo_loss():
    g = torch.Generator().manual_seed(17)
    v, h = 41, 9
    emb = torch.randn(v, h, generator=g) * 0.5
    ids = torch.randint(0, v, (2, 5), generator=g)
    lab = torch.randint(0, v, (2, 5), generator=g)
    old = torch.randn(2, 5, generator=g) - 3.5
    adv = torch.randn(2, 5, generator=g)
    mask = torch.ones(2, 5)

    def run(e, fn):
        hidden = torch.tanh(torch.nn.functional.embedding(ids, e) * 1.3)
        return fn(hidden, e)[0] * 2.0  # an upstream gradient other than 1

    e1 = emb.clone().requires_grad_()
    run(e1, lambda hh, ee: fastppo.ppo_loss_from_hidden(hh, ee, lab, old, adv, mask, entropy_coef=0.1,
                                                        chunk_size=3)).backward()
    e2 = emb.double().requires_grad_()
    run(e2, lambda hh, ee: RL.ppo_loss_from_hidden(hh, ee, lab, old.double(), adv.double(), mask,
                                                   entropy_coef=0.1)).backward()
    assert_close(e1.grad, e2.grad, F32, "grad")


def test_masked_tokens_skip_the_lm_head_on_cpu(monkeypatch):
    """On CPU only the valid tokens reach the LM-head matmul; the loss, stats and gradients equal those of the batch
    of valid tokens alone (bitwise: same rows, same chunks), and masked rows get exactly zero terms and gradient."""
    import fastppo.autograd_linear as AL

    hid, w, b, lab, old, ref_lp, adv, mask = _ppo_inputs((4, 9), 97, seed=30)
    rows: list[int] = []
    real = AL._chunk_logits
    monkeypatch.setattr(AL, "_chunk_logits", lambda h, *a: rows.append(h.shape[0]) or real(h, *a))
    kw = dict(ref_logprobs=ref_lp, kl_coef=0.05, entropy_coef=0.02, chunk_size=4)
    x = leaves(hid, w, b)
    loss, stats = fastppo.ppo_loss_from_hidden(x[0], x[1], lab, old, adv, mask, bias=x[2], **kw)
    loss.backward()
    n_valid = int(mask.sum())
    assert sum(rows) == n_valid < mask.numel()
    keep = mask.bool()
    y = leaves(hid[keep], w, b)
    loss2, stats2 = fastppo.ppo_loss_from_hidden(
        y[0], y[1], lab[keep], old[keep], adv[keep], torch.ones(n_valid), bias=y[2],
        **{**kw, "ref_logprobs": ref_lp[keep]})
    loss2.backward()
    assert torch.equal(loss, loss2)
    assert torch.equal(x[0].grad[keep], y[0].grad) and torch.equal(x[0].grad[~keep], torch.zeros_like(x[0].grad[~keep]))
    assert torch.equal(x[1].grad, y[1].grad) and torch.equal(x[2].grad, y[2].grad)
    for k in stats:  # reductions over [4, 9] vs [n_valid]: equal up to summation order
        torch.testing.assert_close(stats[k], stats2[k], rtol=1e-6, atol=1e-7)


def test_rows_without_upstream_gradient_skip_the_backward_on_cpu(monkeypatch):
    """On CPU the backward of ``linear_logprobs_and_entropy`` recomputes only the rows with a non-zero upstream
    gradient; the gradients equal those of the same rows alone (bitwise), with exactly zero ``dh`` elsewhere."""
    import fastppo.autograd_linear as AL

    hid, w, b, lab = linear_inputs((4, 9), 16, 97, F32, bias=True, seed=31)
    g = torch.Generator().manual_seed(32)
    keep = torch.rand(4, 9, generator=g) < 0.6
    g_lp = torch.randn(4, 9, generator=g) * keep
    g_h = torch.randn(4, 9, generator=g) * keep
    g_h[0, 0], keep[0, 0] = 0.5, True  # an entropy gradient alone keeps a row too
    rows: list[int] = []
    real = AL._chunk_logits
    x = leaves(hid, w, b)
    lp, ent = fastppo.linear_logprobs_and_entropy(x[0], x[1], lab, bias=x[2], chunk_size=4)
    monkeypatch.setattr(AL, "_chunk_logits", lambda h, *a: rows.append(h.shape[0]) or real(h, *a))
    (lp * g_lp + ent * g_h).sum().backward()
    assert sum(rows) == int(keep.sum()) < keep.numel()
    y = leaves(hid[keep], w, b)
    lp2, ent2 = fastppo.linear_logprobs_and_entropy(y[0], y[1], lab[keep], bias=y[2], chunk_size=4)
    (lp2 * g_lp[keep] + ent2 * g_h[keep]).sum().backward()
    assert torch.equal(x[0].grad[keep], y[0].grad) and not x[0].grad[~keep].any()
    assert torch.equal(x[1].grad, y[1].grad) and torch.equal(x[2].grad, y[2].grad)
