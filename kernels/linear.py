"""Tiled fused LM head (the Cut-Cross-Entropy idea): logits tiles ``h @ W.T`` live only in registers / SRAM.

``hidden [N, H]``, ``weight [V, H]`` (both unit stride on H), optional ``bias [V]``, ``labels [N]``.

Forward: one program per block of ``BM`` rows walks the vocabulary in ``BV``-wide tiles; each tile is a
``[BM, BV]`` fp32 accumulator filled by a K-loop of ``tl.dot`` over H, then folded into the row's running max,
sum-exp and exp-weighted sum (entropy) and the label's logit. Outputs ``(logp, entropy, lse)`` float32 ``[N]``.

Backward: one program per ``(row block, vocabulary tile)`` recomputes its logits tile, turns it into dlogits with
the row statistics and the per-token gradients (``dx = [g_lp (1[j=t] - p) - g_H p (log p + H)] / T``), and adds
``dl @ W_tile`` into ``dh`` and ``dl.T @ h_block`` into ``dW`` (fp32 atomics), ``sum(dl)`` into ``db``. Nothing
``[N, V]``-sized is ever written to memory. Atomics make the summation order (not the values) run-dependent.

Block sizes are functions of the dtype only (batch invariance of the forward: a row's tiles never depend on N).
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from ._jit import interpreting, late_jit, on_device


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tile_config(dtype: torch.dtype, backward: bool = False) -> tuple[int, int, int, int]:
    """``(BM, BV, BK, num_warps)``: sized so that ptxas needs no stack or spills on sm_90 (tests/kernels)."""
    if interpreting():
        return 16, 32, 16, 1
    if dtype.itemsize <= 2:
        return 64, 128, 32, 8
    # fp32 forward at BM=32 needed a stack frame with Triton 3.8 (torch 2.14.1), none with 3.9; BM=16 needs none in both
    return (32, 32, 32, 4) if backward else (16, 64, 32, 4)


def _fwd_kernel(
    h_ptr, w_ptr, b_ptr, lab_ptr, logp_ptr, ent_ptr, lse_ptr, N, V, H, stride_h, stride_w, inv_temp,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    rmask = rows < N
    lab = tl.load(lab_ptr + rows, mask=rmask, other=0)
    m = tl.full([BM], float("-inf"), tl.float32)
    s = tl.zeros([BM], tl.float32)
    w = tl.zeros([BM], tl.float32)
    x_t = tl.zeros([BM], tl.float32)
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV).to(tl.int64)
        cmask = cols < V
        acc = tl.zeros([BM, BV], tl.float32)
        for k0 in range(0, H, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < H
            a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            bt = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=kmask[:, None] & cmask[None, :],
                         other=0.0)
            if UPCAST:  # the interpreter's 16-bit dot is wrong; fp32 copies give the same exact products
                a, bt = a.to(tl.float32), bt.to(tl.float32)
            acc = tl.dot(a, bt, acc, input_precision=PREC)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        x = tl.where(cmask[None, :], acc * inv_temp, float("-inf"))
        x_t += tl.sum(tl.where(cols[None, :] == lab[:, None], x, 0.0), 1)
        m_new = tl.maximum(m, tl.max(x, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = x - m_safe[:, None]
        e = tl.exp(d)
        alpha = tl.exp(m - m_safe)
        if WITH_ENTROPY:
            w = tl.where(s > 0, alpha * (w + s * (m - m_safe)), 0.0) + tl.sum(tl.where(e > 0, e * d, 0.0), 1)
        s = s * alpha + tl.sum(e, 1)
        m = m_new
    log_s = tl.log(s)
    lse = tl.where(m == float("-inf"), 0.0, m) + log_s
    tl.store(logp_ptr + rows, x_t - lse, mask=rmask)
    tl.store(lse_ptr + rows, lse, mask=rmask)
    if WITH_ENTROPY:
        tl.store(ent_ptr + rows, log_s - w / s, mask=rmask)


_fwd = late_jit(_fwd_kernel)


def _bwd_kernel(
    h_ptr, w_ptr, b_ptr, lab_ptr, lse_ptr, ent_ptr, glp_ptr, gh_ptr, dh_ptr, dw_ptr, db_ptr,
    N, V, H, stride_h, stride_w, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_GLP: tl.constexpr, HAS_GH: tl.constexpr, NEED_H: tl.constexpr,
    NEED_W: tl.constexpr, NEED_B: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1).to(tl.int64) * BV + tl.arange(0, BV)
    rmask = rows < N
    cmask = cols < V
    acc = tl.zeros([BM, BV], tl.float32)
    for k0 in range(0, H, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < H
        a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        bt = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        if UPCAST:
            a, bt = a.to(tl.float32), bt.to(tl.float32)
        acc = tl.dot(a, bt, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    valid = rmask[:, None] & cmask[None, :]
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    logp = tl.where(valid, acc * inv_temp - lse[:, None], float("-inf"))
    p = tl.exp(logp)
    d = tl.zeros([BM, BV], tl.float32)
    if HAS_GLP:
        g_lp = tl.load(glp_ptr + rows, mask=rmask, other=0.0)
        lab = tl.load(lab_ptr + rows, mask=rmask, other=-1)
        d = g_lp[:, None] * (tl.where(cols[None, :] == lab[:, None], 1.0, 0.0) - p)
    if HAS_GH:
        g_h = tl.load(gh_ptr + rows, mask=rmask, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=rmask, other=0.0)
        d = d - g_h[:, None] * tl.where(p > 0, p * (logp + ent[:, None]), 0.0)
    d = tl.where(valid, d * inv_temp, 0.0)
    # dlogits stay fp32 (tf32 products for 16-bit inputs on the GPU, full fp32 otherwise): rounding them to bf16
    # first would make dW's error exceed eager bf16 PyTorch's
    dl = d
    for k0 in range(0, H, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < H
        if NEED_H:
            wt = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=cmask[:, None] & kmask[None, :],
                         other=0.0)
            tl.atomic_add(dh_ptr + rows[:, None] * H + ks[None, :], tl.dot(dl, wt.to(tl.float32), input_precision=PREC),
                          mask=rmask[:, None] & kmask[None, :])
        if NEED_W:
            ht = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                         other=0.0)
            tl.atomic_add(dw_ptr + cols[:, None] * H + ks[None, :],
                          tl.dot(tl.trans(dl), ht.to(tl.float32), input_precision=PREC),
                          mask=cmask[:, None] & kmask[None, :])
    if NEED_B:
        tl.atomic_add(db_ptr + cols, tl.sum(d, 0), mask=cmask)


_bwd = late_jit(_bwd_kernel)


# --------------------------------------------------------------------------------------------- launchers
def _check(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [N, H] and weight [V, H], got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"hidden and weight must share one of fp32/bf16/fp16, got {hidden.dtype}, {weight.dtype}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V], got {tuple(bias.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [N], got {tuple(labels.shape)}")
    # explicit copies: the kernels need unit stride along H (and the labels as contiguous int64)
    h = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    w = weight if weight.stride(1) == 1 else weight.contiguous()
    return h, w, labels.to(torch.int64).contiguous()


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs: full fp32 products (no TF32 rounding); 16-bit inputs: the tensor cores' exact products
    return "ieee" if dtype == torch.float32 or interpreting() else "tf32"


def linear_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float,
                   with_entropy: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(logp [N], entropy [N] | None, lse [N])`` float32 of ``softmax((hidden @ weight.T + bias) / T)``."""
    h, w, lab = _check(hidden, weight, bias, labels)
    n, hd = h.shape
    v = w.shape[0]
    logp = torch.empty(n, dtype=torch.float32, device=h.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if with_entropy else None
    if n == 0:
        return logp, ent, lse
    bm, bv, bk, warps = tile_config(h.dtype)
    with on_device(h):
        _fwd[(cdiv(n, bm),)](
            h, w, bias if bias is not None else h, lab, logp, ent if ent is not None else logp, lse, n, v, hd,
            h.stride(0), w.stride(0), 1.0 / float(temperature),
            HAS_BIAS=bias is not None, WITH_ENTROPY=bool(with_entropy), PREC=_prec(h.dtype), UPCAST=interpreting(),
            BM=bm, BV=bv, BK=bk, num_warps=warps,
        )
    return logp, ent, lse


def linear_backward(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, lse: Tensor,
                    entropy: Tensor | None, grad_logp: Tensor | None, grad_entropy: Tensor | None,
                    temperature: float, need_h: bool, need_w: bool, need_b: bool
                    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dhidden [N, H], dweight [V, H], dbias [V])`` in the inputs' dtype (None where not needed) for per-token
    gradients ``grad_logp``, ``grad_entropy`` float32 ``[N]`` (None: zero)."""
    h, w, lab = _check(hidden, weight, bias, labels)
    n, hd = h.shape
    v = w.shape[0]
    if grad_entropy is not None and entropy is None:
        raise ValueError("grad_entropy needs the forward's entropy")
    need_b = need_b and bias is not None
    f32 = dict(dtype=torch.float32, device=h.device)
    dh = torch.zeros((n, hd), **f32) if need_h else None
    dw = torch.zeros((v, hd), **f32) if need_w else None
    db = torch.zeros((v,), **f32) if need_b else None
    if n > 0 and (need_h or need_w or need_b) and (grad_logp is not None or grad_entropy is not None):
        vec = lambda t: lse if t is None else t.to(torch.float32).contiguous()  # noqa: E731
        bm, bv, bk, warps = tile_config(h.dtype, backward=True)
        with on_device(h):
            _bwd[(cdiv(n, bm), cdiv(v, bv))](
                h, w, bias if bias is not None else h, lab, lse.contiguous(), vec(entropy), vec(grad_logp),
                vec(grad_entropy), dh if dh is not None else lse, dw if dw is not None else lse,
                db if db is not None else lse, n, v, hd, h.stride(0), w.stride(0), 1.0 / float(temperature),
                HAS_BIAS=bias is not None, HAS_GLP=grad_logp is not None, HAS_GH=grad_entropy is not None,
                NEED_H=need_h, NEED_W=need_w, NEED_B=need_b, PREC=_prec(h.dtype), UPCAST=interpreting(),
                BM=bm, BV=bv, BK=bk, num_warps=warps,
            )
    cast = lambda t, like: None if t is None else t.to(like.dtype)  # noqa: E731
    return cast(dh, hidden), cast(dw, weight), cast(db, bias) if bias is not None else None
