"""Reference per-token KL estimators between a policy and a reference policy.

``logprob [...]``, ``ref_logprob [...]`` -> ``[...]``, with ``d = logprob - ref_logprob``:
  k1  = d                      unbiased, high variance, can be negative
  k2  = 0.5 * d**2             low variance, biased
  k3  = exp(-d) - 1 + d        unbiased, low variance, non-negative (Schulman's estimator); evaluated in this
                               order, which is closer to float64 than exp(-d) + d - 1 (tests/reference/test_kl.py
                               measures both)
  abs = |d|
  low_var_kl = clamp(exp(c) - c - 1, -10, 10) with c = clamp(-d, -20, 20)   (verl's k3, clamped in and out)
A ``+`` suffix (``k1+``, ``k3+``, ``abs+``, ``low_var_kl+``; ``k2+`` is k2) keeps the kind's value and takes the
gradient of k2, ``d`` (verl's straight-through estimator: an unbiased value with a low-variance gradient).
``clamp`` (optional) clips the estimate to ``[-clamp, clamp]`` (verl clamps k3 at 10).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastppo._contract import KL_KINDS

KL_CHOICES = (*KL_KINDS, "low_var_kl", *(k + "+" for k in (*KL_KINDS, "low_var_kl")))


def kl_penalty(logprob: Tensor, ref_logprob: Tensor, kind: str = "k1", *, clamp: float | None = None) -> Tensor:
    if kind.endswith("+") and kind[:-1] in KL_CHOICES:
        value = kl_penalty(logprob, ref_logprob, kind[:-1], clamp=clamp)
        if kind == "k2+":
            return value
        k2 = 0.5 * (logprob - ref_logprob).square()
        return k2 - k2.detach() + value.detach()
    d = logprob - ref_logprob
    if kind == "low_var_kl":
        c = (-d).clamp(-20.0, 20.0)
        kl = (torch.exp(c) - c - 1.0).clamp(-10.0, 10.0)
    elif kind == "k1":
        kl = d
    elif kind == "k2":
        kl = 0.5 * d.square()
    elif kind == "k3":
        kl = torch.exp(-d) - 1.0 + d
    elif kind == "abs":
        kl = d.abs()
    else:
        raise ValueError(f"unknown KL kind {kind!r}; choose from {KL_CHOICES}")
    if clamp is not None:
        kl = kl.clamp(-clamp, clamp)
    return kl


def kl_penalty_grad(logprob: Tensor, ref_logprob: Tensor, kind: str = "k1") -> Tensor:
    """``d kl_penalty(logprob, ref_logprob, kind) / d logprob`` (no ``clamp``), elementwise: the kernels' ``dkl``.
    With ``d = logprob - ref_logprob``: k1 1, k2 d, k3 1 - exp(-d), abs sign(d), low_var_kl ``1 - exp(-d)`` where
    neither of its clamps holds (else 0), and every ``+`` kind d (k2's)."""
    d = logprob - ref_logprob
    if kind.endswith("+") and kind[:-1] in KL_CHOICES:
        return d
    if kind == "k1":
        return torch.ones_like(d)
    if kind == "k2":
        return d
    if kind == "k3":
        return 1.0 - torch.exp(-d)
    if kind == "abs":
        return torch.sign(d)
    if kind == "low_var_kl":
        c = (-d).clamp(-20.0, 20.0)
        inside = (d.abs() <= 20.0) & ((torch.exp(c) - c - 1.0) <= 10.0)  # torch.clamp passes the gradient at a bound
        return torch.where(inside, 1.0 - torch.exp(c), torch.zeros_like(d))
    raise ValueError(f"unknown KL kind {kind!r}; choose from {KL_CHOICES}")
