"""Reference masked statistics. ``mask`` is bool or float, broadcastable to ``x``."""

from __future__ import annotations

import torch
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """``sum(x * mask) / sum(mask)`` over ``dim`` (all elements when None).

    Masked elements are ignored whatever they hold (a padded position may carry -inf or NaN).
    """
    m = mask.to(x.dtype)
    xm = torch.where(m != 0, x * m, torch.zeros_like(x))
    if dim is None:
        return xm.sum() / m.sum()
    return xm.sum(dim) / m.sum(dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the valid elements of ``x``; Bessel-corrected when ``unbiased``."""
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean).square(), m)
    if unbiased:
        n = m.sum()
        var = var * n / (n - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` with mean/var over valid elements (unbiased var)."""
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out
