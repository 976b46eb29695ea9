"""Vocabulary-parallel fused LM head: log-probs, entropy and the PPO loss from the last hidden states and this rank's
rows of a vocabulary-split (column-parallel) LM-head weight, without materialising the ``[N, V_r]`` logits.

``hidden [..., H]`` (replicated on every rank of ``group``), ``local_weight [V_r, H]`` (rows
``[vocab_start, vocab_start + V_r)`` of the ``[V, H]`` weight), optional ``local_bias [V_r]``, ``labels [...]``
global ids. Tokens are processed in chunks of ``chunk_size`` rows: one matmul into a ``[C, V_r]`` buffer, the
slice's row statistics (``vocab_parallel.local_partials``), then the same two collectives as the logits op over
all ``N`` rows at once (max, then one packed sum). The backward recomputes each chunk's logits, forms dlogits
locally and accumulates ``dW_r = dz^T h`` and ``db_r``; ``dh = dz @ W_r`` is this slice's share of the hidden
state's gradient, so it is summed over the group (one all-reduce of ``[N, H]``, the all-reduce that the copy
into a tensor-parallel region performs in Megatron-style models). ``hidden_grad="local"`` returns the share
unsummed, for a caller whose next op backward sums it (verl's Megatron path gathers a sequence-parallel hidden
state, whose backward is a reduce-scatter).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fastppo import _validate as validate
from fastppo.autograd_linear import chunk_rows
from fastppo.distributed.vocab_parallel import (
    all_reduce_copy,
    combine_partials,
    dlogits_local,
    local_label_index,
    local_partials,
    require_process_group,
    scaled_logits,
    vocab_start_of,
)
from fastppo.objective import PPOObjective, objective_from
from fastppo.reference.losses import ppo_loss_from_logprobs


def _chunk_logits(h: Tensor, w: Tensor, b: Tensor | None, temperature: float, valid: Tensor | None) -> Tensor:
    """``z = (h @ w.T + b) / T`` in float32 (float64 for float64 inputs), as the LM head computes the logits; rows
    where ``valid`` is 0 are zeros."""
    return scaled_logits(torch.nn.functional.linear(h, w, b), temperature, valid)


class VocabParallelLinearLogprobsEntropy(torch.autograd.Function):
    """``(hidden [N, H], local_weight [V_r, H], local_bias [V_r] | None, labels [N], ...) -> (logp [N], H [N])``.
    ``valid`` (``[N]`` or None): rows to compute; the others' logits are zeroed and not checked. ``sum_dh``: the
    hidden state's gradient summed over the group (else this slice's share)."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, b: Tensor | None, labels: Tensor, vocab_start: int, temperature: float,
                chunk: int, group: dist.ProcessGroup | None, valid: Tensor | None, op: str,
                sum_dh: bool = True) -> tuple[Tensor, Tensor]:
        idx, owned = local_label_index(labels, vocab_start, w.shape[0])
        vc = lambda s: None if valid is None else valid[s: s + chunk]  # noqa: E731
        parts = [local_partials(_chunk_logits(h[s: s + chunk], w, b, temperature, vc(s)), idx[s: s + chunk],
                                owned[s: s + chunk]) for s in range(0, h.shape[0], chunk)]
        m_l, s_l, u_l, y = (torch.cat(p) for p in zip(*parts, strict=True))
        m, log_s, expect, y = combine_partials(m_l, s_l, u_l, y, owned, group, op=op, temperature=temperature,
                                               source="hidden", valid=valid)
        ctx.save_for_backward(h, w, b, idx, owned, m, log_s, expect, valid)
        ctx.temperature, ctx.chunk, ctx.group, ctx.sum_dh = temperature, chunk, group, sum_dh
        return y - m - log_s, m + log_s - expect

    @staticmethod
    def backward(ctx, dlogp: Tensor, dentropy: Tensor):
        h, w, b, idx, owned, m, log_s, expect, valid = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        acc = torch.promote_types(h.dtype, torch.float32)
        dh = torch.empty(h.shape, dtype=acc, device=h.device)
        dw = torch.zeros(w.shape, dtype=acc, device=w.device)
        db = torch.zeros(w.shape[:1], dtype=acc, device=w.device) if b is not None else None
        for s in range(0, h.shape[0], chunk):
            sl = slice(s, s + chunk)
            hc = h[sl]
            z = _chunk_logits(hc, w, b, t, None if valid is None else valid[sl])
            dz = dlogits_local(z, m[sl], log_s[sl], expect[sl], idx[sl], owned[sl], dlogp[sl], dentropy[sl], t)
            # a masked row's hidden state may hold anything: its (zero) gradient must not meet it in dW
            hc = hc if valid is None else torch.where((valid[sl] != 0).unsqueeze(-1), hc, torch.zeros_like(hc))
            dh[sl] = dz @ w.to(acc)
            dw += dz.T @ hc.to(acc)
            if db is not None:
                db += dz.sum(0)
        if ctx.sum_dh:
            dh = all_reduce_copy(dh, dist.ReduceOp.SUM, ctx.group)  # every slice of the vocabulary contributes to dh
        return (dh.to(h.dtype), dw.to(w.dtype), None if db is None else db.to(b.dtype),
                None, None, None, None, None, None, None, None)


def _inputs(hidden: object, weight: object, labels: object, bias: object | None,
            chunk_size: int | None) -> tuple[Tensor, Tensor, Tensor | None, Tensor, int]:
    hidden = validate.float_tensor("hidden", hidden)
    weight = validate.float_tensor("local_weight", weight)
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have shape [..., H] with H >= 1, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"local_weight must be [V_r, H] with H = {hidden.shape[-1]}, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and local_weight must have one dtype, got {hidden.dtype} and {weight.dtype}")
    if bias is not None:
        bias = validate.float_tensor("local_bias", bias)
        if bias.shape != weight.shape[:1] or bias.dtype != hidden.dtype:
            raise ValueError(f"local_bias must be [V_r] = [{weight.shape[0]}] of dtype {hidden.dtype}, got "
                             f"{tuple(bias.shape)} {bias.dtype}")
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError("labels must be an integer torch.Tensor of global token ids")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {tuple(hidden.shape[:-1])}")
    validate.same_device(hidden=hidden, local_weight=weight, local_bias=bias, labels=labels)
    if chunk_size is None:
        chunk = chunk_rows(weight.shape[0], weight.shape[1], hidden.dtype, hidden.device)
    elif int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    else:
        chunk = int(chunk_size)
    return hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1), chunk


def _linear_logprobs_entropy(hidden: Tensor, local_weight: Tensor, labels: Tensor, group: dist.ProcessGroup | None,
                             local_bias: Tensor | None, temperature: float, vocab_start: int | None,
                             chunk_size: int | None, valid: Tensor | None, op: str,
                             sum_dh: bool = True) -> tuple[Tensor, Tensor]:
    lead = hidden.shape[:-1] if isinstance(hidden, Tensor) else None
    h, w, b, lab, chunk = _inputs(hidden, local_weight, labels, local_bias, chunk_size)
    if h.shape[0] == 0:  # no rows: nothing to reduce (every rank sees the same empty batch)
        empty = h.new_empty(lead, dtype=torch.promote_types(h.dtype, torch.float32))
        return empty, empty.clone()
    if vocab_start is None:
        vocab_start = vocab_start_of(w.shape[0], group)
    logp, ent = VocabParallelLinearLogprobsEntropy.apply(h, w, b, lab, int(vocab_start), temperature, chunk, group,
                                                         None if valid is None else valid.reshape(-1), op, sum_dh)
    return logp.view(lead), ent.view(lead)


def vocab_parallel_linear_logprobs_and_entropy(
    hidden: Tensor,
    local_weight: Tensor,
    labels: Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    local_bias: Tensor | None = None,
    temperature: float = 1.0,
    vocab_start: int | None = None,
    chunk_size: int | None = None,
    hidden_grad: str = "sum",
) -> tuple[Tensor, Tensor]:
    """``vocab_parallel_logprobs_and_entropy(hidden @ local_weight.T + local_bias, labels, group)`` without the
    logits. ``[..., H], [V_r, H], [...] -> ([...], [...])`` float32 (float64 for float64 inputs), equal on every
    rank. Gradients reach ``hidden`` (``hidden_grad="sum"``: summed over the group; ``"local"``: this rank's
    vocabulary slice's share, for a caller whose next op's backward sums it), ``local_weight`` and
    ``local_bias``."""
    require_process_group()
    temperature = validate.temperature(temperature)
    if hidden_grad not in ("sum", "local"):
        raise ValueError(f"hidden_grad must be 'sum' or 'local', got {hidden_grad!r}")
    return _linear_logprobs_entropy(hidden, local_weight, labels, group, local_bias, temperature, vocab_start,
                                    chunk_size, None, "vocab_parallel_linear_logprobs_and_entropy",
                                    hidden_grad == "sum")


def vocab_parallel_ppo_loss_from_hidden(
    hidden: Tensor,
    local_weight: Tensor,
    labels: Tensor,
    old_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    local_bias: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    objective: PPOObjective | None = None,
    vocab_start: int | None = None,
    chunk_size: int | None = None,
    **settings: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``fastppo.ppo_loss_from_hidden`` over a vocabulary-split LM head: same objective settings and
    ``(loss, stats)``, plus ``group``, ``local_bias``, ``vocab_start``. ``hidden [B, T, H]``, per-token tensors
    ``[B, T]`` replicated. Masked tokens' hidden states may hold anything."""
    op = "vocab_parallel_ppo_loss_from_hidden"
    obj = objective_from(objective, settings, op)
    require_process_group()
    if obj.top_k > 0 or obj.top_p < 1.0:
        raise NotImplementedError(f"{op}: top_k/top_p over a vocabulary split across ranks is not implemented (the "
                                  "support needs a cross-rank selection); use the single-device ops")
    hidden = validate.float_tensor("hidden", hidden)
    ins = validate.ppo_inputs(op, hidden.shape[:-1], "hidden[..., 0]", hidden.device, old_logprobs, advantages,
                              mask, ref_logprobs, obj, rollout_logprobs=rollout_logprobs, on_policy_ok=True)
    logp, entropy = _linear_logprobs_entropy(hidden, local_weight, labels, group, local_bias, obj.temperature,
                                             vocab_start, chunk_size, ins.mask, op)
    return ppo_loss_from_logprobs(logp, entropy, ins.old, ins.adv, ins.mask, ref_logprobs=ins.ref,
                                  rollout_logprobs=ins.rollout, objective=obj)
