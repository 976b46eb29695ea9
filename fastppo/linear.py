"""Fused LM head: logprobs, entropy and the PPO loss straight from the model's last hidden states.

``hidden [..., H]`` (fp32/bf16/fp16, or fp64 on the reference path), ``weight [V, H]`` (the ``lm_head`` weight,
same dtype), optional ``bias [V]``, ``labels [...]`` integer in ``[0, V)``. The ``[..., V]`` logits are never
materialised: tokens are processed in chunks of ``chunk_size`` rows (default ``chunk_rows(V, H, dtype, device)``,
a function of those and a memory budget, never of the number of tokens), each chunk one matmul into a ``[C, V]``
buffer that the row kernels of ``backend`` read and overwrite with dlogits. Gradients reach ``hidden``,
``weight`` (a weight tied to the input embedding accumulates as usual) and ``bias``. Outputs are float32
(float64 for float64 inputs). See ``fastppo/autograd_linear.py`` for the algorithm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastppo import _validate as validate
from fastppo._contract import TERM as _T
from fastppo.autograd_linear import (
    LinearPPOLoss,
    NeedGrads,
    PrecomputedGrads,
    chunk_rows,
    linear_sequence_pass,
    sequence_groups,
    use_tiled,
    valid_rows_on_cpu,
)
from fastppo.objective import PPOObjective, objective_from
from fastppo.ops import _backend_for, _in_support, _masked
from fastppo.reference import masked_mean
from fastppo.reference.losses import agg_weights, entropy_agg, objective_agg, policy_stats, ppo_loss_from_logprobs
from fastppo.reference.objective import objective_terms, rollout_weights

__all__ = ["chunk_rows", "linear_logprobs", "linear_logprobs_and_entropy", "ppo_loss_from_hidden"]


def _inputs(hidden: object, weight: object, labels: object, bias: object | None, chunk_size: int | None,
            op: str) -> tuple[Tensor, Tensor, Tensor | None, Tensor, int | None]:
    """Validate; return ``(hidden [N, H], weight [V, H], bias [V] | None, labels [N] int64, chunk)``; ``chunk`` is
    None when the caller named none (``_chunk`` picks the default once the backend is known)."""
    hidden = validate.float_tensor("hidden", hidden)
    weight = validate.float_tensor("weight", weight)
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have shape [..., H] with H >= 1, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be [V, H] with V >= 1 (an lm_head weight), got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight is [V, H] = {tuple(weight.shape)} but hidden has H = {hidden.shape[-1]}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight must have one dtype, got {hidden.dtype} and {weight.dtype}")
    if bias is not None:
        bias = validate.float_tensor("bias", bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dtype.is_complex:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels has shape {tuple(labels.shape)} but hidden {tuple(hidden.shape)} needs "
                         f"{tuple(hidden.shape[:-1])}")
    validate.same_device(hidden=hidden, weight=weight, bias=bias, labels=labels)
    v = weight.shape[0]
    if labels.numel() > 0:
        validate.check_value(((labels >= 0) & (labels < v)).all(), f"{op}: labels out of range: every label must be in "
                      f"[0, {v})")
    chunk = None
    if chunk_size is not None:
        chunk = int(chunk_size)
        if chunk < 1:
            raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    h2 = hidden.reshape(-1, hidden.shape[-1])
    return h2, weight, bias, labels.reshape(-1).to(torch.int64).contiguous(), chunk


def _chunk(chunk: int | None, weight: Tensor, hidden: Tensor, backend: str) -> int:
    """The caller's chunk size, else the default for (V, H, dtype, device) on ``backend``."""
    if chunk is not None:
        return chunk
    return chunk_rows(weight.shape[0], weight.shape[1], hidden.dtype, hidden.device, backend=backend)


def _bias_arg(bias: Tensor | None, like: Tensor) -> Tensor:
    return bias if bias is not None else like.new_empty((0,))


def _lp_entropy(hidden, weight, labels, bias, temperature, backend, chunk_size, with_entropy, op, top_k, top_p,
                mask=None):
    lead = hidden.shape[:-1] if isinstance(hidden, Tensor) else None
    h, w, b, lab, chunk = _inputs(hidden, weight, labels, bias, chunk_size, op)
    temperature = validate.temperature(temperature)
    top_k, top_p = validate.support(top_k, top_p)
    if mask is not None:
        mask = validate.mask_tensor("mask", mask, lead)
    name = _backend_for(backend, h, "logprobs")
    chunk = _chunk(chunk, w, h, name)
    logp, ent, lse = torch.ops.fastppo.linear_logprobs(h, w, _bias_arg(b, h), lab, temperature, with_entropy, chunk,
                                                       name, top_k, top_p)
    if lse.numel() > 0:
        validate.finite_rows(op, lse.detach(), temperature=temperature, source="hidden")
        if top_k > 0 or top_p < 1.0:
            _in_support(op, logp, None if mask is None else mask.reshape(-1))
    if mask is not None:
        return _masked(logp.view(lead), mask), _masked(ent.view(lead) if with_entropy else None, mask)
    return logp.view(lead), (ent.view(lead) if with_entropy else None)


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    mask: Tensor | None = None,
    backend: str | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """``token_logprobs(hidden @ weight.T + bias, labels)`` without the logits (``top_k`` / ``top_p``: over the
    sampler's truncated support, and ``mask``, as ``token_logprobs``). ``[..., H], [V, H], [...] -> [...]``."""
    return _lp_entropy(hidden, weight, labels, bias, temperature, backend, chunk_size, False, "linear_logprobs",
                       top_k, top_p, mask)[0]


def linear_logprobs_and_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    mask: Tensor | None = None,
    backend: str | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``(logprobs, entropy)`` of ``softmax((hidden @ weight.T + bias) / T)`` (``top_k`` / ``top_p``: of the
    sampler's truncated distribution). ``-> ([...], [...])``."""
    return _lp_entropy(hidden, weight, labels, bias, temperature, backend, chunk_size, True,
                       "linear_logprobs_and_entropy", top_k, top_p, mask)


def ppo_loss_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    old_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    bias: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    objective: PPOObjective | None = None,
    backend: str | None = None,
    chunk_size: int | None = None,
    **settings: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``ppo_loss_from_logits(hidden @ weight.T + bias, labels, ...)`` without the logits: same objective settings
    (``objective`` and/or its fields as keywords), same ``(loss, stats)``. ``hidden [B, T, H]`` (any ``[..., H]`` for
    token-level settings with token-mean), ``weight [V, H]``, per-token tensors ``[B, T]``.

    A token-separable objective (``PPOObjective.token_separable``: token-level ratios, no mask built from the current
    log-probs) has its gradient computed during the forward, chunk by chunk (the loss is linear in its per-token
    terms), so the backward only scales it: three matmuls in all. Sequence-level ratios and the off-policy mask need
    a statistic of each sequence's log-probs first: on CPU, with whole sequences per chunk, each chunk's share of the
    loss is differentiated in the same pass (three matmuls); otherwise, and for the batch-wide entropy mask, the
    forward computes log-probs and entropies chunk by chunk, the loss follows in PyTorch, and the backward
    recomputes each chunk (four matmuls).

    ``old_logprobs=None``: the update is exactly on-policy (one epoch, one minibatch, the policy that sampled), so
    each token's old log-prob is its own log-prob from this forward, detached (ratio 1; TRL's convention when it has
    no old log-probs). No separate forward over the LM head is needed for them.
    """
    return ppo_loss_and_terms_from_hidden(hidden, weight, labels, old_logprobs, advantages, mask, bias=bias,
                                          ref_logprobs=ref_logprobs, rollout_logprobs=rollout_logprobs,
                                          objective=objective, backend=backend, chunk_size=chunk_size, **settings)[:2]


def ppo_loss_and_terms_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    old_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    bias: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    objective: PPOObjective | None = None,
    backend: str | None = None,
    chunk_size: int | None = None,
    **settings: Any,
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """``ppo_loss_from_hidden`` plus the detached per-token ``logprobs`` and ``entropy`` (``[...]``, zero at masked
    tokens) it computed on the way: the engine's on-policy update stores them as the experience's old log-probs."""
    op = "ppo_loss_from_hidden"
    obj = objective_from(objective, settings, op)
    lead = hidden.shape[:-1] if isinstance(hidden, Tensor) else None
    h, w, b, lab, chunk = _inputs(hidden, weight, labels, bias, chunk_size, op)
    ins = validate.ppo_inputs(op, lead, "hidden[..., 0]", h.device, old_logprobs, advantages, mask, ref_logprobs,
                              obj, rollout_logprobs=rollout_logprobs, on_policy_ok=True)
    mask = ins.mask
    name = _backend_for(backend, h, "ppo_loss")
    chunk = _chunk(chunk, w, h, name)
    if not obj.token_separable:
        return _non_separable_loss(h, w, b, lab, lead, ins, obj, name, chunk, op)
    vec_dtype = torch.promote_types(h.dtype, torch.float32)
    flat = lambda t: t.reshape(-1).to(vec_dtype).contiguous()  # noqa: E731
    m = mask.to(vec_dtype)
    wts = agg_weights(m, **objective_agg(obj))
    wts_h = wts if obj.entropy_agg is None else agg_weights(m, **entropy_agg(obj))
    is_weight, is_stats = None, {}
    if obj.rollout_is_level is not None:
        old_for_is = ins.old if ins.old is not None else _own_logprobs(h, w, b, lab, lead, obj, name, chunk)
        is_weight, is_stats = rollout_weights(old_for_is.to(vec_dtype), ins.rollout.to(vec_dtype), mask, obj)
    grad_on = torch.is_grad_enabled()
    need = [grad_on and t is not None and t.requires_grad for t in (h, w, b)]
    empty = h.new_empty((0,), dtype=vec_dtype)
    opt = lambda t: empty if t is None else flat(t)  # noqa: E731
    args = (h, w, _bias_arg(b, h), lab, opt(ins.old), flat(ins.adv), opt(ins.ref), flat(mask), flat(wts), flat(wts_h),
            opt(is_weight), obj.pack(), chunk, name, need)
    if torch.compiler.is_compiling() or not any(need):
        loss, terms = torch.ops.fastppo.linear_ppo_loss(*args)[:2]
    else:  # eager with gradients: the Function that lets autograd adopt dW instead of copying it
        loss, terms = LinearPPOLoss.apply(*args)
    row = lambda k: terms[_T[k]].view(lead)  # noqa: E731
    validate.finite_rows(op, row("lse").detach(), valid=mask, temperature=obj.temperature, source="hidden")
    if obj.top_k > 0 or obj.top_p < 1.0:
        _in_support(op, row("logp"), mask)
    with torch.no_grad():
        pg_loss = (wts * row("pg")).sum()
        logp = row("logp")
        old = logp if ins.old is None else ins.old.to(vec_dtype)
        stats = policy_stats(pg_loss, logp, old, row("ratio"), row("clipped"), row("dual_clipped"), mask)
        if ins.ref is not None:
            stats["kl"] = masked_mean(row("kl"), mask)
        stats["entropy"] = masked_mean(row("entropy"), mask)
        stats.update(is_stats)
        stats["loss"] = loss.detach()
    return loss, stats, {"logprobs": logp, "entropy": row("entropy")}


def _own_logprobs(h: Tensor, w: Tensor, b: Tensor | None, lab: Tensor, lead: torch.Size, obj: PPOObjective,
                  name: str, chunk: int) -> Tensor:
    """The current log-probs, detached (the old ones of an on-policy update that also corrects for the sampler)."""
    with torch.no_grad():
        logp, _, _ = torch.ops.fastppo.linear_logprobs(h, w, _bias_arg(b, h), lab, obj.temperature, False, chunk, name,
                                                       obj.top_k, obj.top_p)
    return logp.view(lead)


def _non_separable_loss(h: Tensor, w: Tensor, b: Tensor | None, lab: Tensor, lead: torch.Size,
                        ins: validate.PPOInputs, obj: PPOObjective, name: str, chunk: int, op: str
                        ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """A non-token-separable objective. Where its statistics stay inside each sequence and whole sequences fit a
    chunk (on CPU, eager, with gradients: ``_sequence_pass``), one pass of three matmuls. Else log-probs and entropies
    chunk by chunk (``fastppo::linear_logprobs``, whose backward recomputes each chunk: four matmuls), then the
    objective in PyTorch. On CPU only the valid tokens go through the LM head (as in the one-pass op)."""
    mask = ins.mask
    one_pass = _sequence_pass(h, w, b, lab, lead, ins, obj, name, chunk)
    grads = None
    if one_pass is not None:
        keep, logp_k, ent_k, lse_k, grads = one_pass
    else:
        keep = valid_rows_on_cpu(mask)
        hs, labs = (h, lab) if keep is None else (h.index_select(0, keep), lab.index_select(0, keep))
        logp_k, ent_k, lse_k = torch.ops.fastppo.linear_logprobs(hs, w, _bias_arg(b, h), labs, obj.temperature, True,
                                                                 chunk, name, obj.top_k, obj.top_p)
    valid_rows = None if keep is None else torch.ones_like(keep, dtype=torch.bool)
    validate.finite_rows(op, lse_k.detach(), valid=mask.reshape(-1) if keep is None else valid_rows,
                         temperature=obj.temperature, source="hidden")
    if obj.top_k > 0 or obj.top_p < 1.0:
        _in_support(op, logp_k, mask.reshape(-1) if keep is None else None)  # keep: valid rows only
    if keep is None:
        logp, ent = logp_k.view(lead), ent_k.view(lead)
    else:
        logp = logp_k.new_zeros(lead.numel()).index_put((keep,), logp_k).view(lead)
        ent = ent_k.new_zeros(lead.numel()).index_put((keep,), ent_k).view(lead)
    with torch.set_grad_enabled(torch.is_grad_enabled() and grads is None):
        loss, stats = ppo_loss_from_logprobs(logp, ent, ins.old, ins.adv, mask, ref_logprobs=ins.ref,
                                             rollout_logprobs=ins.rollout, objective=obj)
    if grads is not None:
        loss = PrecomputedGrads.apply(h, w, b, loss, grads)
    zero = torch.zeros_like(logp.detach())
    valid = mask != 0
    return loss, stats, {"logprobs": torch.where(valid, logp.detach(), zero),
                         "entropy": torch.where(valid, ent.detach(), zero)}


def _sequence_pass(h: Tensor, w: Tensor, b: Tensor | None, lab: Tensor, lead: torch.Size, ins: validate.PPOInputs,
                   obj: PPOObjective, name: str, chunk: int
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, list[Tensor]] | None:
    """``linear_sequence_pass`` for an objective whose statistics stay inside a sequence (the last dim of ``lead``):
    ``(keep [M], logp [M], entropy [M], lse [M], [dh [N, H], dW, db])`` of the valid rows ``keep``, the gradients of
    the loss computed on the way. None where the two-pass route is taken instead: no gradient wanted (the forward is
    one pass anyway), not CPU (finding the valid rows would sync a GPU), under ``torch.compile`` (the custom ops are
    what it traces), a batch-wide statistic (``top_entropy_quantile``), a sequence with more valid tokens than a
    chunk, or a per-token input that wants a gradient itself."""
    need = NeedGrads(*(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (h, w, b)))
    per_token = (ins.old, ins.adv, ins.ref, ins.rollout)
    if (not need.any() or h.device.type != "cpu" or torch.compiler.is_compiling() or obj.top_entropy_quantile < 1.0
            or len(lead) == 0 or lead[-1] == 0 or use_tiled(name, (obj.top_k, obj.top_p))
            or any(t is not None and t.requires_grad for t in per_token)):
        return None
    t_len = lead[-1]
    n_seq = lead.numel() // t_len
    m2 = ins.mask.reshape(n_seq, t_len)
    valid = m2 != 0
    groups = sequence_groups(valid.sum(-1).tolist(), chunk)
    if groups is None:
        return None
    keep = valid.reshape(-1).nonzero().squeeze(1)
    vec = torch.promote_types(h.dtype, torch.float32)

    def per_seq(t: Tensor | None) -> Tensor | None:  # masked tokens hold 0 whatever they held (as the reference)
        return None if t is None else torch.where(valid, t.reshape(n_seq, t_len).to(vec), 0.0)
    old, adv, ref, roll = (per_seq(t) for t in per_token)
    wts = agg_weights(m2.to(vec), **objective_agg(obj)).to(vec)
    wts_h = agg_weights(valid.to(vec), **entropy_agg(obj)).to(vec)  # the bonus counts valid tokens (entropy_mask)

    def group_loss(q0: int, q1: int, lp: Tensor, ent: Tensor) -> Tensor:
        """Sequences ``q0:q1``'s share of ``ppo_loss_from_logprobs``' loss (batch-wide aggregation weights)."""
        s = slice(q0, q1)
        mask_g = m2[s]
        old_g = lp.detach() if old is None else old[s]
        roll_g = None if roll is None else roll[s]
        is_w = None if obj.rollout_is_level is None else rollout_weights(old_g, roll_g, mask_g, obj)[0]
        terms = objective_terms(lp, ent, old_g, adv[s], mask_g, None if ref is None else ref[s], obj, is_weight=is_w,
                                sampler_logp=roll_g)
        loss = (wts[s] * terms["pg"]).sum()
        if ref is not None and obj.kl_coef != 0.0:
            loss = loss + obj.kl_coef * (wts[s] * terms["kl"]).sum()
        if obj.entropy_coef != 0.0:
            loss = loss - obj.entropy_coef * (wts_h[s] * ent).sum()
        return loss
    hs, labs = h.index_select(0, keep), lab.index_select(0, keep)
    logp, ent, lse, dh_k, dw, db = linear_sequence_pass(hs, w, b, labs, keep, t_len, groups, group_loss, obj, name,
                                                        need)
    dh = h.new_zeros(h.shape).index_copy_(0, keep, dh_k) if need.hidden else dh_k
    return keep, logp, ent, lse, [dh, dw, db]
