"""A baseline GAE kernel: one program per sequence, walking T backwards serially with scalar loads.

This is the "one-thread-per-row kernel" of a GPU GAE target, the usual first GPU port of the Python loop: parallel over
the batch only, so with few long sequences (4 x 16384) almost the whole GPU idles while each program does T
dependent steps. fastppo's scan (``kernels/gae.py``) is parallel over time as well; this kernel is what it must
beat. It lives with the benchmarks, not in ``kernels/``: nothing dispatches to it.

``rewards, values [B, T]`` float32, ``mask [B, T]`` bool, ``bootstrap [B]`` float32 or None
-> ``(advantages, returns) [B, T]`` float32, with the carry-forward semantics of ``fastppo.reference.gae``
(masked tokens are skipped: the value and advantage carried backwards are those of the next *valid* token;
outputs are 0 where the mask is 0).
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from fastppo.kernels._jit import late_jit, on_device


def _row_serial_kernel(r_ptr, v_ptr, m_ptr, boot_ptr, adv_ptr, ret_ptr, T, gamma, gl, HAS_BOOT: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * T
    zero = tl.sum(tl.zeros([1], tl.float32), 0)  # an fp32 scalar tensor: loop-carried values keep one type
    next_a = zero
    if HAS_BOOT:
        next_v = zero + tl.load(boot_ptr + tl.program_id(0))
    else:
        next_v = zero
    for i in range(0, T):
        off = base + (T - 1 - i)
        valid = tl.load(m_ptr + off) != 0
        r = tl.load(r_ptr + off)
        v = tl.load(v_ptr + off)
        a = r + gamma * next_v - v + gl * next_a
        tl.store(adv_ptr + off, tl.where(valid, a, 0.0))
        tl.store(ret_ptr + off, tl.where(valid, a + v, 0.0))
        next_a = tl.where(valid, a, next_a)
        next_v = tl.where(valid, v, next_v)


_row_serial = late_jit(_row_serial_kernel)


def gae_row_serial(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95,
                   bootstrap_value: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """GAE over ``[B, T]``, one program (one warp: a single logical thread) per row. See the module docstring."""
    if rewards.dim() != 2 or values.shape != rewards.shape or mask.shape != rewards.shape:
        raise ValueError(f"rewards, values, mask must be one [B, T] shape, got {rewards.shape}, {values.shape}, "
                         f"{mask.shape}")
    n_b, n_t = rewards.shape
    r = rewards.to(torch.float32).contiguous()
    v = values.to(torch.float32).contiguous()
    m8 = mask.to(torch.bool).contiguous().view(torch.uint8)
    boot = None if bootstrap_value is None else bootstrap_value.to(torch.float32).contiguous()
    adv = torch.empty_like(r)
    ret = torch.empty_like(r)
    if n_b and n_t:
        with on_device(r):
            _row_serial[(n_b,)](r, v, m8, boot if boot is not None else r, adv, ret, n_t, float(gamma),
                                float(gamma) * float(lam), HAS_BOOT=boot is not None, num_warps=1)
    return adv, ret
