"""Reference token sampling: temperature, top-k, top-p (nucleus) and the draw, one token per row.

Shapes: ``logits [B, V]``, ``uniforms [B]`` (one number in (0, 1) per row) -> ``[B]`` int64.

The draw is inverse-CDF sampling: row ``b`` takes the first token ``j`` (in vocabulary order) whose cumulative
kept probability reaches ``uniforms[b]``. It needs a single random number per row, so kernels read the logits in
two passes (max/sum, then the cumulative scan) and never materialise the probabilities; given the same uniforms
every backend draws the same token (up to rounding at a CDF boundary). With ``u ~ U(0, 1)`` it is an exact
sample of the filtered ``softmax``, the distribution ``torch.multinomial`` draws from.

Filtering (applied to ``z = logits / temperature``):
  top-k   keep every token whose ``z`` is >= the k-th largest ``z`` (ties at the boundary are all kept);
  top-p   then keep token ``i`` iff the probability mass of the kept tokens with ``z`` strictly greater than
          ``z_i`` is < ``top_p`` (the most likely token always stays; ties are kept or dropped together).
Without ties this is exactly the usual sort-and-cumsum nucleus rule.

Random numbers: ``seed_uniforms`` maps int64 seeds (one per row, e.g. derived from (seed, step, sample index,
position)) to uniforms with a SplitMix64 finaliser, so a row's draw depends on its own seed only: the result is
invariant to batch composition, world size and backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

# SplitMix64 constants, as signed int64 (torch has no uint64 arithmetic; multiplication wraps modulo 2**64).
GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _shr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: Tensor) -> Tensor:
    """SplitMix64 of int64 ``x`` (bit patterns, elementwise). ``[...] -> [...]`` int64."""
    z = x.to(torch.int64) + GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def seed_uniforms(seeds: Tensor) -> Tensor:
    """One uniform in the open interval (0, 1) per seed: 53 random bits, float64. ``[B] int64 -> [B] float64``."""
    bits = _shr(mix64(seeds), 11)  # [0, 2**53)
    return (bits.to(torch.float64) + 0.5) * 2.0**-53


def filter_logits(z: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """``z [B, V]`` with the tokens outside top-k / top-p (see the module docstring) set to ``-inf``."""
    v = z.shape[-1]
    if 0 < top_k < v:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        asc, _ = torch.sort(z, dim=-1)
        e = torch.exp(asc - asc[..., -1:])  # filtered tokens: exp(-inf) = 0
        cum = torch.cumsum(e, dim=-1)  # cum[i] = mass of the i+1 smallest
        total = cum[..., -1:]
        n_le = torch.searchsorted(asc, z.contiguous(), right=True)  # tokens with value <= z_i (>= 1)
        mass_le = cum.gather(-1, n_le - 1)
        mass_gt = total - mass_le
        z = z.masked_fill(~(mass_gt < top_p * total), float("-inf"))
    return z


def support_threshold(z: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """The smallest value of ``z [..., V]`` that ``filter_logits(z, top_k, top_p)`` keeps, per row ``[...]``: the kept
    support is exactly ``z >= threshold`` (both filters keep an upper set of values, ties together). ``-inf`` when
    nothing is filtered. The same arithmetic as ``filter_logits``, so both decide every boundary alike."""
    v = z.shape[-1]
    if 0 < top_k < v:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        if top_p >= 1.0:
            return kth.squeeze(-1)
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p >= 1.0:
        return torch.full(z.shape[:-1], float("-inf"), dtype=z.dtype, device=z.device)
    asc, _ = torch.sort(z, dim=-1)
    e = torch.exp(asc - asc[..., -1:])
    cum = torch.cumsum(e, dim=-1)
    total = cum[..., -1:]
    n_le = torch.searchsorted(asc, asc.contiguous(), right=True)
    kept = (total - cum.gather(-1, n_le - 1)) < top_p * total  # a suffix of the ascending order
    first = kept.to(torch.int8).argmax(-1, keepdim=True)
    return asc.gather(-1, first).squeeze(-1)


def sample_tokens(logits: Tensor, uniforms: Tensor, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> Tensor:
    """One token per row of ``logits [B, V]`` drawn with ``uniforms [B]`` in (0, 1). ``-> [B]`` int64."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float64)) / temperature
    z = filter_logits(z, top_k, top_p)
    p = torch.exp(z - z.amax(-1, keepdim=True))
    cum = torch.cumsum(p, dim=-1)
    target = uniforms.to(cum.dtype)[:, None] * cum[:, -1:]
    idx = (cum < target).sum(-1)
    # rounding can leave the target just above the last cumulative value: take the last kept token then
    last_kept = torch.where(p > 0, torch.arange(p.shape[-1], device=p.device), -1).amax(-1)
    return torch.minimum(idx, last_kept)
