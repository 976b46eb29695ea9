"""verl's fused-kernel path (``use_fused_kernels``) on fastppo's fused LM head (``fastppo.compat.patch("verl")``).

With ``actor_rollout_ref.model.use_fused_kernels=True`` verl's models return per-token log-probs and entropies from
the last hidden states and the LM-head weight instead of logits, through one of two functions that their forwards
import at call time:

- ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` (``fused_kernels_backend`` "torch" or "liger";
  HF models, ``verl.models.transformers.*.forward_with_torch_backend``): a module whose
  ``forward(hidden_states, vocab_weights, input_ids, temperature=1.0)`` returns float32 log-probs and entropies in
  the hidden states' dtype, shaped like ``input_ids`` (2-D or 3-D hidden states);
- ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy(hidden, weight, labels, temperature=1.0,
  reduction="none", dist_process_group=None)`` ("triton"; HF and Megatron models): float32 log-probs (``[N]``, or
  their sum / mean) and entropies ``[N]`` over the flattened tokens. With a process group (Megatron's tensor
  parallel group) ``weight`` is this rank's rows ``[rank * V_r, (rank + 1) * V_r)`` of the LM head, the outputs are
  over the whole vocabulary, and the hidden state's gradient is this rank's share (verl's callers sum it: the
  sequence-parallel gather's backward is a reduce-scatter).

verl's own versions need Triton and a CUDA device for the latter, and build each chunk's ``[chunk, V]`` logits in
several float32 copies for the former. The adapters below take the same calls and compute with
``fastppo.linear_logprobs_and_entropy`` (on CPU the C++ row kernels) or, with a process group,
``fastppo.distributed.vocab_parallel_linear_logprobs_and_entropy``; ``LinearCrossEntropy`` and
``FusedLinearForPPOFunction`` are the same behind verl's autograd-function names. An LM-head weight held as a
``DTensor`` (FSDP2) or partitioned by DeepSpeed ZeRO-3 is handed back to verl's own code, with one warning.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

import torch
from torch import Tensor, nn

import fastppo

__all__ = ["FusedLinearForPPO", "FusedLinearForPPOFunction", "LinearCrossEntropy", "linear_cross_entropy"]

_WARNED: set[str] = set()
_REDUCTIONS = ("none", "sum", "mean")


def _original(replacement: Any, module: str, attr: str) -> Any:
    from fastppo.compat.patch import original_of

    found = original_of(replacement)
    if found is None:
        found = getattr(importlib.import_module(module), attr)
    if found is replacement:
        raise RuntimeError(f"fastppo.compat: cannot find verl's own {module}.{attr} to fall back to")
    return found


def _fallback_cause(weight: Tensor) -> str | None:
    if type(weight).__name__ == "DTensor":
        return "the LM-head weight is a DTensor (FSDP2): verl's own implementation computes it"
    if hasattr(weight, "ds_id"):
        return "the LM-head weight is partitioned by DeepSpeed ZeRO-3: verl's own implementation computes it"
    return None


def _warn_once(cause: str) -> None:
    if cause not in _WARNED:
        _WARNED.add(cause)
        warnings.warn(f"fastppo.compat.patch('verl'): {cause}", stacklevel=3)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0,
                         reduction: str = "none",
                         dist_process_group: torch.distributed.ProcessGroup | None = None) -> tuple[Tensor, Tensor]:
    """verl's ``linear_cross_entropy``: ``(log_probs, entropy)`` float32 of ``softmax(hidden @ weight.T /
    temperature)``, log-probs at ``labels``; ``hidden [..., H]`` and ``labels [...]`` are flattened to ``[N]``
    outputs; ``reduction`` "sum" / "mean" reduces the log-probs to a scalar (entropies stay ``[N]``)."""
    if not isinstance(reduction, str) or reduction.lower() not in _REDUCTIONS:
        raise ValueError(f"Invalid reduction: {reduction}")
    cause = _fallback_cause(weight)
    if cause is not None:
        _warn_once(cause)
        orig = _original(linear_cross_entropy, "verl.utils.kernel.linear_cross_entropy", "linear_cross_entropy")
        return orig(hidden, weight, labels, temperature, reduction, dist_process_group)
    h = hidden.reshape(-1, hidden.shape[-1])
    lab = labels.reshape(-1)
    if dist_process_group is None:
        logp, ent = fastppo.linear_logprobs_and_entropy(h, weight, lab, temperature=float(temperature))
    else:
        from fastppo.distributed import vocab_parallel_linear_logprobs_and_entropy

        # verl's kernels split the vocabulary evenly by rank and leave the hidden gradient unsummed
        start = torch.distributed.get_rank(dist_process_group) * weight.shape[0]
        logp, ent = vocab_parallel_linear_logprobs_and_entropy(h, weight, lab, dist_process_group,
                                                               temperature=float(temperature), vocab_start=start,
                                                               hidden_grad="local")
    if reduction.lower() == "sum":
        logp = logp.sum()
    elif reduction.lower() == "mean":
        logp = logp.mean()
    return logp, ent


class LinearCrossEntropy:
    """verl's ``LinearCrossEntropy`` autograd function: ``apply(...)`` is ``linear_cross_entropy(...)``."""

    @staticmethod
    def apply(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0, reduction: str = "none",
              dist_process_group: torch.distributed.ProcessGroup | None = None) -> tuple[Tensor, Tensor]:
        return linear_cross_entropy(hidden, weight, labels, temperature, reduction, dist_process_group)


def _fused_linear_for_ppo(hidden_states: Tensor, vocab_weights: Tensor, input_ids: Tensor, temperature: float,
                          chunk_size: int | None) -> tuple[Tensor, Tensor]:
    if hidden_states.ndim not in (2, 3):
        raise ValueError(f"hidden_states must be 2D or 3D, got shape {tuple(hidden_states.shape)}")
    if input_ids.shape != hidden_states.shape[:-1]:
        raise ValueError(f"input_ids shape {tuple(input_ids.shape)} must match hidden_states shape "
                         f"{tuple(hidden_states.shape[:-1])}")
    logp, ent = fastppo.linear_logprobs_and_entropy(hidden_states, vocab_weights, input_ids.to(torch.int64),
                                                    temperature=float(temperature), chunk_size=chunk_size)
    return logp, ent.to(hidden_states.dtype)  # verl returns the entropy in the hidden states' dtype


class FusedLinearForPPOFunction:
    """verl's ``FusedLinearForPPOFunction``: ``apply(hidden_states [B, T, H] | [N, H], vocab_weights [V, H],
    input_ids, temperature=1.0, chunk_size=512) -> (log_probs float32, entropy)``; ``chunk_size`` tokens per chunk,
    as verl's."""

    @staticmethod
    def apply(hidden_states: Tensor, vocab_weights: Tensor, input_ids: Tensor, temperature: float = 1.0,
              chunk_size: int = 512) -> tuple[Tensor, Tensor]:
        cause = _fallback_cause(vocab_weights)
        if cause is not None:
            _warn_once(cause)
            orig = _original(FusedLinearForPPOFunction, "verl.utils.experimental.torch_functional",
                             "FusedLinearForPPOFunction")
            return orig.apply(hidden_states, vocab_weights, input_ids, temperature, chunk_size)
        return _fused_linear_for_ppo(hidden_states, vocab_weights, input_ids, temperature, chunk_size)


class FusedLinearForPPO(nn.Module):
    """verl's ``FusedLinearForPPO(chunk_size=512, impl_backend="torch" | "liger")``: both backends compute on
    fastppo's fused LM head (the same log-probs and entropies), ``chunk_size`` tokens at a time."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch") -> None:
        super().__init__()
        if impl_backend not in ("torch", "liger"):
            raise ValueError(f"Unsupported FusedLinearForPPO backend: {impl_backend}. Choose 'torch' or 'liger'.")
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend

    def forward(self, hidden_states: Tensor, vocab_weights: Tensor, input_ids: Tensor,
                temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        cause = _fallback_cause(vocab_weights)
        if cause is not None:
            _warn_once(cause)
            orig = _original(FusedLinearForPPO, "verl.utils.experimental.torch_functional", "FusedLinearForPPO")
            return orig(self.chunk_size, self.impl_backend)(hidden_states, vocab_weights, input_ids, temperature)
        return _fused_linear_for_ppo(hidden_states, vocab_weights, input_ids, temperature, self.chunk_size)
