"""Reference per-token KL estimators between a policy and a reference policy.

``logprob [...]``, ``ref_logprob [...]`` -> ``[...]``, with ``d = logprob - ref_logprob``:
  k1  = d                      unbiased, high variance, can be negative
  k2  = 0.5 * d**2             low variance, biased
  k3  = exp(-d) - 1 + d        unbiased, low variance, non-negative (Schulman's estimator); evaluated in this
                               order, which is closer to float64 than exp(-d) + d - 1 (tests/reference/test_kl.py
                               measures both)
  abs = |d|
``clamp`` (optional) clips the estimate to ``[-clamp, clamp]`` (verl clamps k3 at 10).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastppo._contract import KL_KINDS


def kl_penalty(logprob: Tensor, ref_logprob: Tensor, kind: str = "k1", *, clamp: float | None = None) -> Tensor:
    d = logprob - ref_logprob
    if kind == "k1":
        kl = d
    elif kind == "k2":
        kl = 0.5 * d.square()
    elif kind == "k3":
        kl = torch.exp(-d) - 1.0 + d
    elif kind == "abs":
        kl = d.abs()
    else:
        raise ValueError(f"unknown KL kind {kind!r}; choose from {KL_KINDS}")
    if clamp is not None:
        kl = kl.clamp(-clamp, clamp)
    return kl


def kl_penalty_grad(logprob: Tensor, ref_logprob: Tensor, kind: str = "k1") -> Tensor:
    """``d kl_penalty(logprob, ref_logprob, kind) / d logprob`` (unclamped), elementwise: the values the kernels'
    ``dkl`` term holds. With ``d = logprob - ref_logprob``: k1 1, k2 d, k3 1 - exp(-d), abs sign(d)."""
    d = logprob - ref_logprob
    if kind == "k1":
        return torch.ones_like(d)
    if kind == "k2":
        return d
    if kind == "k3":
        return 1.0 - torch.exp(-d)
    if kind == "abs":
        return torch.sign(d)
    raise ValueError(f"unknown KL kind {kind!r}; choose from {KL_KINDS}")
