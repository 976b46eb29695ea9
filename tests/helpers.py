"""Seeded inputs and float64 references that test files in several folders share: the logits and gradients of the
launcher tests (C++, emulated CUDA, Triton, CUDA on a GPU) and the fused LM head's inputs (its op and kernel tests).
One builder per kind of input, so two suites that should see the same numbers do."""

from __future__ import annotations

import torch

from fastppo import reference as ref

NEG_INF = float("-inf")


def random_logits(shape: tuple[int, ...], v: int, seed: int, scale: float = 2.0, dtype=torch.float32,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [*shape, V] in dtype, labels [*shape])`` from a seeded generator (drawn on the CPU, so every device
    sees the same numbers)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, v, generator=g) * scale).to(dtype)
    labels = torch.randint(0, v, shape, generator=g)
    return x.to(device), labels.to(device)


def random_vector(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def ref_dlogits(x: torch.Tensor, labels: torch.Tensor, temperature: float, g_lp: torch.Tensor | None,
                g_h: torch.Tensor | None) -> torch.Tensor:
    """d/dlogits of sum(g_lp*logp + g_h*entropy) (either may be None) by fp64 autograd through the reference.
    -inf entries become -1e4: the same values (exp underflows to 0) but finite reference gradients, where autograd
    of p*log p at p = 0 would give 0 * -inf = NaN."""
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


def linear_inputs(lead: tuple[int, ...] | int, h: int, v: int, dtype=torch.float32, *, bias: bool = True,
                  seed: int = 0, device: torch.device | str = "cpu"):
    """``(hidden [*lead, H], weight [V, H], bias [V] or None, labels [*lead])`` of the fused LM head from a seeded
    generator; the weight is scaled by 2/sqrt(H) so the logits spread over a few units whatever H is."""
    lead = (lead,) if isinstance(lead, int) else tuple(lead)
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(*lead, h, generator=g).to(dtype)
    w = (torch.randn(v, h, generator=g) * (2 / h**0.5)).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    lab = torch.randint(0, v, lead, generator=g)
    return hid.to(device), w.to(device), None if b is None else b.to(device), lab.to(device)


def leaves(*ts: torch.Tensor | None, dtype: torch.dtype | None = None) -> list[torch.Tensor | None]:
    """Fresh leaf copies that require grad (in ``dtype`` when given); None stays None (an absent bias)."""
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in ts]


def input_grads(out: torch.Tensor, inputs: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """``torch.autograd.grad`` of ``out`` with respect to ``inputs``, None where an input is None."""
    present = [t for t in inputs if t is not None]
    gs = list(torch.autograd.grad(out, present))
    return [None if t is None else gs.pop(0) for t in inputs]
