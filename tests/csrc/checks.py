"""Checks shared by the C++ and the (emulated) CUDA launcher tests."""

from __future__ import annotations

import torch

import fastppo
from fastppo import reference as ref
from tests.tolerances import assert_close


def check_row_offsets_past_int32(launchers) -> None:
    """Two rows 2^31+7 elements apart (a bf16 view of ~4 GiB of untouched, lazily mapped memory): the kernels
    must address them with 64-bit offsets (N*V passes 2^31 at N=16k tokens, V=152k)."""
    v, far = 1031, 2**31 + 7
    g = torch.Generator().manual_seed(9)
    vals = (torch.randn(2, 1, v, generator=g) * 2).to(torch.bfloat16)
    lab = torch.randint(0, v, (2, 1), generator=g)
    store = torch.empty(far + v, dtype=torch.bfloat16)
    x = store.as_strided((2, 1, v), (far, v, 1))
    x.copy_(vals)  # touches the two rows only
    logp, ent, lse = launchers.logprobs_forward(x, lab.reshape(-1), 1.0, True)
    e_lp, e_h = ref.logprobs_and_entropy(vals.double(), lab)
    assert_close(logp, e_lp.reshape(-1), torch.float32)
    assert_close(ent, e_h.reshape(-1), torch.float32)
    g_lp, g_h = torch.randn(2, generator=g), torch.randn(2, generator=g)
    out = torch.empty(2, 1, v, dtype=torch.bfloat16)
    launchers.logprobs_backward(x, lab.reshape(-1), lse, ent, g_lp, g_h, 1.0, out)
    x64 = vals.double().requires_grad_()
    lp64, h64 = ref.logprobs_and_entropy(x64, lab)
    ((lp64.reshape(-1) * g_lp.double()).sum() + (h64.reshape(-1) * g_h.double()).sum()).backward()
    assert_close(out, x64.grad, torch.bfloat16, "grad")


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
