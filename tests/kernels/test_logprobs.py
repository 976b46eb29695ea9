"""Triton row kernels (logprobs, entropy, fused PPO terms, backward) against the float64 reference.

Runs on CPU under ``TRITON_INTERPRET=1`` with small shapes; the ``gpu`` tests at the end repeat the checks at
real sizes on a CUDA device. Both the launchers (``fastppo.kernels``) and the public ops with
``backend="triton"`` are exercised.
"""

from __future__ import annotations

import pytest
import torch

import fastppo
import fastppo.autograd as fa
from fastppo import kernels as fk
from fastppo import reference as ref
from fastppo.reference.losses import LOG_RATIO_CLAMP
from tests.tolerances import assert_close, assert_no_worse_than_torch

K = fk.logprobs
logprobs_forward, logprobs_backward, ppo_loss_forward = fk.logprobs_forward, fk.logprobs_backward, fk.ppo_loss_forward

NEG_INF = float("-inf")
F32 = torch.float32


def _logits(shape: tuple[int, ...], v: int, seed: int, scale: float = 2.0, dtype=F32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, v, generator=g) * scale
    labels = torch.randint(0, v, shape, generator=g)
    return x.to(dtype).to(device), labels.to(device)


def _finite64(x: torch.Tensor) -> torch.Tensor:
    """fp64 copy with -inf replaced by -1e4: same forward values (exp underflows to exactly 0 in fp64) but finite
    gradients, where the reference's autograd of p*log p at p = 0 would give 0 * -inf = NaN."""
    x64 = x.detach().double()
    return torch.where(x64 == NEG_INF, torch.full_like(x64, -1e4), x64)


def _ref_grad(x: torch.Tensor, labels: torch.Tensor, temperature: float, g_lp, g_h) -> torch.Tensor:
    """dlogits of sum(g_lp*logp + g_h*entropy) by fp64 autograd through the reference."""
    x64 = _finite64(x).requires_grad_()
    lp, h = ref.logprobs_and_entropy(x64, labels, temperature=temperature)
    total = 0.0
    if g_lp is not None:
        total = total + (lp * g_lp.double().view_as(lp)).sum()
    if g_h is not None:
        total = total + (h * g_h.double().view_as(h)).sum()
    total.backward()
    return x64.grad


def _flat3(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(1, -1, x.shape[-1]) if x.dim() != 3 else x


# ------------------------------------------------------------------------------------------------ contract
def test_ppo_terms_order_matches_autograd():
    assert K.PPO_TERMS == fa.PPO_TERMS
    assert K.KL_KINDS == fa.KL_KINDS
    assert K.LOG_RATIO_CLAMP == LOG_RATIO_CLAMP


def test_block_config_depends_on_vocab_and_dtype_only():
    for v in (1, 17, 1271, 32000, 151936):
        blk, _ = K.row_config(v, torch.bfloat16)
        assert blk >= 16 and blk & (blk - 1) == 0


# ------------------------------------------------------------------------------------------------ launchers
@pytest.mark.parametrize(
    "n,v,temperature,blocks",
    [(41, 1271, 1.0, False), (41, 1271, 0.7, True), (7, 32000, 1.0, False), (7, 32000, 1.3, False),
     (5, 1, 1.0, False), (6, 129, 2.0, True)],
)
def test_forward_launcher_matches_fp64(n, v, temperature, blocks, request, device):
    if blocks:
        request.getfixturevalue("small_block")
    x, lab = _logits((n,), v, seed=n + v, device=device)
    logp, ent, lse = logprobs_forward(_flat3(x), lab, temperature, True)
    e_lp, e_h = ref.logprobs_and_entropy(x.double(), lab, temperature=temperature)
    assert logp.dtype == ent.dtype == lse.dtype == F32
    assert_close(logp, e_lp, F32)
    assert_close(ent, e_h, F32)
    assert_close(lse, torch.logsumexp(x.double() / temperature, -1), F32)
    logp2, none, lse2 = logprobs_forward(_flat3(x), lab, temperature, False)
    assert none is None
    assert torch.equal(logp2, logp) and torch.equal(lse2, lse)


def test_peaked_flat_and_shifted_rows(small_block, device):
    v = 1271
    x, lab = _logits((6,), v, seed=1)
    x[0, 700] = 1e4  # peaked: entropy ~ 0, logp of the peak ~ 0
    lab[0] = 700
    x[1] = 3.0  # flat: entropy = log V
    x[2] += 1e3  # a large common shift must not cost precision (entropy from log s - w/s)
    x[3, 5] = 60.0  # peaked but with mass elsewhere
    x[4] = x[4] * 30  # very spiky distribution
    x = x.to(device)
    lab = lab.to(device)
    for temperature in (1.0, 0.6):
        logp, ent, _ = logprobs_forward(_flat3(x), lab, temperature, True)
        e_lp, e_h = ref.logprobs_and_entropy(x.double(), lab, temperature=temperature)
        assert_close(logp, e_lp, F32)
        assert_close(ent, e_h, F32)
    assert abs(float(ent[1]) - float(torch.log(torch.tensor(float(v))))) < 1e-5


def test_neg_inf_entries_values_and_grads(small_block, device):
    v, blk = 1271, small_block
    x, lab = _logits((5,), v, seed=2)
    x[0, :blk] = NEG_INF  # the first chunk entirely -inf: the running max starts at -inf
    x[1, blk:3 * blk] = NEG_INF  # two whole chunks in the middle
    x[2, 1:] = NEG_INF  # a single finite logit
    x[3, torch.randperm(v)[:900]] = NEG_INF  # scattered masked vocabulary
    x[4, 1200:] = NEG_INF  # the partial last chunk
    lab = torch.tensor([blk + 5, 3 * blk + 1, 0, 0, 3])
    lab[3] = int((x[3] > NEG_INF).nonzero()[0])  # labels sit on finite logits
    x, lab = x.to(device), lab.to(device)
    for temperature in (1.0, 0.8):
        logp, ent, lse = logprobs_forward(_flat3(x), lab, temperature, True)
        e_lp, e_h = ref.logprobs_and_entropy(x.double(), lab, temperature=temperature)
        assert_close(logp, e_lp, F32)
        assert_close(ent, e_h, F32)
        g = torch.Generator().manual_seed(3)
        g_lp, g_h = torch.randn(5, generator=g).to(device), torch.randn(5, generator=g).to(device)
        out = torch.empty_like(x)
        logprobs_backward(_flat3(x), lab, lse, ent, g_lp, g_h, temperature, _flat3(out))
        assert_close(out, _ref_grad(x, lab, temperature, g_lp, g_h), F32, "grad")
        assert torch.all(out[x == NEG_INF] == 0)


@pytest.mark.parametrize(
    "which,blocks,n", [("both", False, 41), ("both", True, 13), ("logp", True, 9), ("entropy", False, 9),
                       ("none", True, 5)]
)
def test_backward_launcher_matches_fp64(which, blocks, n, request, device):
    if blocks:
        request.getfixturevalue("small_block")
    v, temperature = 1271, 0.9
    x, lab = _logits((n,), v, seed=5, device=device)
    logp, ent, lse = logprobs_forward(_flat3(x), lab, temperature, True)
    g = torch.Generator().manual_seed(6)
    g_lp = torch.randn(n, generator=g).to(device) if which in ("both", "logp") else None
    g_h = torch.randn(n, generator=g).to(device) if which in ("both", "entropy") else None
    for gg in (g_lp, g_h):
        if gg is not None:
            gg[::4] = 0.0  # masked tokens: zero upstream gradient
    out = torch.full_like(x, float("nan"))  # every element must be written
    logprobs_backward(_flat3(x), lab, lse, ent, g_lp, g_h, temperature, _flat3(out))
    if which == "none":
        assert torch.equal(out, torch.zeros_like(x))
        return
    assert_close(out, _ref_grad(x, lab, temperature, g_lp, g_h), F32, "grad")
    if which == "both":
        assert torch.equal(out[::4], torch.zeros_like(out[::4]))  # both grads zero on those rows


def test_backward_in_place_equals_out_of_place(device):
    x, lab = _logits((3, 5), 1271, seed=7, device=device)
    x3 = x
    logp, ent, lse = logprobs_forward(x3, lab.reshape(-1), 1.2, True)
    g_lp, g_h = torch.randn(15, device=device), torch.randn(15, device=device)
    out = torch.empty_like(x)
    logprobs_backward(x3, lab.reshape(-1), lse, ent, g_lp, g_h, 1.2, out)
    buf = x.clone()
    ret = logprobs_backward(buf, lab.reshape(-1), lse, ent, g_lp, g_h, 1.2, buf)
    assert ret is buf
    assert torch.equal(buf, out)


def test_launcher_strided_rows(device):
    """3-D views with arbitrary B/T strides, as the contract allows; row r -> (r // T, r % T)."""
    big, _ = _logits((4, 7), 300, seed=8, device=device)
    views = [big[:, :-1, :], big.transpose(0, 1)[1:, ::2], big[::2, 1::3]]
    for view in views:
        n = view.shape[0] * view.shape[1]
        lab = torch.randint(0, 300, (n,), device=device)
        logp, ent, lse = logprobs_forward(view, lab, 1.0, True)
        e_lp, e_h = ref.logprobs_and_entropy(view.reshape(n, 300).double(), lab)
        assert_close(logp, e_lp, F32)
        assert_close(ent, e_h, F32)
        out = torch.zeros_like(big)
        o_view = out[:, :-1, :] if view is views[0] else out.transpose(0, 1)[1:, ::2] if view is views[1] \
            else out[::2, 1::3]
        g = torch.randn(n, device=device)
        logprobs_backward(view, lab, lse, ent, g, None, 1.0, o_view)
        assert_close(o_view.reshape(n, 300), _ref_grad(view.reshape(n, 300), lab, 1.0, g, None), F32, "grad")
        untouched = torch.ones_like(out, dtype=torch.bool)
        untouched_view = untouched[:, :-1, :] if view is views[0] else untouched.transpose(0, 1)[1:, ::2] \
            if view is views[1] else untouched[::2, 1::3]
        untouched_view.fill_(False)
        assert torch.all(out[untouched] == 0)  # nothing written outside the view


def test_out_of_range_label_gives_nan_not_a_read(device):
    x, _ = _logits((3,), 50, seed=9, device=device)
    lab = torch.tensor([1, 50, -1], device=device)
    logp, _, _ = logprobs_forward(_flat3(x), lab, 1.0, False)
    assert torch.isfinite(logp[0]) and torch.isnan(logp[1]) and torch.isnan(logp[2])


# --------------------------------------------------------------------------------------------- public ops
@pytest.mark.parametrize("n,v", [(41, 1271), (7, 32000)])
def test_public_ops_values_and_grads(n, v, device):
    x, lab = _logits((n,), v, seed=10 + n, device=device)
    g = torch.Generator().manual_seed(11)
    g_lp, g_h = torch.randn(n, generator=g).to(device), torch.randn(n, generator=g).to(device)
    temperature = 0.8
    xr = x.clone().requires_grad_()
    lp, h = fastppo.logprobs_and_entropy(xr, lab, temperature=temperature, backend="triton")
    ((lp * g_lp).sum() + (h * g_h).sum()).backward()
    e_lp, e_h = ref.logprobs_and_entropy(x.double(), lab, temperature=temperature)
    assert_close(lp, e_lp, F32)
    assert_close(h, e_h, F32)
    assert_close(xr.grad, _ref_grad(x, lab, temperature, g_lp, g_h), F32, "grad")

    # The single-output ops on a few rows (the interpreter is slow; the kernels are the same).
    x, lab, g_lp, g_h, e_lp, e_h = x[:5], lab[:5], g_lp[:5], g_h[:5], e_lp[:5], e_h[:5]
    xr = x.clone().requires_grad_()
    lp = fastppo.token_logprobs(xr, lab, temperature=temperature, backend="triton")
    (lp * g_lp).sum().backward()
    assert_close(lp, e_lp, F32)
    assert_close(xr.grad, _ref_grad(x, lab, temperature, g_lp, None), F32, "grad")

    xr = x.clone().requires_grad_()
    h = fastppo.token_entropy(xr, temperature=temperature, backend="triton")
    (h * g_h).sum().backward()
    assert_close(h, e_h, F32)
    assert_close(xr.grad, _ref_grad(x, lab, temperature, None, g_h), F32, "grad")


def _strided(kind: str, device):
    """``(src, view_of)``: a leaf tensor and the function taking it to a non-contiguous ``[B, T, V]`` view."""
    g = torch.Generator().manual_seed(12)
    b, t, v = 3, 6, 401
    if kind == "sliced":  # the usual shift of causal-LM logits
        return torch.randn(b, t + 1, v, generator=g).to(device), lambda z: z[:, :-1, :]
    if kind == "transposed-sliced":  # rows interleave across B
        return torch.randn(t + 1, b, v, generator=g).to(device), lambda z: z.transpose(0, 1)[:, 1:, :]
    # stride(-1) != 1: the ops layer copies explicitly
    return torch.randn(v, b, t, generator=g).to(device), lambda z: z.permute(1, 2, 0)


@pytest.mark.parametrize("kind", ["sliced", "transposed-sliced", "vocab-strided"])
def test_public_ops_non_contiguous(kind, device):
    src0, view_of = _strided(kind, device)
    src = src0.clone().requires_grad_()
    x = view_of(src)
    assert not x.is_contiguous()
    lab = torch.randint(0, x.shape[-1], x.shape[:-1], device=device)
    g_lp = torch.randn(lab.shape, device=device)
    g_h = torch.randn(lab.shape, device=device)
    lp, h = fastppo.logprobs_and_entropy(x, lab, backend="triton")
    ((lp * g_lp).sum() + (h * g_h).sum()).backward()
    base = view_of(src0)
    e_lp, e_h = ref.logprobs_and_entropy(base.double(), lab)
    assert_close(lp, e_lp, F32)
    assert_close(h, e_h, F32)
    assert_close(view_of(src.grad), _ref_grad(base, lab, 1.0, g_lp, g_h), F32, "grad")
    if kind == "sliced":
        assert torch.all(src.grad[:, -1] == 0)


def test_stride0_upstream_gradient(device):
    x, lab = _logits((4, 5), 1271, seed=13, device=device)
    expected = _ref_grad(x, lab, 1.0, torch.ones(4, 5), None).float()
    xr = x.clone().requires_grad_()
    fastppo.token_logprobs(xr, lab, backend="triton").sum().backward()  # grad is ones(1).expand: stride 0
    assert_close(xr.grad, expected.double(), F32, "grad")
    xr = x.clone().requires_grad_()
    lp = fastppo.token_logprobs(xr, lab, backend="triton")
    lp.backward(torch.ones(1, device=device).expand(4, 5))
    assert_close(xr.grad, expected.double(), F32, "grad")
    xr = x.clone().requires_grad_()
    lp, h = fastppo.logprobs_and_entropy(xr, lab, backend="triton")
    (lp.sum() + 0.5 * h.sum()).backward()
    assert_close(xr.grad, _ref_grad(x, lab, 1.0, torch.ones(4, 5), torch.full((4, 5), 0.5)), F32, "grad")


@pytest.mark.parametrize("op", ["logprobs_and_entropy", "ppo_loss_from_logits"])
def test_inplace_backward_matches_out_of_place(op, device):
    g = torch.Generator().manual_seed(14)
    b, t, d, v = 2, 5, 16, 777
    h0 = torch.randn(b, t, d, generator=g).to(device)
    w0 = (torch.randn(d, v, generator=g) * 0.5).to(device)
    lab = torch.randint(0, v, (b, t), generator=g).to(device)
    old = (torch.randn(b, t, generator=g) * 0.2 - 6).to(device)
    adv = torch.randn(b, t, generator=g).to(device)
    mask = (torch.rand(b, t, generator=g) > 0.3).to(device)
    mask[0, 0] = True

    def run(inplace: bool):
        w = w0.clone().requires_grad_()
        logits = h0 @ w  # non-leaf: what a model's head produces
        if op == "logprobs_and_entropy":
            lp, ent = fastppo.logprobs_and_entropy(logits, lab, backend="triton", inplace_backward=inplace)
            loss = (lp * adv).sum() + 0.1 * ent.sum()
        else:
            loss, _ = fastppo.ppo_loss_from_logits(logits, lab, old, adv, mask, entropy_coef=0.01,
                                                   backend="triton", inplace_backward=inplace)
        buf = logits.detach()  # shares the logits' storage
        loss.backward()
        return w.grad, buf

    grad_out, buf_out = run(False)
    grad_in, buf_in = run(True)
    assert_close(grad_in, grad_out.double(), F32, "grad")
    # The in-place run's logits buffer now holds dlogits: compare with the gradient of a leaf logits.
    w = w0.clone()
    logits = (h0 @ w).requires_grad_()
    if op == "logprobs_and_entropy":
        lp, ent = fastppo.logprobs_and_entropy(logits, lab, backend="triton")
        ((lp * adv).sum() + 0.1 * ent.sum()).backward()
    else:
        loss, _ = fastppo.ppo_loss_from_logits(logits, lab, old, adv, mask, entropy_coef=0.01, backend="triton")
        loss.backward()
    assert torch.equal(buf_in, logits.grad)
    assert not torch.equal(buf_out, logits.grad)  # the out-of-place run leaves the logits alone


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_pytorch(dtype, device):
    n, v, temperature = 41, 1271, 0.9
    x32, lab = _logits((n,), v, seed=15, device=device)
    x = x32.to(dtype)
    g = torch.Generator().manual_seed(16)
    g_lp, g_h = torch.randn(n, generator=g).to(device), torch.randn(n, generator=g).to(device)

    xr = x.clone().requires_grad_()
    lp, h = fastppo.logprobs_and_entropy(xr, lab, temperature=temperature, backend="triton")
    ((lp * g_lp).sum() + (h * g_h).sum()).backward()
    assert lp.dtype == F32 and xr.grad.dtype == dtype

    e_lp, e_h = ref.logprobs_and_entropy(x.double(), lab, temperature=temperature)
    e_grad = _ref_grad(x, lab, temperature, g_lp, g_h)

    # Eager PyTorch in the low-precision dtype, as TRL/verl compute it.
    xe = x.clone().requires_grad_()
    logp_all = torch.log_softmax(xe / temperature, -1)
    t_lp = logp_all.gather(-1, lab[:, None]).squeeze(-1)
    t_h = -(torch.softmax(xe / temperature, -1) * logp_all).sum(-1)
    ((t_lp.float() * g_lp).sum() + (t_h.float() * g_h).sum()).backward()

    assert_no_worse_than_torch(lp, e_lp, t_lp)
    assert_no_worse_than_torch(h, e_h, t_h)
    assert_no_worse_than_torch(xr.grad, e_grad, xe.grad)


@pytest.mark.parametrize("bad", ["nan", "+inf", "all -inf"])
@pytest.mark.parametrize("op", ["token_logprobs", "token_entropy", "ppo_loss_from_logits"])
def test_nonfinite_logits_raise(bad, op, device):
    x, lab = _logits((2, 3), 64, seed=17, device=device)
    if bad == "nan":
        x[1, 2, 7] = float("nan")
    elif bad == "+inf":
        x[1, 2, 7] = float("inf")
    else:
        x[1, 2, :] = NEG_INF
    with pytest.raises(ValueError, match="non-finite"):
        if op == "token_logprobs":
            fastppo.token_logprobs(x, lab, backend="triton")
        elif op == "token_entropy":
            fastppo.token_entropy(x, backend="triton")
        else:
            z = torch.zeros(2, 3, device=device)
            fastppo.ppo_loss_from_logits(x, lab, z, z + 1, torch.ones(2, 3, device=device), backend="triton")


# ---------------------------------------------------------------------------------------------- PPO terms
def _ppo_inputs(b: int, t: int, v: int, seed: int, device):
    x, lab = _logits((b, t), v, seed=seed, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    e_lp = ref.token_logprobs(x.double(), lab).float()
    # old/ref near the current log-probs so that ratios straddle the clip range
    old = (e_lp + torch.randn(b, t, generator=g).to(device) * 0.4).float()
    ref_lp = (e_lp + torch.randn(b, t, generator=g).to(device) * 0.3).float()
    adv = torch.randn(b, t, generator=g).to(device)
    mask = torch.rand(b, t, generator=g).to(device) > 0.3
    mask[:, 0] = True
    return x, lab, old, adv, ref_lp, mask


@pytest.mark.parametrize("kl_kind", ["k1", "k2", "k3", "abs"])
@pytest.mark.parametrize("dual_clip", [0.0, 3.0])
def test_ppo_launcher_terms_match_reference(kl_kind, dual_clip, small_block, device):
    b, t, v = 3, 7, 300
    x, lab, old, adv, ref_lp, mask = _ppo_inputs(b, t, v, seed=20, device=device)
    old[0, 1] = old[0, 1] + 25.0  # |logp - old| > 20: ratio clamped, no gradient
    old[1, 2] = old[1, 2] - 25.0
    old[2, 3] = old[2, 3] + 2.0  # ratio ~ e^-2 ... or e^2 below: one token per clip branch
    old[2, 4] = old[2, 4] - 2.0
    adv[2, 3], adv[2, 4] = 1.0, -1.0  # adv < 0 with ratio e^2 > dual_clip: dual-clipped
    mask[0, 1] = mask[1, 2] = mask[2, 3] = mask[2, 4] = True
    n = b * t
    f = lambda z: z.reshape(-1).float().contiguous()  # noqa: E731
    terms = ppo_loss_forward(x, lab.reshape(-1), f(old), f(adv), f(ref_lp), f(mask), 0.9, 0.2, 0.28, dual_clip,
                             K.KL_KINDS.index(kl_kind), 0.05, 0.01)
    assert terms.shape == (len(K.PPO_TERMS), n) and terms.dtype == F32
    row = {name: terms[i].view(b, t) for i, name in enumerate(K.PPO_TERMS)}
    m = mask

    lp64 = ref.token_logprobs(x.double(), lab, temperature=0.9).requires_grad_()
    ent64 = ref.token_entropy(x.double(), temperature=0.9)
    pg, ratio, clipped, dual = ref.ppo_token_terms(lp64, old.double(), adv.double(), clip_low=0.2, clip_high=0.28,
                                                   dual_clip=dual_clip or None)
    kl = ref.kl_penalty(lp64, ref_lp.double(), kl_kind)
    dpg, = torch.autograd.grad(pg.sum(), lp64, retain_graph=True)
    dkl, = torch.autograd.grad(kl.sum(), lp64)
    z = torch.zeros((), dtype=torch.float64, device=device)
    expect = {
        "logp": lp64.detach(), "entropy": ent64, "lse": torch.logsumexp(x.double() / 0.9, -1), "pg": pg.detach(),
        "ratio": ratio.detach(), "kl": kl.detach(), "dpg": dpg, "dkl": dkl, "clipped": clipped.double(),
        "dual_clipped": dual.double(), "loss": (pg + 0.05 * kl - 0.01 * ent64).detach(),
    }
    for name, e in expect.items():
        assert_close(row[name], torch.where(m, e, z), F32)
        assert torch.all(row[name][~m] == 0), name  # masked rows: zeros in every term
    assert float(row["dpg"][0, 1]) == 0.0 and float(row["dpg"][1, 2]) == 0.0
    if dual_clip:
        assert row["dual_clipped"].sum() > 0  # the dual branch is exercised
    assert row["clipped"].sum() > 0


def test_ppo_launcher_without_ref(device):
    x, lab, old, adv, _, mask = _ppo_inputs(2, 5, 200, seed=21, device=device)
    f = lambda z: z.reshape(-1).float().contiguous()  # noqa: E731
    terms = ppo_loss_forward(x, lab.reshape(-1), f(old), f(adv), None, f(mask), 1.0, 0.2, 0.2, 0.0, 2, 0.0, 0.0)
    row = {name: terms[i] for i, name in enumerate(K.PPO_TERMS)}
    assert torch.all(row["kl"] == 0) and torch.all(row["dkl"] == 0)
    assert torch.equal(row["loss"], row["pg"])


@pytest.mark.parametrize(
    "agg,kl_kind",
    [("token-mean", "k1"), ("seq-mean-token-sum", "k2"), ("seq-mean-token-mean", "k3"),
     ("seq-mean-token-sum-norm", "abs"), ("token-mean", "k3"), ("seq-mean-token-mean", "abs")],
)
@pytest.mark.parametrize("dual_clip", [None, 2.5])
def test_ppo_loss_from_logits_matches_fp64(agg, kl_kind, dual_clip, device):
    b, t, v = 3, 6, 333
    x, lab, old, adv, ref_lp, mask = _ppo_inputs(b, t, v, seed=30, device=device)
    mask[2] = False  # an empty sequence
    kw = dict(ref_logprobs=ref_lp, kl_coef=0.07, kl_kind=kl_kind, entropy_coef=0.02, clip_low=0.2, clip_high=0.3,
              dual_clip=dual_clip, temperature=0.85, agg=agg)
    xr = x.clone().requires_grad_()
    loss, stats = fastppo.ppo_loss_from_logits(xr, lab, old, adv, mask, backend="triton", **kw)
    g_up = 1.7
    (loss * g_up).backward()

    x64 = x.double().requires_grad_()
    e_loss, e_stats = ref.ppo_loss_from_logits(x64, lab, old.double(), adv.double(), mask,
                                               **{**kw, "ref_logprobs": ref_lp.double()})
    (e_loss * g_up).backward()
    assert_close(loss, e_loss, F32)
    assert_close(xr.grad, x64.grad, F32, "grad")
    assert torch.all(xr.grad[~mask] == 0)
    for key in ("pg_loss", "kl", "entropy", "clipfrac", "dual_clipfrac", "ratio_mean", "ratio_max", "approx_kl"):
        assert_close(stats[key], e_stats[key], F32)


def test_ppo_loss_no_kl_no_entropy_and_masked_rows_cost_nothing(device):
    x, lab, old, adv, _, mask = _ppo_inputs(2, 8, 257, seed=31, device=device)
    x[~mask] = float("nan")  # masked rows are never read: their garbage cannot leak
    xr = x.clone().requires_grad_()
    loss, stats = fastppo.ppo_loss_from_logits(xr, lab, old, adv, mask, backend="triton")
    loss.backward()
    x64 = torch.where(mask[..., None], x, torch.zeros_like(x)).double().requires_grad_()
    e_loss, _ = ref.ppo_loss_from_logits(x64, lab, old.double(), adv.double(), mask)
    e_loss.backward()
    assert_close(loss, e_loss, F32)
    assert_close(xr.grad, x64.grad, F32, "grad")
    assert "kl" not in stats


@pytest.mark.parametrize("kl_kind", ["k1", "k2", "k3", "abs"])
def test_ppo_loss_kl_stat_only_ignores_infinite_kl(kl_kind, device):
    """ref_logprobs with kl_coef = 0 feed only the KL statistic: an infinite per-token KL (ref = -inf) must not turn
    the loss or the gradient into 0 * inf = NaN, as the reference (which adds no KL term) shows."""
    x, lab, old, adv, ref_lp, mask = _ppo_inputs(2, 4, 61, seed=45, device=device)
    mask[:] = True
    ref_lp[0, 1] = NEG_INF
    xr = x.clone().requires_grad_()
    loss, _ = fastppo.ppo_loss_from_logits(xr, lab, old, adv, mask, ref_logprobs=ref_lp, kl_coef=0.0,
                                           kl_kind=kl_kind, entropy_coef=0.01, backend="triton")
    loss.backward()
    x64 = x.double().requires_grad_()
    e_loss, _ = ref.ppo_loss_from_logits(x64, lab, old.double(), adv.double(), mask, ref_logprobs=ref_lp.double(),
                                         kl_coef=0.0, kl_kind=kl_kind, entropy_coef=0.01)
    e_loss.backward()
    assert_close(loss, e_loss, F32)
    assert_close(xr.grad, x64.grad, F32, "grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ppo_loss_low_precision_no_worse_than_pytorch(dtype, device):
    b, t, v = 2, 7, 515
    x32, lab, old, adv, ref_lp, mask = _ppo_inputs(b, t, v, seed=40, device=device)
    x = x32.to(dtype)
    kw = dict(ref_logprobs=ref_lp, kl_coef=0.05, kl_kind="k3", entropy_coef=0.01, clip_high=0.28)
    xr = x.clone().requires_grad_()
    loss, _ = fastppo.ppo_loss_from_logits(xr, lab, old, adv, mask, backend="triton", **kw)
    loss.backward()
    x64 = x.double().requires_grad_()
    e_loss, _ = ref.ppo_loss_from_logits(x64, lab, old.double(), adv.double(), mask,
                                         **{**kw, "ref_logprobs": ref_lp.double()})
    e_loss.backward()
    # Eager PyTorch in the low-precision dtype end to end (the reference formulas on dtype tensors).
    xe = x.clone().requires_grad_()
    logp_all = torch.log_softmax(xe, -1)
    t_lp = logp_all.gather(-1, lab[..., None]).squeeze(-1)
    t_h = -(torch.softmax(xe, -1) * logp_all).sum(-1)
    pg, _ = ref.ppo_policy_loss(t_lp, old.to(dtype), adv.to(dtype), mask, clip_high=0.28)
    t_loss = pg + 0.05 * ref.agg_loss(ref.kl_penalty(t_lp, ref_lp.to(dtype), "k3"), mask) \
        - 0.01 * ref.agg_loss(t_h, mask)
    t_loss.backward()
    assert_no_worse_than_torch(loss, e_loss, t_loss)
    assert_no_worse_than_torch(xr.grad, x64.grad, xe.grad)


# ------------------------------------------------------------------------------------------- GPU, real size
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _ref_rows(x: torch.Tensor, lab: torch.Tensor, rows: torch.Tensor, temperature: float):
    sub = x[rows].double()
    return ref.logprobs_and_entropy(sub, lab[rows], temperature=temperature)


@pytest.mark.parametrize("v", [32000, 128256, 151936])
@pytest.mark.parametrize("n", [1, 4097, 16384])
@pytest.mark.gpu
@needs_gpu
def test_gpu_real_size_bf16(n, v):
    torch.manual_seed(n + v)
    x = (torch.randn(n, v, device="cuda") * 3).to(torch.bfloat16)
    lab = torch.randint(0, v, (n,), device="cuda")
    temperature = 0.9
    xr = x.clone().requires_grad_()
    lp, h = fastppo.logprobs_and_entropy(xr, lab, temperature=temperature, backend="triton")
    g_lp, g_h = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    ((lp * g_lp).sum() + (h * g_h).sum()).backward()
    rows = torch.unique(torch.cat([torch.arange(0, n, max(1, n // 64), device="cuda"),
                                   torch.tensor([n - 1], device="cuda")]))
    e_lp, e_h = _ref_rows(x, lab, rows, temperature)
    xe = x[rows].clone().requires_grad_()  # eager bf16 PyTorch on the same rows
    lpa = torch.log_softmax(xe / temperature, -1)
    t_lp = lpa.gather(-1, lab[rows, None]).squeeze(-1)
    t_h = -(torch.softmax(xe / temperature, -1) * lpa).sum(-1)
    ((t_lp.float() * g_lp[rows]).sum() + (t_h.float() * g_h[rows]).sum()).backward()
    assert_no_worse_than_torch(lp[rows], e_lp, t_lp)
    assert_no_worse_than_torch(h[rows], e_h, t_h)
    e_grad = _ref_grad(x[rows], lab[rows], temperature, g_lp[rows], g_h[rows])
    assert_no_worse_than_torch(xr.grad[rows], e_grad, xe.grad)


@pytest.mark.parametrize("v", [32000, 151936])
@pytest.mark.gpu
@needs_gpu
def test_gpu_real_size_fp32_and_ppo(v):
    n = 4096
    torch.manual_seed(v)
    x = torch.randn(2, n // 2, v, device="cuda") * 2
    lab = torch.randint(0, v, (2, n // 2), device="cuda")
    lp, h = fastppo.logprobs_and_entropy(x, lab, backend="triton")
    rows = torch.arange(0, n, 61, device="cuda")
    e_lp, e_h = _ref_rows(x.view(n, v), lab.view(n), rows, 1.0)
    assert_close(lp.view(n)[rows], e_lp, F32)
    assert_close(h.view(n)[rows], e_h, F32)
    old = lp.detach() + torch.randn_like(lp) * 0.3
    adv = torch.randn_like(lp)
    mask = torch.rand_like(lp) > 0.2
    xr = x.to(torch.bfloat16).requires_grad_()
    loss, stats = fastppo.ppo_loss_from_logits(xr, lab, old, adv, mask, ref_logprobs=old, kl_coef=0.05,
                                               entropy_coef=0.01, dual_clip=3.0, backend="triton",
                                               inplace_backward=False)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(xr.grad.float()).all()
    assert torch.all(xr.grad[~mask] == 0)


def test_kernels_follow_triton_interpret_at_launch_time(monkeypatch: pytest.MonkeyPatch):
    """The @triton.jit wrapping happens at launch, so the variable counts whenever fastppo was imported."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert isinstance(K._row_forward.jit(), JITFunction)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert isinstance(K._row_forward.jit(), InterpretedFunction)
    assert isinstance(fk.gae._gae.jit(), InterpretedFunction)
