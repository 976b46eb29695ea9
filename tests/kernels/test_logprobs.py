"""What is specific to the Triton row kernels: the block configuration, forced multi-chunk rows (BLOCK_OVERRIDE:
online rescaling, all -inf chunks), strided ``out`` views, out-of-range labels, the interpreter switch at launch
time, and real sizes on a GPU. What every backend must do (values, grads, layouts, dtypes, in place, PPO terms)
is tested once for all of them in tests/contract.

Runs on CPU under ``TRITON_INTERPRET=1`` with small shapes; the ``gpu`` tests run real sizes on a CUDA device.
"""

from __future__ import annotations

import pytest
import torch

import fastppo
from fastppo import reference as ref
from fastppo.kernels import gae as kernel_gae
from fastppo.kernels import launchers as fk
from fastppo.kernels import logprobs as kernel_logprobs
from tests.helpers import NEG_INF, random_logits, ref_dlogits
from tests.tolerances import assert_close, assert_no_worse_than_torch

K = kernel_logprobs
logprobs_forward, logprobs_backward, ppo_loss_forward = fk.logprobs_forward, fk.logprobs_backward, fk.ppo_loss_forward

F32 = torch.float32


def _flat3(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(1, -1, x.shape[-1]) if x.dim() != 3 else x


# ------------------------------------------------------------------------------------------------ contract
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
    x, lab = random_logits((n,), v, seed=n + v, device=device)
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
    x, lab = random_logits((6,), v, seed=1)
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
    x, lab = random_logits((5,), v, seed=2)
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
        assert_close(out, ref_dlogits(x, lab, temperature, g_lp, g_h), F32, "grad")
        assert torch.all(out[x == NEG_INF] == 0)


@pytest.mark.parametrize(
    "which,blocks,n", [("both", False, 41), ("both", True, 13), ("logp", True, 9), ("entropy", False, 9),
                       ("none", True, 5)]
)
def test_backward_launcher_matches_fp64(which, blocks, n, request, device):
    if blocks:
        request.getfixturevalue("small_block")
    v, temperature = 1271, 0.9
    x, lab = random_logits((n,), v, seed=5, device=device)
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
    assert_close(out, ref_dlogits(x, lab, temperature, g_lp, g_h), F32, "grad")
    if which == "both":
        assert torch.equal(out[::4], torch.zeros_like(out[::4]))  # both grads zero on those rows


def test_launcher_strided_rows(device):
    """3-D views with arbitrary B/T strides, as the contract allows; row r -> (r // T, r % T)."""
    big, _ = random_logits((4, 7), 300, seed=8, device=device)
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
        assert_close(o_view.reshape(n, 300), ref_dlogits(view.reshape(n, 300), lab, 1.0, g, None), F32, "grad")
        untouched = torch.ones_like(out, dtype=torch.bool)
        untouched_view = untouched[:, :-1, :] if view is views[0] else untouched.transpose(0, 1)[1:, ::2] \
            if view is views[1] else untouched[::2, 1::3]
        untouched_view.fill_(False)
        assert torch.all(out[untouched] == 0)  # nothing written outside the view


def test_out_of_range_label_gives_nan_not_a_read(device):
    x, _ = random_logits((3,), 50, seed=9, device=device)
    lab = torch.tensor([1, 50, -1], device=device)
    logp, _, _ = logprobs_forward(_flat3(x), lab, 1.0, False)
    assert torch.isfinite(logp[0]) and torch.isnan(logp[1]) and torch.isnan(logp[2])


# --------------------------------------------------------------------------------------------- public ops
# ---------------------------------------------------------------------------------------------- PPO terms
# ------------------------------------------------------------------------------------------- GPU, real size


def _ref_rows(x: torch.Tensor, lab: torch.Tensor, rows: torch.Tensor, temperature: float):
    sub = x[rows].double()
    return ref.logprobs_and_entropy(sub, lab[rows], temperature=temperature)


@pytest.mark.parametrize("v", [32000, 128256, 151936])
@pytest.mark.parametrize("n", [1, 4097, 16384])
@pytest.mark.gpu
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
    e_grad = ref_dlogits(x[rows], lab[rows], temperature, g_lp[rows], g_h[rows])
    assert_no_worse_than_torch(xr.grad[rows], e_grad, xe.grad)


@pytest.mark.parametrize("v", [32000, 151936])
@pytest.mark.gpu
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
    assert isinstance(kernel_gae._gae.jit(), InterpretedFunction)
