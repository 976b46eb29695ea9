"""Vocabulary-parallel log-probs, entropy and PPO loss: the LM head's output is split over the vocabulary across the
ranks of a process group (tensor-parallel LM head), each rank holding ``local_logits [..., V_r]`` for its slice
``[vocab_start_r, vocab_start_r + V_r)`` of the vocabulary; the slices need not be equal.

Forward, per row, with ``z = logits / T``: each rank computes its slice's max ``m_r`` and partial sums relative
to it; one all-reduce (MAX) gives the row max ``m``, then ONE all-reduce (SUM) of a packed ``[4, N]`` tensor
holding the partials rescaled by ``exp(m_r - m)``:

  S = sum_j exp(z_j - m)            (softmax denominator)
  U = sum_j exp(z_j - m) * z_j      (for the entropy: H = m + log S - U / S)
  y = z_label on the rank that owns the label, else 0
  o = 1 on the rank that owns the label, else 0   (exactly one owner per row: a free range check on the labels)

so every rank ends with the same ``logp = y - m - log S`` and ``H``. The backward is local: with
``p_j = exp(z_j - m) / S`` and ``E = U / S`` (saved per row),

  dlogp/dz_j = [j == label] - p_j,     dH/dz_j = -p_j (z_j - E),

which needs no communication because every rank receives the same upstream gradients (the loss built on ``logp``
and ``H`` is computed identically on every rank, as in any tensor-parallel model). Results equal the single-process
ops on the concatenated logits (tests: 2 and 3 ranks, a vocabulary that does not divide evenly).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fastppo import _validate as validate
from fastppo.objective import PPOObjective, objective_from
from fastppo.reference.losses import ppo_loss_from_logprobs


def vocab_start_of(local_vocab: int, group: dist.ProcessGroup | None = None) -> int:
    """Where this rank's slice starts in the global vocabulary: the sizes of the lower ranks' slices summed (one
    small all-gather; pass ``vocab_start=`` to the ops to skip it when the layout is known)."""
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([local_vocab], dtype=torch.int64), group=group)
    return int(sum(int(s) for s in sizes[: dist.get_rank(group)]))


def _collective_device(t: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    # gloo reduces CPU tensors only; NCCL wants them on the GPU. Moving is a no-op when the device already fits.
    if dist.get_backend(group) == "gloo" and t.device.type != "cpu":
        return t.cpu()
    return t


def all_reduce_copy(t: Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> Tensor:
    buf = _collective_device(t, group)
    buf = buf.clone() if buf is t else buf  # all_reduce works in place: never on the caller's tensor
    dist.all_reduce(buf, op=op, group=group)
    return buf.to(t.device)


def local_partials(z: Tensor, idx: Tensor, owned: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """This rank's row statistics of ``z [C, V_r]`` (logits / T): ``(local max, sum exp(z - max),
    sum exp(z - max) * z, label logit or 0)``, each ``[C]``. A row whose slice is all -inf gives ``(-inf, 0, 0, 0)``."""
    m = z.amax(-1)
    e = torch.exp(z - torch.where(torch.isfinite(m), m, torch.zeros_like(m))[:, None])
    # exp(-inf) = 0 would meet z = -inf in e * z: a masked vocabulary entry contributes nothing
    ez = torch.where(e > 0, e * z, torch.zeros_like(e))
    y = torch.where(owned, z.gather(-1, idx[:, None]).squeeze(-1), torch.zeros_like(m))
    return m, e.sum(-1), ez.sum(-1), y


def combine_partials(m_local: Tensor, s_local: Tensor, u_local: Tensor, y: Tensor, owned: Tensor,
                     group: dist.ProcessGroup | None, *, op: str, temperature: float, source: str = "logits",
                     valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Global row statistics from every rank's partials, in two collectives: the max, then one packed sum of the
    rescaled partials. Returns ``(max m, log S, E_p[z], label logit)``, each ``[N]``, equal on every rank. A
    non-finite row max is an error (``op`` and ``source`` name the caller and its inputs) except at rows where
    ``valid`` is 0."""
    m = all_reduce_copy(m_local, dist.ReduceOp.MAX, group)
    validate.finite_rows(op, m, valid=valid, temperature=temperature, source=source)
    scale = torch.where(torch.isfinite(m_local), torch.exp(m_local - m), torch.zeros_like(m))
    packed = torch.stack([s_local * scale, u_local * scale, y, owned.to(m.dtype)])  # [4, N]: one collective
    s, u, y, owners = all_reduce_copy(packed, dist.ReduceOp.SUM, group).unbind(0)
    validate.check_value((owners == 1).all(), f"{op}: labels out of range: every label must lie in [0, V) of the "
                                              "global vocabulary (no rank owns some of them)")
    return m, torch.log(s), u / s, y


def scaled_logits(logits: Tensor, temperature: float, valid: Tensor | None) -> Tensor:
    """``logits / T`` in float32 (float64 for float64 logits) ``[C, V_r]``; rows where ``valid`` is 0 are zeros
    (a masked token's logits may hold anything, and must reach neither the statistics nor the gradient)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if valid is not None:
        z = torch.where((valid != 0).unsqueeze(-1), z, torch.zeros_like(z))
    return z


def local_label_index(labels: Tensor, vocab_start: int, local_vocab: int) -> tuple[Tensor, Tensor]:
    """``(index into this rank's slice (0 where not owned), owned)`` for global ``labels [N]``."""
    local = labels.long() - vocab_start
    owned = (local >= 0) & (local < local_vocab)
    return torch.where(owned, local, torch.zeros_like(local)), owned


def dlogits_local(z: Tensor, m: Tensor, log_s: Tensor, expect: Tensor, idx: Tensor, owned: Tensor, dlogp: Tensor,
                  dentropy: Tensor, temperature: float) -> Tensor:
    """Gradient w.r.t. this rank's logits ``[C, V_r]`` (the module docstring's formulas; no communication)."""
    p = torch.exp(z - (m + log_s)[:, None])
    dz_h = torch.where(p > 0, p * (z - expect[:, None]), torch.zeros_like(p))
    dz = -p * dlogp.to(p.dtype)[:, None] - dz_h * dentropy.to(p.dtype)[:, None]
    dz = dz.scatter_add(-1, idx[:, None], (dlogp.to(p.dtype) * owned.to(p.dtype))[:, None])
    return dz / temperature


class VocabParallelLogprobsEntropy(torch.autograd.Function):
    """``(local_logits [N, V_r], labels [N], ...) -> (logp [N], entropy [N])``; see the module docstring. ``valid``
    (``[N]`` or None): rows to compute; the others are zeroed first and not checked."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, vocab_start: int, temperature: float,
                group: dist.ProcessGroup | None, valid: Tensor | None, op: str) -> tuple[Tensor, Tensor]:
        z = scaled_logits(logits, temperature, valid)
        idx, owned = local_label_index(labels, vocab_start, z.shape[-1])
        m, log_s, expect, y = combine_partials(*local_partials(z, idx, owned), owned, group, op=op,
                                               temperature=temperature, valid=valid)
        logp = y - m - log_s  # float32 (float64 for float64 logits, as the reference)
        entropy = m + log_s - expect
        ctx.save_for_backward(logits, idx, owned, m, log_s, expect, valid)
        ctx.temperature = temperature
        return logp, entropy

    @staticmethod
    def backward(ctx, dlogp: Tensor, dentropy: Tensor):
        logits, idx, owned, m, log_s, expect, valid = ctx.saved_tensors
        t = ctx.temperature
        dz = dlogits_local(scaled_logits(logits, t, valid), m, log_s, expect, idx, owned, dlogp, dentropy, t)
        return dz.to(logits.dtype), None, None, None, None, None, None


def require_process_group() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel_* ops need an initialized torch.distributed process group")


def _logits_and_labels(local_logits: object, labels: object) -> tuple[Tensor, Tensor]:
    local_logits = validate.float_tensor("local_logits", local_logits)
    if local_logits.dim() < 1 or local_logits.shape[-1] == 0:
        raise ValueError(f"local_logits must have shape [..., V_r] with V_r >= 1, got {tuple(local_logits.shape)}")
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype in (torch.bool,):
        raise TypeError("labels must be an integer torch.Tensor of global token ids")
    if labels.shape != local_logits.shape[:-1]:
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {tuple(local_logits.shape[:-1])}")
    validate.same_device(local_logits=local_logits, labels=labels)
    return local_logits, labels


def _logprobs_entropy(local_logits: Tensor, labels: Tensor, group: dist.ProcessGroup | None, temperature: float,
                      vocab_start: int | None, valid: Tensor | None, op: str) -> tuple[Tensor, Tensor]:
    lead = local_logits.shape[:-1]
    if lead.numel() == 0:  # no rows: nothing to reduce (every rank sees the same empty batch)
        empty = local_logits.new_empty(lead, dtype=torch.promote_types(local_logits.dtype, torch.float32))
        return empty, empty.clone()
    if vocab_start is None:
        vocab_start = vocab_start_of(local_logits.shape[-1], group)
    flat = local_logits.reshape(-1, local_logits.shape[-1])
    logp, ent = VocabParallelLogprobsEntropy.apply(flat, labels.reshape(-1), int(vocab_start), temperature, group,
                                                   None if valid is None else valid.reshape(-1), op)
    return logp.view(lead), ent.view(lead)


def vocab_parallel_logprobs_and_entropy(
    local_logits: Tensor,
    labels: Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    temperature: float = 1.0,
    vocab_start: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Token log-probs and entropy over a vocabulary split across ``group``.

    ``local_logits [..., V_r]`` (this rank's vocabulary slice), ``labels [...]`` global token ids (the same on
    every rank) -> ``(logp [...], entropy [...])`` float32, equal on every rank. ``vocab_start``: where this rank's
    slice starts (default: the lower ranks' slice sizes summed, one small all-gather). Differentiable w.r.t.
    ``local_logits``; the backward is local. Two all-reduces per call (row max, then one packed sum).
    """
    require_process_group()
    local_logits, labels = _logits_and_labels(local_logits, labels)
    temperature = validate.temperature(temperature)
    return _logprobs_entropy(local_logits, labels, group, temperature, vocab_start, None,
                             "vocab_parallel_logprobs_and_entropy")


def vocab_parallel_ppo_loss(
    local_logits: Tensor,
    labels: Tensor,
    old_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    objective: PPOObjective | None = None,
    vocab_start: int | None = None,
    **settings: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``fastppo.ppo_loss_from_logits`` over a vocabulary split across ``group``: same objective settings
    (``objective`` and/or its fields as keywords), same loss and stats (equal on every rank), plus ``group`` and
    ``vocab_start``. ``local_logits [B, T, V_r]``, the per-token tensors ``[B, T]`` replicated on every rank.
    Gradient w.r.t. ``local_logits`` only (local backward). Masked tokens' logits may hold anything."""
    op = "vocab_parallel_ppo_loss"
    obj = objective_from(objective, settings, op)
    require_process_group()
    if obj.top_k > 0 or obj.top_p < 1.0:
        raise NotImplementedError(f"{op}: top_k/top_p over a vocabulary split across ranks is not implemented (the "
                                  "support needs a cross-rank selection); use the single-device ops")
    local_logits, labels = _logits_and_labels(local_logits, labels)
    ins = validate.ppo_inputs(op, local_logits.shape[:-1], "local_logits[..., 0]", local_logits.device, old_logprobs,
                              advantages, mask, ref_logprobs, obj, rollout_logprobs=rollout_logprobs,
                              on_policy_ok=True)
    logp, entropy = _logprobs_entropy(local_logits, labels, group, obj.temperature, vocab_start, ins.mask, op)
    return ppo_loss_from_logprobs(logp, entropy, ins.old, ins.adv, ins.mask, ref_logprobs=ins.ref,
                                  rollout_logprobs=ins.rollout, objective=obj)
