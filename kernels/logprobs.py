"""Fused row kernels over vocabulary-sized logits: logprobs, entropy, the per-token PPO terms, and backward.

One program per row (token). Forward reads the row once with an online max / sum-exp; backward reads it once
and writes dlogits once. Shapes: ``logits [B, T, V]`` (any strides on B and T, stride 1 on V), ``labels [N]``
with ``N = B*T``, per-row outputs float32 ``[N]``.

Batch invariance: the block size and warp count are functions of ``V`` and the dtype only, never of ``N``, so a
row's result does not depend on what else is in the batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton.language as tl
from torch import Tensor

from fastppo._contract import (
    KL_KINDS,
    LOG_RATIO_CLAMP,
    NUM_TERMS,
    PPO_TERMS,
    TERM,
    check_logits,
    check_out,
    check_vector,
    triton_interpret,
)

from ._jit import late_jit, next_pow2, on_device

if TYPE_CHECKING:
    from fastppo.objective import PPOObjective

__all__ = ["PPO_TERMS", "logprobs_backward", "logprobs_forward", "ppo_loss_forward", "row_config"]

# The contract's constants as the kernel sees them (Triton reads module globals only as tl.constexpr).
_RATIO_CLAMP: tl.constexpr = tl.constexpr(LOG_RATIO_CLAMP)
_T_LOGP: tl.constexpr = tl.constexpr(TERM["logp"])
_T_ENTROPY: tl.constexpr = tl.constexpr(TERM["entropy"])
_T_LSE: tl.constexpr = tl.constexpr(TERM["lse"])
_T_PG: tl.constexpr = tl.constexpr(TERM["pg"])
_T_RATIO: tl.constexpr = tl.constexpr(TERM["ratio"])
_T_KL: tl.constexpr = tl.constexpr(TERM["kl"])
_T_DPG: tl.constexpr = tl.constexpr(TERM["dpg"])
_T_DKL: tl.constexpr = tl.constexpr(TERM["dkl"])
_T_CLIPPED: tl.constexpr = tl.constexpr(TERM["clipped"])
_T_DUAL_CLIPPED: tl.constexpr = tl.constexpr(TERM["dual_clipped"])
_T_LOSS: tl.constexpr = tl.constexpr(TERM["loss"])
_KL_K1: tl.constexpr = tl.constexpr(KL_KINDS.index("k1"))
_KL_K2: tl.constexpr = tl.constexpr(KL_KINDS.index("k2"))
_KL_K3: tl.constexpr = tl.constexpr(KL_KINDS.index("k3"))

# Tests set this to force several vocabulary chunks on small V (exercises the online rescaling paths).
BLOCK_OVERRIDE: int | None = None


def row_config(v: int, dtype: torch.dtype) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` for rows of ``v`` logits: a function of V and dtype only (batch invariance)."""
    if BLOCK_OVERRIDE is not None:
        return BLOCK_OVERRIDE, 4
    cap = 8192 if dtype.itemsize <= 2 else 4096  # 16 KiB of logits per chunk either way
    block = min(next_pow2(v), cap)
    if triton_interpret():
        return max(block, 16), 1
    warps = 16 if block >= 8192 else 8 if block >= 2048 else 4
    return max(block, 16), warps


# ----------------------------------------------------------------------------------------------- forward
def _row_forward_kernel(
    x_ptr, stride_xb, stride_xt, n_t, labels_ptr, V, inv_temp,
    logp_ptr, ent_ptr, lse_ptr,
    old_ptr, adv_ptr, ref_ptr, mask_ptr, terms_ptr, N,
    clip_low, clip_high, dual_clip, kl_coef, entropy_coef,
    BLOCK: tl.constexpr, WITH_ENTROPY: tl.constexpr, PPO: tl.constexpr, HAS_REF: tl.constexpr,
    DUAL: tl.constexpr, KL_KIND: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // n_t
    t = row % n_t
    base = x_ptr + b * stride_xb + t * stride_xt
    lab = tl.load(labels_ptr + row)
    if PPO:
        valid = tl.load(mask_ptr + row) != 0
        v_end = tl.where(valid, V, 0)  # masked tokens skip the vocabulary loop entirely
    else:
        v_end = V
    cols = tl.arange(0, BLOCK)
    # Running max m, s = sum exp(x - m), w = sum exp(x - m) * (x - m): entropy = log s - w / s, free of the
    # cancellation of lse - sum(p*x) when logits are large.
    m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
    s = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
    w = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
    for start in range(0, v_end, BLOCK):
        offs = start + cols
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(x, 0))
        # While every logit seen is -inf, shift by 0 instead of -inf (avoids -inf - -inf = NaN); NaN and +inf
        # logits still make s NaN, which the ops layer reports.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = x - m_safe
        e = tl.exp(d)
        alpha = tl.exp(m - m_safe)
        if WITH_ENTROPY:
            carried = tl.where(s > 0, alpha * (w + s * (m - m_safe)), 0.0)
            w = carried + tl.sum(tl.where(e > 0, e * d, 0.0), 0)
        s = s * alpha + tl.sum(e, 0)
        m = m_new
    m_fin = tl.where(m == float("-inf"), 0.0, m)
    log_s = tl.log(s)
    lse = m_fin + log_s  # -inf when the row has no finite logit (s == 0), NaN for NaN/+inf logits
    lab_ok = (lab >= 0) & (lab < V)
    x_t = tl.load(base + lab, mask=lab_ok & (v_end > 0), other=float("nan")).to(tl.float32) * inv_temp
    logp = x_t - lse
    if WITH_ENTROPY:
        ent = log_s - w / s
    if PPO:
        old = tl.load(old_ptr + row)
        a = tl.load(adv_ptr + row)
        log_ratio = logp - old
        ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -_RATIO_CLAMP), _RATIO_CLAMP))
        pg1 = -a * ratio
        pg2 = -a * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
        pg = tl.maximum(pg1, pg2)
        clipped = pg2 > pg1
        grad_ok = (pg2 <= pg1) & (log_ratio >= -_RATIO_CLAMP) & (log_ratio <= _RATIO_CLAMP)
        if DUAL:
            pg3 = -a * dual_clip
            dual_f = tl.where((a < 0) & (pg > pg3), 1.0, 0.0)
            grad_ok = grad_ok & ((a >= 0) | (pg <= pg3))
            pg = tl.where(a < 0, tl.minimum(pg, pg3), pg)
        else:
            dual_f = tl.zeros_like(pg)
        # tl.minimum/maximum drop a NaN operand: a NaN old logprob or advantage would come out as a finite,
        # made-up loss. Propagate it, as the reference and the C++ kernels do (with FASTPPO_CHECKS=0).
        nan_in = (log_ratio != log_ratio) | (a != a)
        pg = tl.where(nan_in, float("nan"), pg)
        ratio = tl.where(nan_in, float("nan"), ratio)
        dpg = tl.where(grad_ok, -a * ratio, 0.0)
        if HAS_REF:
            d_ref = logp - tl.load(ref_ptr + row)
            if KL_KIND == _KL_K1:
                kl = d_ref
                dkl = tl.zeros_like(d_ref) + 1.0
            elif KL_KIND == _KL_K2:
                kl = 0.5 * d_ref * d_ref
                dkl = d_ref
            elif KL_KIND == _KL_K3:
                em = tl.exp(-d_ref)
                kl = em + d_ref - 1.0
                dkl = 1.0 - em
            else:
                kl = tl.abs(d_ref)
                dkl = tl.where(d_ref > 0, 1.0, tl.where(d_ref < 0, -1.0, 0.0))
        else:
            kl = tl.zeros_like(pg)
            dkl = tl.zeros_like(pg)
        # kl_coef == 0 (ref given only for the KL statistic) adds nothing, not 0 * inf = NaN (as the reference)
        loss = pg + tl.where(kl_coef != 0.0, kl_coef * kl, 0.0) - entropy_coef * ent
        zero = 0.0
        tl.store(terms_ptr + _T_LOGP * N + row, tl.where(valid, logp, zero))
        tl.store(terms_ptr + _T_ENTROPY * N + row, tl.where(valid, ent, zero))
        tl.store(terms_ptr + _T_LSE * N + row, tl.where(valid, lse, zero))
        tl.store(terms_ptr + _T_PG * N + row, tl.where(valid, pg, zero))
        tl.store(terms_ptr + _T_RATIO * N + row, tl.where(valid, ratio, zero))
        tl.store(terms_ptr + _T_KL * N + row, tl.where(valid, kl, zero))
        tl.store(terms_ptr + _T_DPG * N + row, tl.where(valid, dpg, zero))
        tl.store(terms_ptr + _T_DKL * N + row, tl.where(valid, dkl, zero))
        tl.store(terms_ptr + _T_CLIPPED * N + row, tl.where(valid, clipped.to(tl.float32), zero))
        tl.store(terms_ptr + _T_DUAL_CLIPPED * N + row, tl.where(valid, dual_f, zero))
        tl.store(terms_ptr + _T_LOSS * N + row, tl.where(valid, loss, zero))
    else:
        tl.store(logp_ptr + row, logp)
        tl.store(lse_ptr + row, lse)
        if WITH_ENTROPY:
            tl.store(ent_ptr + row, ent)


_row_forward = late_jit(_row_forward_kernel)


# ---------------------------------------------------------------------------------------------- backward
def _row_backward_kernel(
    x_ptr, stride_xb, stride_xt, n_t, labels_ptr, V, inv_temp, lse_ptr, ent_ptr, glp_ptr, gh_ptr,
    out_ptr, stride_ob, stride_ot,
    BLOCK: tl.constexpr, HAS_GLP: tl.constexpr, HAS_GH: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // n_t
    t = row % n_t
    base = x_ptr + b * stride_xb + t * stride_xt
    obase = out_ptr + b * stride_ob + t * stride_ot
    cols = tl.arange(0, BLOCK)
    lse = tl.load(lse_ptr + row)
    lab = tl.load(labels_ptr + row)
    if HAS_GLP:
        g_lp = tl.load(glp_ptr + row)
        active = g_lp != 0
    else:
        g_lp = 0.0
        active = tl.zeros_like(lse) != 0
    if HAS_GH:
        g_h = tl.load(gh_ptr + row)
        ent = tl.load(ent_ptr + row)
        active = active | (g_h != 0)
    if active:
        # Each element is read before it is written by this same program, so out may alias the logits.
        for start in range(0, V, BLOCK):
            offs = start + cols
            in_row = offs < V
            x = tl.load(base + offs, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temp
            logp = x - lse
            p = tl.exp(logp)
            dx = tl.zeros([BLOCK], tl.float32)
            if HAS_GLP:
                dx = g_lp * (tl.where(offs == lab, 1.0, 0.0) - p)
            if HAS_GH:
                # p*log p -> 0 as p -> 0 (masked vocabulary): guard the 0 * -inf.
                dx = dx - g_h * tl.where(p > 0, p * (logp + ent), 0.0)
            tl.store(obase + offs, (dx * inv_temp).to(out_ptr.dtype.element_ty), mask=in_row)
    else:
        # Masked tokens (zero upstream gradient): zeros, no exp, no read of the logits.
        for start in range(0, V, BLOCK):
            offs = start + cols
            tl.store(obase + offs, tl.zeros([BLOCK], out_ptr.dtype.element_ty), mask=offs < V)


_row_backward = late_jit(_row_backward_kernel)


# --------------------------------------------------------------------------------------------- launchers
def _rows(logits: Tensor, labels: Tensor) -> tuple[int, int, int, int]:
    """``(B, T, V, N)`` of launcher inputs that follow the contract (fastppo._contract), else a clear error."""
    check_logits(logits)
    n_b, n_t, v = logits.shape
    check_vector("labels", labels, (n_b * n_t,), torch.int64, logits.device)
    return n_b, n_t, v, n_b * n_t


def _check_f32(name: str, t: Tensor, n: int, device: torch.device) -> None:
    check_vector(name, t, (n,), torch.float32, device)


def logprobs_forward(
    logits: Tensor, labels: Tensor, temperature: float, with_entropy: bool
) -> tuple[Tensor, Tensor | None, Tensor]:
    """``logits [B, T, V]``, ``labels [N]`` -> ``(logp [N], entropy [N] or None, lse [N])`` float32."""
    x, lab = logits, labels
    n_b, n_t, v, n = _rows(x, lab)
    logp = torch.empty(n, dtype=torch.float32, device=x.device)
    lse = torch.empty(n, dtype=torch.float32, device=x.device)
    ent = torch.empty(n, dtype=torch.float32, device=x.device) if with_entropy else None
    if n == 0:
        return logp, ent, lse
    block, warps = row_config(v, x.dtype)
    with on_device(x):
        _row_forward[(n,)](
            x, x.stride(0), x.stride(1), n_t, lab, v, 1.0 / float(temperature),
            logp, ent if ent is not None else logp, lse,
            logp, logp, logp, logp, logp, n,
            0.0, 0.0, 0.0, 0.0, 0.0,
            BLOCK=block, WITH_ENTROPY=bool(with_entropy), PPO=False, HAS_REF=False, DUAL=False, KL_KIND=0,
            num_warps=warps,
        )
    return logp, ent, lse


def logprobs_backward(
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    grad_logp: Tensor | None,
    grad_entropy: Tensor | None,
    temperature: float,
    out: Tensor,
) -> Tensor:
    """Write ``dlogits [B, T, V]`` into ``out`` (logits' shape; may be ``logits`` itself) and return it.

    ``dx_j = [g_lp*(1[j=t] - p_j) - g_H*p_j*(log p_j + H)] / T``; rows with ``g_lp == g_H == 0`` get zeros.
    """
    x, lab, o = logits, labels, out
    n_b, n_t, v, n = _rows(x, lab)
    check_out(o, x)
    _check_f32("lse", lse, n, x.device)
    if grad_logp is not None:
        _check_f32("grad_logp", grad_logp, n, x.device)
    if grad_entropy is not None and entropy is None:
        raise ValueError("grad_entropy needs the forward entropy")
    if entropy is not None:
        _check_f32("entropy", entropy, n, x.device)
    if grad_entropy is not None:
        _check_f32("grad_entropy", grad_entropy, n, x.device)
    if n == 0:
        return out
    block, warps = row_config(v, x.dtype)
    with on_device(x):
        _row_backward[(n,)](
            x, x.stride(0), x.stride(1), n_t, lab, v, 1.0 / float(temperature), lse,
            entropy if grad_entropy is not None else lse,
            grad_logp if grad_logp is not None else lse,
            grad_entropy if grad_entropy is not None else lse,
            o, o.stride(0), o.stride(1),
            BLOCK=block, HAS_GLP=grad_logp is not None, HAS_GH=grad_entropy is not None, num_warps=warps,
        )
    return out


def ppo_loss_forward(
    logits: Tensor,
    labels: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    ref_logp: Tensor | None,
    mask: Tensor,
    objective: PPOObjective,
) -> Tensor:
    """One pass over ``logits [B, T, V]`` -> ``terms`` float32 ``[len(PPO_TERMS), N]`` (rows in PPO_TERMS order).

    ``old_logp, adv, ref_logp, mask`` float32 ``[N]`` (mask 0/1); masked rows skip the vocabulary and get zeros.
    """
    x, lab = logits, labels
    n_b, n_t, v, n = _rows(x, lab)
    for name, t in (("old_logp", old_logp), ("adv", adv), ("mask", mask)):
        _check_f32(name, t, n, x.device)
    if ref_logp is not None:
        _check_f32("ref_logp", ref_logp, n, x.device)
    obj = objective
    terms = torch.empty((NUM_TERMS, n), dtype=torch.float32, device=x.device)
    if n == 0:
        return terms
    block, warps = row_config(v, x.dtype)
    dual_clip = 0.0 if obj.dual_clip is None else float(obj.dual_clip)
    with on_device(x):
        _row_forward[(n,)](
            x, x.stride(0), x.stride(1), n_t, lab, v, 1.0 / float(obj.temperature),
            terms, terms, terms,
            old_logp, adv, ref_logp if ref_logp is not None else old_logp, mask, terms, n,
            float(obj.clip_low), float(obj.clip_high), dual_clip, float(obj.kl_coef), float(obj.entropy_coef),
            BLOCK=block, WITH_ENTROPY=True, PPO=True, HAS_REF=ref_logp is not None, DUAL=dual_clip > 0.0,
            KL_KIND=KL_KINDS.index(obj.kl_kind), num_warps=warps,
        )
    return terms
