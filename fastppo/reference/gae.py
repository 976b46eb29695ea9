"""Reference GAE: a plain reverse loop over time, vectorised over the batch.

``rewards [B, T]``, ``values [B, T]``, ``mask [B, T]`` (bool/float), ``bootstrap_value [B]`` (optional)
-> ``(advantages [B, T], returns [B, T])``.

The recursion visits valid tokens only. Masked positions inside a sequence are skipped: the "next"
value and advantage carried backwards are those of the next *valid* token (carry-forward), which is the
classic recursion when the mask is contiguous. The value after the last valid token is 0, or
``bootstrap_value[b]`` for a truncated sequence. Outputs are 0 where mask is 0.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    bootstrap_value: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    r = rewards.to(dtype)
    v = values.to(dtype)
    m = mask.bool()
    B, T = r.shape
    next_value = (
        torch.zeros(B, dtype=dtype, device=r.device) if bootstrap_value is None else bootstrap_value.to(dtype).clone()
    )
    next_adv = torch.zeros(B, dtype=dtype, device=r.device)
    adv = torch.zeros_like(r)
    for t in range(T - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        a = delta + gamma * lam * next_adv
        mt = m[:, t]
        adv[:, t] = torch.where(mt, a, torch.zeros_like(a))
        next_adv = torch.where(mt, a, next_adv)
        next_value = torch.where(mt, v[:, t], next_value)
    returns = torch.where(m, adv + v, torch.zeros_like(adv))
    return adv, returns
