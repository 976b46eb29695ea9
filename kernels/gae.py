"""GAE as a chunked reverse scan, parallel over the batch AND over time.

``rewards, values [B, T]`` float32, ``mask [B, T]`` bool, ``bootstrap [B]`` -> ``(advantages, returns) [B, T]``
with the carry-forward semantics of ``fastppo.reference.gae`` (masked tokens are skipped: the next value and
advantage carried backwards are those of the next *valid* token).

Each token is a map of the carries ``(A, V)`` = (advantage, value of the next valid token) seen from behind:
  valid t:   (A, V) -> (r_t - v_t + gamma*V + gamma*lam*A,  v_t)
  masked t:  (A, V) -> (A, V)
Every composition of such maps has the form ``(A, V) -> (C + G*A + H*V, vf if has else V)``, a 5-tuple
``(C, G, H, has, vf)``; composing is associative, so a time chunk's suffix compositions come from one
``tl.associative_scan``. Phase 0 stores each chunk's total map; phase 1 folds the totals of the later chunks
into the chunk's incoming carry ``(A_in, V_in)`` (starting from ``(0, bootstrap)``) and writes
``adv_t = C_t + G_t*A_in + H_t*V_in`` for the token's suffix map. Two launches, no host sync, fp32 math.

``gae_whiten_forward`` also whitens the advantages over all valid tokens: phase 1 emits each chunk's
(count, mean, M2), one program merges them in a fixed order (Chan's pairwise formula: no sum-of-squares
cancellation, deterministic), and a last elementwise pass normalises in place.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

from fastppo._contract import check_gae_inputs

from ._jit import late_jit, next_pow2, on_device

# Tests set this to force many chunks on short sequences (exercises the cross-chunk carry).
CHUNK_OVERRIDE: int | None = None


def gae_chunk(t: int) -> int:
    """Time chunk per program: a function of T only, so a row's result does not depend on the batch."""
    if CHUNK_OVERRIDE is not None:
        return CHUNK_OVERRIDE
    return max(16, min(next_pow2(t), 256))


def _compose_fn(c_a, g_a, h_a, has_a, vf_a, c_b, g_b, h_b, has_b, vf_b):
    # Scan order runs backwards in time: ``a`` is the composed map of the later tokens, ``b`` that of the earlier
    # ones; the result is b after a (b o a).
    later_has = has_a > 0
    c = c_b + g_b * c_a + tl.where(later_has, h_b * vf_a, 0.0)
    g = g_b * g_a
    h = g_b * h_a + tl.where(later_has, 0.0, h_b)
    has = tl.maximum(has_a, has_b)
    vf = tl.where(has_b > 0, vf_b, vf_a)
    return c, g, h, has, vf


# A combine function must be a JITFunction in compiled mode; the interpreter calls its ``.fn`` either way.
_compose = JITFunction(_compose_fn)


def _gae_kernel(
    r_ptr, v_ptr, m_ptr, boot_ptr, adv_ptr, ret_ptr, summ_ptr, stats_ptr, B, T, NC, gamma, gl,
    CHUNK: tl.constexpr, NC_P2: tl.constexpr, PHASE: tl.constexpr, HAS_BOOT: tl.constexpr, STATS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    i = tl.arange(0, CHUNK)
    t = k * CHUNK + (CHUNK - 1 - i)  # scan position i walks backwards in time through the chunk
    inb = t < T
    off = b * T + t
    valid = tl.load(m_ptr + off, mask=inb, other=0) != 0
    r = tl.load(r_ptr + off, mask=valid, other=0.0)
    v = tl.load(v_ptr + off, mask=valid, other=0.0)
    c = tl.where(valid, r - v, 0.0)
    g = tl.where(valid, gl, 1.0)
    h = tl.where(valid, gamma, 0.0)
    has = tl.where(valid, 1.0, 0.0)
    C, G, H, HAS, VF = tl.associative_scan((c, g, h, has, v), 0, _compose)
    if PHASE == 0:
        # The inclusive scan's last position holds the whole chunk's map; pick it (a sum of one term: exact).
        last = i == CHUNK - 1
        base = summ_ptr + b * NC + k
        stride = B * NC
        tl.store(base, tl.sum(tl.where(last, C, 0.0), 0))
        tl.store(base + stride, tl.sum(tl.where(last, G, 0.0), 0))
        tl.store(base + 2 * stride, tl.sum(tl.where(last, H, 0.0), 0))
        tl.store(base + 3 * stride, tl.sum(tl.where(last, HAS, 0.0), 0))
        tl.store(base + 4 * stride, tl.sum(tl.where(last, VF, 0.0), 0))
    else:
        # Incoming carry: compose the maps of chunks k+1 .. NC-1 (identity where there are none).
        q = tl.arange(0, NC_P2)
        j = NC - 1 - q
        later = j > k
        sbase = summ_ptr + b * NC + j
        stride = B * NC
        sc = tl.load(sbase, mask=later, other=0.0)
        sg = tl.load(sbase + stride, mask=later, other=1.0)
        sh = tl.load(sbase + 2 * stride, mask=later, other=0.0)
        shas = tl.load(sbase + 3 * stride, mask=later, other=0.0)
        svf = tl.load(sbase + 4 * stride, mask=later, other=0.0)
        FC, FG, FH, FHAS, FVF = tl.associative_scan((sc, sg, sh, shas, svf), 0, _compose)
        top = q == NC_P2 - 1
        fc = tl.sum(tl.where(top, FC, 0.0), 0)
        fh = tl.sum(tl.where(top, FH, 0.0), 0)
        fhas = tl.sum(tl.where(top, FHAS, 0.0), 0)
        fvf = tl.sum(tl.where(top, FVF, 0.0), 0)
        if HAS_BOOT:
            boot = tl.load(boot_ptr + b)
        else:
            boot = 0.0
        a_in = fc + fh * boot  # the advantage after the sequence's end is 0
        v_in = tl.where(fhas > 0, fvf, boot)
        adv = tl.where(valid, C + G * a_in + H * v_in, 0.0)
        tl.store(adv_ptr + off, adv, mask=inb)
        tl.store(ret_ptr + off, tl.where(valid, adv + v, 0.0), mask=inb)
        if STATS:
            # This chunk's (count, mean, M2) of the valid advantages, two-pass in registers; merged in order later.
            cnt = tl.sum(valid.to(tl.float32), 0)
            mean = tl.sum(adv, 0) / tl.maximum(cnt, 1.0)
            dev = tl.where(valid, adv - mean, 0.0)
            p = b * NC + k
            tl.store(stats_ptr + p, cnt)
            tl.store(stats_ptr + B * NC + p, mean)
            tl.store(stats_ptr + 2 * B * NC + p, tl.sum(dev * dev, 0))


def _merge_fn(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    # Chan et al.'s pairwise merge of (count, mean, sum of squared deviations); empty parts are neutral.
    n = n_a + n_b
    frac = tl.where(n > 0, n_b / n, 0.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * frac
    m2 = m2_a + m2_b + delta * delta * n_a * frac
    return n, mean, m2


_merge = JITFunction(_merge_fn)


def _moments_kernel(stats_ptr, out_ptr, P, eps, RB: tl.constexpr):
    """One program: merge the P per-chunk moments in a fixed order -> (mean, 1/sqrt(var_unbiased + eps))."""
    q = tl.arange(0, RB)
    n = tl.sum(tl.zeros([RB], tl.float32), 0)
    mean = n
    m2 = n
    for start in range(0, P, RB):
        idx = start + q
        ok = idx < P
        bn = tl.load(stats_ptr + idx, mask=ok, other=0.0)
        bmean = tl.load(stats_ptr + P + idx, mask=ok, other=0.0)
        bm2 = tl.load(stats_ptr + 2 * P + idx, mask=ok, other=0.0)
        cn, cmean, cm2 = tl.reduce((bn, bmean, bm2), 0, _merge)
        # the same merge, inline (a helper call would need a jit function in one mode and not the other)
        tot = n + cn
        frac = tl.where(tot > 0, cn / tot, 0.0)
        delta = cmean - mean
        m2 = m2 + cm2 + delta * delta * n * frac
        mean = mean + delta * frac
        n = tot
    var = m2 / (n - 1.0)  # unbiased, as masked_whiten; fewer than 2 valid tokens give inf/NaN (callers check)
    tl.store(out_ptr, mean)
    tl.store(out_ptr + 1, 1.0 / tl.sqrt(var + eps))


def _whiten_kernel(adv_ptr, m_ptr, mom_ptr, N, SHIFT_MEAN: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    valid = tl.load(m_ptr + offs, mask=inb, other=0) != 0
    a = tl.load(adv_ptr + offs, mask=inb, other=0.0)
    mean = tl.load(mom_ptr)
    rstd = tl.load(mom_ptr + 1)
    w = (a - mean) * rstd
    if not SHIFT_MEAN:
        w = w + mean
    tl.store(adv_ptr + offs, tl.where(valid, w, 0.0), mask=inb)


_gae = late_jit(_gae_kernel)
_moments = late_jit(_moments_kernel)
_whiten = late_jit(_whiten_kernel)


def _scan(rewards: Tensor, values: Tensor, mask: Tensor, bootstrap: Tensor | None, gamma: float, lam: float,
          stats: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    check_gae_inputs(rewards, values, mask, bootstrap)
    n_b, n_t = rewards.shape
    dev = rewards.device
    m8 = mask.view(torch.uint8)  # bytes: bool pointers are awkward in kernels
    boot = bootstrap
    adv = torch.empty((n_b, n_t), dtype=torch.float32, device=dev)
    ret = torch.empty((n_b, n_t), dtype=torch.float32, device=dev)
    if adv.numel() == 0:
        return adv, ret, m8, None
    chunk = gae_chunk(n_t)
    nc = -(-n_t // chunk)
    nc_p2 = max(2, next_pow2(nc))
    summ = torch.empty((5, n_b, nc), dtype=torch.float32, device=dev)
    moments = torch.empty((3, n_b, nc), dtype=torch.float32, device=dev) if stats else summ
    args = (rewards, values, m8, boot if boot is not None else rewards, adv, ret, summ, moments, n_b, n_t, nc,
            float(gamma), float(gamma) * float(lam))
    meta = dict(CHUNK=chunk, NC_P2=nc_p2, HAS_BOOT=boot is not None, num_warps=4)
    with on_device(rewards):
        if nc > 1:
            _gae[(n_b, nc)](*args, PHASE=0, STATS=False, **meta)
        _gae[(n_b, nc)](*args, PHASE=1, STATS=stats, **meta)
    return adv, ret, m8, (moments if stats else None)


def gae_forward(
    rewards: Tensor, values: Tensor, mask: Tensor, bootstrap: Tensor | None, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """``rewards, values`` float32 ``[B, T]``, ``mask`` bool ``[B, T]``, ``bootstrap`` float32 ``[B]`` or None
    -> ``(advantages, returns)`` float32 ``[B, T]`` (0 where mask is 0)."""
    adv, ret, _, _ = _scan(rewards, values, mask, bootstrap, gamma, lam, stats=False)
    return adv, ret


def gae_whiten_forward(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    bootstrap: Tensor | None,
    gamma: float,
    lam: float,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    """GAE with the advantages whitened over all valid tokens (as ``masked_whiten``: unbiased variance), fused:
    the scan also emits per-chunk (count, mean, M2); one program merges them in a fixed order (deterministic);
    a last pass normalises in place. Returns ``(whitened advantages, returns)``, returns from the raw advantages;
    0 where mask is 0. Needs at least 2 valid tokens (else NaN/inf: the caller validates)."""
    adv, ret, m8, moments = _scan(rewards, values, mask, bootstrap, gamma, lam, stats=True)
    if moments is None:
        return adv, ret
    p = moments.shape[1] * moments.shape[2]
    mom = torch.empty(2, dtype=torch.float32, device=adv.device)
    n = adv.numel()
    block = 1024
    with on_device(adv):
        _moments[(1,)](moments, mom, p, float(eps), RB=min(1024, max(16, next_pow2(p))), num_warps=4)
        _whiten[(-(-n // block),)](adv, m8, mom, n, SHIFT_MEAN=bool(shift_mean), BLOCK=block, num_warps=4)
    return adv, ret

