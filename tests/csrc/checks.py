"""Inputs, float64 references and checks shared by the C++, the emulated-CUDA and the GPU launcher tests."""

from __future__ import annotations

import torch

from fastppo import reference as ref

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


