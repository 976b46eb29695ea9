"""Reference outcome-based advantage estimators: GRPO, RLOO and REINFORCE++.

Plain PyTorch and fully vectorised: group statistics come from ``index_add`` over dense group ids (no loop
over groups) and the discounted return is a closed-form chunked scan (no loop over tokens).

Shapes: ``scores [B]`` (one scalar outcome per response), ``group_index [B]`` integer group ids (responses to
the same prompt share an id; ids need not be contiguous), ``mask [B, T]`` (bool/int/float, 1 on response
tokens). Outputs are ``[B, T]`` in the promoted dtype of the inputs (at least float32), 0 where mask is 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _dtype(*ts: Tensor) -> torch.dtype:
    d = torch.float32
    for t in ts:
        d = torch.promote_types(d, t.dtype)
    return d


def dense_group_ids(group_index: Tensor) -> Tensor:
    """Map arbitrary integer group ids ``[B]`` to dense ids in ``[0, n_groups)`` (order of first sorted id).

    Sort-based so the result size never depends on the data: no host synchronisation.
    """
    sorted_ids, order = torch.sort(group_index.reshape(-1).to(torch.int64), stable=True)
    starts = torch.zeros_like(sorted_ids)
    starts[1:] = (sorted_ids[1:] != sorted_ids[:-1]).to(torch.int64)
    dense_sorted = torch.cumsum(starts, 0)
    return torch.empty_like(dense_sorted).scatter_(0, order, dense_sorted)


def group_stats(scores: Tensor, gid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-response ``(count, mean, unbiased std)`` of its group, all ``[B]``; std is NaN for singletons.

    Two-pass (mean, then centred squares) like ``torch.std``, so it is as accurate as the per-group loop.
    """
    B = scores.shape[0]
    count = torch.zeros(B, dtype=scores.dtype, device=scores.device).index_add_(0, gid, torch.ones_like(scores))
    total = torch.zeros_like(count).index_add_(0, gid, scores)
    mean = (total / count.clamp_min(1.0))[gid]
    sq = torch.zeros_like(count).index_add_(0, gid, (scores - mean).square())
    n = count[gid]
    std = (sq[gid] / (n - 1.0)).sqrt()
    return n, mean, std


def grpo_advantages(
    scores: Tensor, group_index: Tensor, mask: Tensor, *, norm_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO: ``(s - mean_g) / (std_g + eps)`` (or ``s - mean_g`` when not ``norm_by_std``, Dr. GRPO), broadcast
    over the response tokens. ``std_g`` is the unbiased group std; a group of one has mean 0 and std 1 (as verl).
    ``[B], [B], [B, T] -> [B, T]``.
    """
    dtype = _dtype(scores)
    s = scores.to(dtype)
    n, mean, std = group_stats(s, dense_group_ids(group_index))
    single = n < 2
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    adv = (s - mean) / (std + eps) if norm_by_std else s - mean
    return adv.unsqueeze(-1) * mask.to(dtype)


def rloo_advantages(scores: Tensor, group_index: Tensor, mask: Tensor) -> Tensor:
    """RLOO: ``s - mean(other responses of the group)`` = ``(n*s - sum_g) / (n - 1)``, written as verl writes it
    (``s*n/(n-1) - mean_g*n/(n-1)``). A group of one has no baseline: its advantage is the raw score.
    ``[B], [B], [B, T] -> [B, T]``.
    """
    dtype = _dtype(scores)
    s = scores.to(dtype)
    n, mean, _ = group_stats(s, dense_group_ids(group_index))
    scale = n / (n - 1.0).clamp_min(1.0)
    adv = torch.where(n > 1, s * scale - mean * scale, s)
    return adv.unsqueeze(-1) * mask.to(dtype)


def place_on_last_token(scores: Tensor, mask: Tensor) -> Tensor:
    """Scatter ``scores [B]`` onto the last valid token of each row of ``mask [B, T]`` -> ``[B, T]``.

    Rows without a valid token get nothing.
    """
    dtype = _dtype(scores)
    m = mask.bool()
    T = m.shape[-1]
    last = (T - 1) - torch.flip(m, dims=[-1]).to(torch.int8).argmax(dim=-1)
    out = torch.zeros(m.shape, dtype=dtype, device=scores.device)
    val = torch.where(m.any(-1), scores.to(dtype), torch.zeros_like(scores, dtype=dtype))
    return out.scatter_(-1, last.unsqueeze(-1), val.unsqueeze(-1))


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """``G_t = r_t + gamma * G_next`` over valid tokens only (masked positions are skipped: carry-forward),
    0 after the last valid token and 0 where mask is 0. ``[B, T], [B, T] -> [B, T]``.

    Closed form without a loop over time: with ``k_t`` the number of valid tokens before ``t``,
    ``G_t = sum_{valid s >= t} gamma^(k_s - k_t) r_s``. Evaluated in chunks of ``C ~ sqrt(T)`` tokens: inside
    a chunk, a reverse cumulative sum of ``gamma^(k_s - K) r_s`` (``K`` = the chunk's first rank) rescaled by
    ``gamma^-(k_t - K)``, in float64 with ``C`` small enough that ``gamma^-C`` cannot overflow; across chunks
    an ``nC x nC`` decay matrix with non-negative exponents. Nothing overflows at any length.
    """
    dtype = _dtype(rewards)
    m = mask.bool()
    B, T = m.shape
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    r = torch.where(m, rewards.to(dtype), zero)
    if T == 0 or gamma == 0.0:
        return r
    if gamma == 1.0:  # undiscounted (the common REINFORCE++ setting): a reverse cumulative sum
        return torch.where(m, torch.flip(torch.cumsum(torch.flip(r, [-1]), -1), [-1]), zero)
    f64 = torch.float64
    # gamma^C >= 1e-290 keeps gamma^-C finite in float64; tiny gammas get short chunks (more cross-chunk work).
    c_max = max(1, int(-290.0 * math.log(10.0) / math.log(gamma)))
    C = max(1, min(math.isqrt(T - 1) + 1, c_max))
    nC = -(-T // C)
    pad = nC * C - T
    r64, mp = r.to(f64), m
    if pad:
        r64 = torch.nn.functional.pad(r64, (0, pad))
        mp = torch.nn.functional.pad(m, (0, pad))
    k = torch.cumsum(mp.to(torch.int64), -1) - mp.to(torch.int64)  # exclusive valid rank
    g = torch.tensor(gamma, dtype=f64, device=r.device)
    kc = k.view(B, nC, C)
    K = kc[..., 0]  # [B, nC] valid rank at each chunk start
    w = g.pow((kc - K.unsqueeze(-1)).to(f64))  # in [gamma^C, 1]
    scaled = w * r64.view(B, nC, C)
    local = torch.flip(torch.cumsum(torch.flip(scaled, [-1]), -1), [-1]) / w  # the part of G_t inside t's chunk
    upper_c = torch.ones(nC, nC, dtype=torch.bool, device=r.device).triu()
    ec = (K.unsqueeze(-2) - K.unsqueeze(-1)).clamp_min(0)
    decay = torch.where(upper_c, g.pow(ec.to(f64)), torch.zeros((), dtype=f64, device=r.device))
    tail = (decay * local[..., 0].unsqueeze(-2)).sum(-1)  # [B, nC]: G at each chunk start
    tail_next = torch.cat([tail[:, 1:], tail.new_zeros(B, 1)], dim=1)
    K_next = torch.cat([K[:, 1:], K[:, -1:]], dim=1)
    G = local + g.pow((K_next.unsqueeze(-1) - kc).clamp_min(0).to(f64)) * tail_next.unsqueeze(-1)
    G = G.reshape(B, nC * C)[:, :T].to(dtype)
    return torch.where(m, G, zero)


def reinforce_pp_advantages(
    rewards: Tensor, mask: Tensor, *, gamma: float = 1.0, whiten: bool = True, eps: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """REINFORCE++: discounted return over valid tokens, then whitened over all valid tokens of the batch.

    ``rewards [B, T]`` token rewards, or ``[B]`` scores placed on each row's last valid token; ``mask [B, T]``.
    Returns ``(advantages, returns)`` ``[B, T]``: ``returns = discounted_returns(rewards, mask, gamma)``,
    ``advantages = (returns - mean) / sqrt(var + eps)`` with mean / unbiased var over valid tokens
    (``returns`` unchanged when not ``whiten``), 0 where mask is 0.
    """
    if rewards.dim() == 1:
        rewards = place_on_last_token(rewards, mask)
    ret = discounted_returns(rewards, mask, gamma)
    if not whiten:
        return ret.clone(), ret
    m = mask.to(ret.dtype)
    n = m.sum()
    mean = (ret * m).sum() / n
    var = ((ret - mean).square() * m).sum() / (n - 1.0)
    adv = (ret - mean) * torch.rsqrt(var + eps) * m
    return adv, ret
