"""logprobs / entropy and their backward, on every backend (tests/contract/conftest.py) and every case of one
table (cases.py), through the public ops, against the float64 reference: values, dlogits under random upstream
gradients, the in-place backward, non-finite rows, and rows more than 2^31 elements apart."""

from __future__ import annotations

import pytest
import torch

import fastppo
from fastppo import reference as ref
from tests.contract.cases import CASE_IDS, CASES, F32, NEG_INF
from tests.helpers import random_logits, random_vector, ref_dlogits
from tests.tolerances import assert_close, assert_no_worse_than_torch


def _eager_lowp(x: torch.Tensor, lab: torch.Tensor, temperature: float, g_lp: torch.Tensor, g_h: torch.Tensor):
    """Eager PyTorch in the inputs' own dtype: (logp, entropy, dlogits), the bar low precision must clear."""
    xe = x.detach().clone().requires_grad_()
    lpe = torch.log_softmax(xe / temperature, -1)
    pe = lpe.exp()
    he = -(torch.where(pe > 0, pe * lpe, torch.zeros_like(pe))).sum(-1)
    lp_t = lpe.gather(-1, lab[..., None]).squeeze(-1)
    ((lp_t * g_lp.to(x.dtype)).sum() + (he * g_h.to(x.dtype)).sum()).backward()
    return lp_t, he, xe.grad


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_values_and_grads_match_fp64(backend, case):
    x, lab = case.inputs(backend.device)
    xg = x.detach().requires_grad_()
    lp, h = fastppo.logprobs_and_entropy(xg, lab, temperature=case.temperature, backend=backend.name)
    assert lp.shape == h.shape == case.lead and lp.dtype == h.dtype == F32
    n = lp.numel()
    g_lp = random_vector(n, case.seed + 1).view(case.lead)
    g_h = random_vector(n, case.seed + 2).view(case.lead)
    g_lp.view(-1)[0] = 0.0  # a row with an upstream gradient on the entropy only
    torch.autograd.backward((lp, h), (g_lp.to(backend.device), g_h.to(backend.device)))
    assert xg.grad.dtype == case.dtype and xg.grad.shape == x.shape

    xc, labc = x.detach().cpu(), lab.cpu()
    e_lp, e_h = ref.logprobs_and_entropy(xc.double(), labc, temperature=case.temperature)
    e_dx = ref_dlogits(xc, labc, case.temperature, g_lp, g_h)
    if case.dtype == F32:
        assert_close(lp, e_lp, F32)
        assert_close(h, e_h, F32)
        assert_close(xg.grad, e_dx, F32, "grad")
    else:
        t_lp, t_h, t_dx = _eager_lowp(xc, labc, case.temperature, g_lp, g_h)
        assert_no_worse_than_torch(lp, e_lp, t_lp)
        assert_no_worse_than_torch(h, e_h, t_h)
        assert_no_worse_than_torch(xg.grad, e_dx, t_dx)

    if backend.kernel:  # in place: dlogits overwrite the logits buffer, bitwise the out-of-place values
        xi = case.inputs(backend.device)[0].requires_grad_()  # the same layout (alignment decides vector paths)
        lp_i, h_i = fastppo.logprobs_and_entropy(xi, lab, temperature=case.temperature, backend=backend.name,
                                                 inplace_backward=True)
        assert torch.equal(lp_i, lp) and torch.equal(h_i, h)
        torch.autograd.backward((lp_i, h_i), (g_lp.to(backend.device), g_h.to(backend.device)))
        assert torch.equal(xi.grad, xg.grad)


@pytest.mark.parametrize("bad", ["nan", "+inf", "all -inf"])
def test_non_finite_rows_raise(backend, bad):
    x, lab = random_logits((4,), 300, seed=1)
    x[2, 7] = {"nan": float("nan"), "+inf": float("inf"), "all -inf": NEG_INF}[bad]
    if bad == "all -inf":
        x[2] = NEG_INF
    x, lab = x.to(backend.device), lab.to(backend.device)
    with pytest.raises(ValueError, match="non-finite"):
        fastppo.logprobs_and_entropy(x, lab, backend=backend.name)
    with pytest.raises(ValueError, match="non-finite"):
        fastppo.token_entropy(x, backend=backend.name)


def test_rows_past_int32_offsets(backend):
    """Two rows 2^31+7 elements apart (a bf16 view of ~4 GiB of untouched, lazily mapped memory): kernels must
    address them with 64-bit offsets (N*V passes 2^31 at N=16k tokens, V=152k)."""
    if backend.id == "triton-interpret":
        pytest.skip("the Triton interpreter copies each argument's whole storage back after a launch (4 GiB "
                    "here); the Triton kernels' 64-bit offsets are checked on a GPU (triton-gpu)")
    v, far = 1031, 2**31 + 7
    vals, lab = random_logits((2, 1), v, seed=9, dtype=torch.bfloat16)
    store = torch.empty(far + v, dtype=torch.bfloat16, device=backend.device)
    x = store.as_strided((2, 1, v), (far, v, 1))
    x.copy_(vals.to(backend.device))  # touches the two rows only
    xg = x.detach().requires_grad_()
    lp, h = fastppo.logprobs_and_entropy(xg, lab.to(backend.device), backend=backend.name)
    e_lp, e_h = ref.logprobs_and_entropy(vals.double(), lab)
    assert_close(lp, e_lp, F32)
    assert_close(h, e_h, F32)
    g_lp, g_h = random_vector(2, 1).view(2, 1), random_vector(2, 2).view(2, 1)
    torch.autograd.backward((lp, h), (g_lp.to(backend.device), g_h.to(backend.device)))
    assert_close(xg.grad, ref_dlogits(vals, lab, 1.0, g_lp, g_h), torch.bfloat16, "grad")


def test_stride0_upstream_gradients(backend):
    """``.sum()`` hands the backward stride-0 expanded gradients; logits are a row slice of a bigger buffer."""
    big, _ = random_logits((2, 8), 613, seed=4)
    lab = torch.randint(0, 613, (2, 7), generator=torch.Generator().manual_seed(3))
    xs = big.to(backend.device).requires_grad_()
    lp, h = fastppo.logprobs_and_entropy(xs[:, :-1, :], lab.to(backend.device), backend=backend.name)
    (lp.sum() + 2.0 * h.sum()).backward()
    expected = ref_dlogits(big[:, :-1, :], lab, 1.0, torch.ones(14), torch.full((14,), 2.0))
    assert_close(xs.grad[:, :-1, :], expected, F32, "grad")
    assert torch.all(xs.grad[:, -1] == 0)


@pytest.mark.parametrize("op", ["logprobs_and_entropy", "ppo_loss_from_logits"])
def test_inplace_backward_through_a_model_head(backend, op):
    """In place on non-leaf logits (what a model's head produces): the weight's gradient equals the out-of-place
    one, and the logits buffer ends up holding dlogits."""
    if not backend.kernel:
        pytest.skip("inplace_backward is a kernel-backend option")
    dev = backend.device
    g = torch.Generator().manual_seed(14)
    b, t, d, v = 2, 5, 16, 777
    h0 = torch.randn(b, t, d, generator=g).to(dev)
    w0 = (torch.randn(d, v, generator=g) * 0.5).to(dev)
    lab = torch.randint(0, v, (b, t), generator=g).to(dev)
    old = (torch.randn(b, t, generator=g) * 0.2 - 6).to(dev)
    adv = torch.randn(b, t, generator=g).to(dev)
    mask = (torch.rand(b, t, generator=g) > 0.3).to(dev)
    mask[0, 0] = True

    def loss_of(logits: torch.Tensor, inplace: bool) -> torch.Tensor:
        if op == "logprobs_and_entropy":
            lp, ent = fastppo.logprobs_and_entropy(logits, lab, backend=backend.name, inplace_backward=inplace)
            return (lp * adv).sum() + 0.1 * ent.sum()
        return fastppo.ppo_loss_from_logits(logits, lab, old, adv, mask, entropy_coef=0.01, backend=backend.name,
                                            inplace_backward=inplace)[0]

    grads, bufs = [], []
    for inplace in (False, True):
        w = w0.clone().requires_grad_()
        logits = h0 @ w
        loss = loss_of(logits, inplace)
        bufs.append(logits.detach())  # shares the logits' storage
        loss.backward()
        grads.append(w.grad)
    assert_close(grads[1], grads[0].double(), F32, "grad")
    leaf = (h0 @ w0).requires_grad_()
    loss_of(leaf, False).backward()
    assert torch.equal(bufs[1], leaf.grad)  # the in-place run's logits buffer now holds dlogits
    assert not torch.equal(bufs[0], leaf.grad)  # the out-of-place run leaves the logits alone
