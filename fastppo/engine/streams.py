"""Per-sample random streams: every random number the PPO loop draws for a sample is a pure function of
``(seed, step, sample index[, token position])``, never of the batch it sits in, so the global batch (prompts,
sampled tokens, minibatch order) is the same whatever the number of processes that produce it, and a resumed run
redraws exactly what the uninterrupted one drew.

Seeds are int64 bit patterns mixed with the SplitMix64 finaliser (vectorised over samples in torch).
"""

from __future__ import annotations

import torch
from torch import Tensor

# SplitMix64 constants as signed int64 (torch has no uint64 arithmetic; int64 multiplication wraps modulo 2**64)
_INC = 0x9E3779B97F4A7C15 - (1 << 64)
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)


def _shr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bit patterns (``>>`` on int64 is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: Tensor) -> Tensor:
    z = x + _INC
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def _fold(h: Tensor, key: int | Tensor) -> Tensor:
    """Absorb one key into the running hash ``h`` (int64 tensor)."""
    return _mix(h ^ (key if isinstance(key, Tensor) else torch.tensor(key, dtype=torch.int64)))


def stream_seed(*keys: int) -> int:
    """One non-negative 63-bit seed from integer keys, e.g. ``(seed, step, epoch)`` for a ``torch.Generator``."""
    h = torch.tensor(0, dtype=torch.int64)
    for k in keys:
        h = _fold(h, int(k) % (1 << 63))
    return int(h) & ((1 << 63) - 1)


def sample_seeds(seed: int, step: int, sample_index: Tensor) -> Tensor:
    """Base seed of each sample of PPO step ``step``: ``sample_index [B]`` (global indices in the step's batch)
    -> ``[B]`` int64, on ``sample_index``'s device."""
    h = torch.tensor(stream_seed(seed, step, 0x5A17), dtype=torch.int64, device=sample_index.device)
    return _fold(h, sample_index.to(torch.int64))


def token_seeds(base: Tensor, position: int) -> Tensor:
    """Seed of the token each sample draws at response ``position``: ``base [B] -> [B]`` int64."""
    return _fold(base, position + 1)


def seed_to_uniform(seeds: Tensor) -> Tensor:
    """A uniform in the open interval (0, 1) per int64 seed (53 bits). ``[B] -> [B]`` float64."""
    return (_shr(_mix(seeds), 11).to(torch.float64) + 0.5) * 2.0**-53
