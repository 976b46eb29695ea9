"""Fused token sampling over ``[B, V]`` logits: temperature, top-k, top-p and the inverse-CDF draw.

One program per row; semantics in ``fastppo/reference/sampling.py``. The row is read in chunks: an online
max / sum-exp, then (only when filtering) bisection over the bit patterns of ``p = exp(z - max)`` for the top-k
and top-p thresholds (non-negative floats order like their bits; each step re-reads the row), then a scan whose
per-chunk cumulative sums (float64) count the tokens before the draw. No probabilities are written to memory;
the kernel never synchronises with the host.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from fastppo._contract import DTYPE_CODES, check_vector

from ._jit import interpreting, late_jit, next_pow2, on_device

_ONE_BITS = 0x3F800000  # bits of 1.0f: every p = exp(z - max) is <= 1


def _sample_kernel(x_ptr, stride_b, V, u_ptr, out_ptr, inv_temp, top_k, top_p,
                   BLOCK: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_b
    cols = tl.arange(0, BLOCK)
    m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
    for start in range(0, V, BLOCK):
        offs = start + cols
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_temp
        m = tl.maximum(m, tl.max(x, 0))
    lo = tl.zeros([], tl.int64)  # kept: bits(p) >= lo
    if TOP_K:
        a = tl.zeros([], tl.int64)
        b = tl.full([], _ONE_BITS + 1, tl.int64)
        for _ in range(32):  # 2^32 > the search range: exact after 32 halvings
            mid = a + (b - a) // 2
            cnt = tl.zeros([], tl.int64)
            for start in range(0, V, BLOCK):
                offs = start + cols
                x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
                bits = tl.exp(x * inv_temp - m).to(tl.int32, bitcast=True).to(tl.int64)
                cnt += tl.sum(tl.where((bits >= mid) & (offs < V), 1, 0).to(tl.int64), 0)
            ok = cnt >= top_k
            a = tl.where(ok, mid, a)
            b = tl.where(ok, b, mid)
        lo = a
    if TOP_P:
        kept = tl.zeros([], tl.float64)
        for start in range(0, V, BLOCK):
            offs = start + cols
            x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            p = tl.exp(x * inv_temp - m)  # filtered / -inf logits: 0
            bits = p.to(tl.int32, bitcast=True).to(tl.int64)
            kept += tl.sum(tl.where(bits >= lo, p, 0.0).to(tl.float64), 0)
        limit = top_p * kept
        a = lo - 1
        b = tl.full([], _ONE_BITS, tl.int64)
        for _ in range(32):
            mid = a + (b - a) // 2
            mass = tl.zeros([], tl.float64)
            for start in range(0, V, BLOCK):
                offs = start + cols
                x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
                p = tl.exp(x * inv_temp - m)  # filtered / -inf logits: 0
                bits = p.to(tl.int32, bitcast=True).to(tl.int64)
                mass += tl.sum(tl.where((bits > mid) & (bits >= lo), p, 0.0).to(tl.float64), 0)
            ok = mass < limit
            b = tl.where(ok, mid, b)
            a = tl.where(ok, a, mid)
        lo = b
    total = tl.zeros([], tl.float64)
    last = tl.full([], -1, tl.int64)
    for start in range(0, V, BLOCK):
        offs = start + cols
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        p = tl.exp(x * inv_temp - m)  # filtered / -inf logits: 0
        bits = p.to(tl.int32, bitcast=True).to(tl.int64)
        keep = (bits >= lo) & (p > 0.0)
        total += tl.sum(tl.where(keep, p, 0.0).to(tl.float64), 0)
        last = tl.maximum(last, tl.max(tl.where(keep, offs.to(tl.int64), -1), 0))
    target = tl.load(u_ptr + row) * total
    run = tl.zeros([], tl.float64)
    before = tl.zeros([], tl.int64)  # tokens whose cumulative kept mass is still below the target
    for start in range(0, V, BLOCK):
        offs = start + cols
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        p = tl.exp(x * inv_temp - m)  # filtered / -inf logits: 0
        bits = p.to(tl.int32, bitcast=True).to(tl.int64)
        pk = tl.where((bits >= lo) & (p > 0.0), p, 0.0).to(tl.float64)
        cum = run + tl.cumsum(pk, 0)
        before += tl.sum(tl.where((cum < target) & (offs < V), 1, 0).to(tl.int64), 0)
        run += tl.sum(pk, 0)
    tl.store(out_ptr + row, tl.minimum(before, last))


_sample = late_jit(_sample_kernel)


def sample_block(v: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)``: a function of V only, so a row's draw does not depend on the batch."""
    block = min(next_pow2(v), 4096)
    if interpreting():
        return max(block, 16), 1
    return max(block, 16), 16 if block >= 4096 else 8 if block >= 1024 else 4


def sample_forward(logits: Tensor, uniforms: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """``logits [B, V]`` (unit stride on V), ``uniforms [B]`` float64 in (0, 1) -> tokens ``[B]`` int64."""
    if logits.dim() != 2 or logits.dtype not in DTYPE_CODES or (logits.stride(1) != 1 and logits.shape[1] > 1):
        raise ValueError("sample_forward takes fp32/bf16/fp16 logits [B, V] with unit stride on V")
    B, V = logits.shape
    check_vector("uniforms", uniforms, (B,), torch.float64, logits.device)
    u = uniforms
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    block, warps = sample_block(V)
    use_k = 0 < int(top_k) < V
    with on_device(logits):
        _sample[(B,)](logits, logits.stride(0), V, u, out, 1.0 / float(temperature), int(top_k), float(top_p),
                      BLOCK=block, TOP_K=use_k, TOP_P=float(top_p) < 1.0, num_warps=warps)
    return out
