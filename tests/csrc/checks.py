"""Inputs, float64 references and checks shared by the C++, the emulated-CUDA and the GPU launcher tests."""

from __future__ import annotations

import torch

import fastppo
from fastppo import reference as ref
from tests.tolerances import assert_close

NEG_INF = float("-inf")


def random_logits(shape: tuple[int, ...], v: int, seed: int, scale: float = 2.0, dtype=torch.float32):
    """``(logits [*shape, V] in dtype, labels [*shape])`` from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, v, generator=g) * scale).to(dtype)
    labels = torch.randint(0, v, shape, generator=g)
    return x, labels


def random_vector(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def ref_dlogits(x, labels, temperature, g_lp, g_h):
    """d/dlogits of sum(g_lp*logp + g_h*entropy) (either may be None) by fp64 autograd through the reference.
    -inf entries become -1e4: the same values (exp underflows to 0) but finite reference gradients."""
    x64 = x.detach().double()
    x64 = torch.where(x64 == NEG_INF, torch.full_like(x64, -1e4), x64).requires_grad_()
    lp, h = ref.logprobs_and_entropy(x64, labels, temperature=temperature)
    total = lp.new_zeros(())
    if g_lp is not None:
        total = total + (lp * g_lp.double().view_as(lp)).sum()
    if g_h is not None:
        total = total + (h * g_h.double().view_as(h)).sum()
    total.backward()
    return x64.grad


def check_row_offsets_past_int32(launchers) -> None:
    """Two rows 2^31+7 elements apart (a bf16 view of ~4 GiB of untouched, lazily mapped memory): the kernels
    must address them with 64-bit offsets (N*V passes 2^31 at N=16k tokens, V=152k)."""
    v, far = 1031, 2**31 + 7
    vals, lab = random_logits((2, 1), v, seed=9, dtype=torch.bfloat16)
    store = torch.empty(far + v, dtype=torch.bfloat16)
    x = store.as_strided((2, 1, v), (far, v, 1))
    x.copy_(vals)  # touches the two rows only
    logp, ent, lse = launchers.logprobs_forward(x, lab.reshape(-1), 1.0, True)
    e_lp, e_h = ref.logprobs_and_entropy(vals.double(), lab)
    assert_close(logp, e_lp.reshape(-1), torch.float32)
    assert_close(ent, e_h.reshape(-1), torch.float32)
    g_lp, g_h = random_vector(2, 1), random_vector(2, 2)
    out = torch.empty(2, 1, v, dtype=torch.bfloat16)
    launchers.logprobs_backward(x, lab.reshape(-1), lse, ent, g_lp, g_h, 1.0, out)
    assert_close(out, ref_dlogits(vals, lab, 1.0, g_lp, g_h), torch.bfloat16, "grad")


def check_public_ppo_loss(device: str) -> None:
    """``ppo_loss_from_logits(backend="cuda")`` (every option at once) against the fp64 reference: loss and dlogits."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 16, 513, generator=g) * 2
    lab = torch.randint(0, 513, (3, 16), generator=g)
    lp = ref.token_logprobs(x.double(), lab)
    old = (lp + torch.randn(3, 16, generator=g, dtype=torch.float64)).float()
    rlp = (lp + torch.randn(3, 16, generator=g, dtype=torch.float64) * 0.3).float()
    adv = torch.randn(3, 16, generator=g)
    mask = torch.rand(3, 16, generator=g) > 0.25
    kw = dict(kl_coef=0.05, kl_kind="k3", entropy_coef=0.01, clip_high=0.28, dual_clip=3.0, agg="seq-mean-token-mean")
    xg = x.clone().to(device).requires_grad_()
    loss, _ = fastppo.ppo_loss_from_logits(xg, lab.to(device), old.to(device), adv.to(device), mask.to(device),
                                           ref_logprobs=rlp.to(device), backend="cuda", **kw)
    loss.backward()
    x64 = x.double().requires_grad_()
    e_loss, _ = ref.ppo_loss_from_logits(x64, lab, old.double(), adv.double(), mask, ref_logprobs=rlp.double(), **kw)
    e_loss.backward()
    assert_close(loss, e_loss, torch.float32)
    assert_close(xg.grad, x64.grad, torch.float32, "grad")
