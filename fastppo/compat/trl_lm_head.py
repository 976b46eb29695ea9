"""TRL GRPO's per-token log-probs and entropies on fastppo's fused LM head (``fastppo.compat.patch("trl")``).

GRPOTrainer computes every log-prob it uses (the policy's in the loss, the old and the reference log-probs) and the
entropies through one hook, which differs by version:

- TRL >= 1.14 projects the last hidden states through its own chunked LM head, an autograd function called as
  ``_ChunkedLogProbFunction.apply(hidden, weight, bias, labels, temperature, chunk_size, final_logit_softcapping,
  logit_scale[, outputs])`` (1.14 defines it in ``trl.trainer.utils`` and returns ``(log_probs, entropy)``; from
  1.15 it is ``trl.kernels.ChunkedLogProbFunction`` with an ``outputs`` tuple and five outputs; 1.12 / 1.13 have
  it too, 1.12 without ``bias``, for the experimental AsyncGRPOTrainer only). ``ChunkedLogProbFunction`` below
  takes the installed version's call and computes with ``fastppo.linear_logprobs_and_entropy`` (on CPU the C++
  row kernels), returning ``None`` for the outputs fastppo does not compute.
- TRL 1.12 / 1.13 build the ``[B, L, V]`` logits in ``GRPOTrainer._get_per_token_logps_and_entropies``.
  ``get_per_token_logps_and_entropies`` replaces that method: the same model call, but the LM head is handed only
  the last position (a forward pre-hook keeps its input, the final hidden states), and the log-probs and entropies
  of the completion positions come from those hidden states and the head's weight through the fused LM head.

Both hand the call back to TRL's own code, with one warning per cause, where fastppo would compute something
else: a soft-capped (``final_logit_softcapping``) or scaled (``logit_scale`` and its aliases) head, outputs
fastppo does not compute (``log_sum_sq_probs``, ``mean_logits``, ``is_top1``), a DeepSpeed ZeRO-3 partitioned
weight (its backward must gather it again), and on 1.12 / 1.13 also an LM head that is not a plain
``nn.Linear`` (LoRA-wrapped, quantized), multimodal inputs, or a model whose forward transforms the head's output
(checked once per model against the logits it returns).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

import fastppo

__all__ = ["ChunkedLogProbFunction", "get_per_token_logps_and_entropies", "trl_builds_logits"]

# TRL's per-token outputs besides the log-probs; fastppo computes the entropy only.
COMPUTED_OUTPUTS = ("log_probs", "entropy")
_TRL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")

_WARNED: set[str] = set()


def _fall_back(cause: str) -> None:
    """Warn once per cause (not per call: a trainer makes several calls per step)."""
    if cause not in _WARNED:
        _WARNED.add(cause)
        warnings.warn(f"fastppo.compat.patch('trl'): {cause}; TRL's own implementation computes it", stacklevel=3)


def _original(replacement: Any, module: str, attr: str) -> Any:
    """TRL's object that ``replacement`` stands in for: the one the patch swapped out, else (not patched) the
    module's own."""
    from fastppo.compat.patch import original_of

    found = original_of(replacement)
    if found is None:
        owner: Any = importlib.import_module(module)
        *path, last = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        found = vars(owner)[last] if isinstance(owner, type) else getattr(owner, last)
    if found is replacement:
        raise RuntimeError(f"fastppo.compat: cannot find TRL's own {module}.{attr} to fall back to")
    return found


def _head_cause(final_logit_softcapping: float | None, logit_scale: float | None) -> str | None:
    if final_logit_softcapping is not None:
        return "the LM head's logits are soft-capped (final_logit_softcapping), which fastppo does not compute"
    if logit_scale is not None and float(logit_scale) != 1.0:
        return "the LM head's logits are scaled (logit_scale != 1), which fastppo does not compute"
    return None


def _weight_cause(weight: Tensor) -> str | None:
    if hasattr(weight, "ds_id"):
        return "the LM head weight is partitioned by DeepSpeed ZeRO-3 (its backward must gather it again)"
    return None


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the LM head's matmul runs in: autocast's when it is on for the device (as ``F.linear`` would
    run), else the inputs'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def fused_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float,
                   with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """``(log_probs, entropy | None)`` float32 of ``softmax((hidden @ weight.T + bias) / temperature)`` at
    ``labels``, with the head's matmul in the dtype TRL's head runs it in (autocast's when on)."""
    dtype = _compute_dtype(hidden.device, hidden.dtype)
    h, w = hidden.to(dtype), weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    # fastppo's chunks call torch.mm themselves: autocast off, so they run in exactly the dtype chosen above
    with torch.autocast(hidden.device.type, enabled=False):
        if with_entropy:
            return fastppo.linear_logprobs_and_entropy(h, w, labels, bias=b, temperature=float(temperature))
        return fastppo.linear_logprobs(h, w, labels, bias=b, temperature=float(temperature)), None


# ------------------------------------------------------------------------------------ the chunked LM head
@functools.lru_cache(maxsize=8)
def _parameters(forward: Any) -> tuple[str, ...]:
    return tuple(inspect.signature(forward).parameters)[1:]  # after ctx


class ChunkedLogProbFunction:
    """Stands in for TRL's chunked LM head, ``trl.trainer.utils._ChunkedLogProbFunction``, with the call of the
    installed version:

    - 1.15+: ``apply(hidden, weight, bias, labels, temperature, chunk_size, final_logit_softcapping=None,
      logit_scale=1.0, outputs=...) -> (log_probs, entropy | None, None, None, None)`` (GRPO's head);
    - 1.14: the same without ``outputs`` ``-> (log_probs, entropy)`` (GRPO's head);
    - 1.12 / 1.13: the same without ``bias`` (1.12) ``-> (log_probs, entropy)`` (the experimental AsyncGRPOTrainer's
      head; their GRPOTrainer builds the logits, see ``get_per_token_logps_and_entropies``).

    Log-probs and entropies are float32 and differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    ``chunk_size`` (TRL's vocabulary tile) is not used: fastppo chunks over tokens with whole vocabulary rows.
    """

    @staticmethod
    def apply(*args: Any, **kwargs: Any) -> tuple[Tensor | None, ...]:
        orig = _original(ChunkedLogProbFunction, "trl.trainer.utils", "_ChunkedLogProbFunction")
        names = _parameters(orig.forward)
        bound = inspect.signature(orig.forward).bind(None, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        hidden, weight = a[names[0]], a[names[1]]
        bias = a["bias"] if "bias" in names else None
        labels = a[names[3] if "bias" in names else names[2]]
        with_outputs = "outputs" in names
        wanted = tuple(a["outputs"]) if with_outputs else COMPUTED_OUTPUTS
        cause = _head_cause(a.get("final_logit_softcapping"), a.get("logit_scale")) or _weight_cause(weight)
        extra = [o for o in wanted if o not in COMPUTED_OUTPUTS]
        if cause is None and extra:
            cause = f"outputs that fastppo does not compute were asked for ({', '.join(extra)})"
        if cause is not None:
            _fall_back(cause)
            return orig.apply(*args, **kwargs)
        log_probs, entropy = fused_logprobs(hidden, weight, bias, labels, a["temperature"], "entropy" in wanted)
        if not with_outputs:
            return log_probs, entropy
        return (log_probs, entropy, *(None for _ in _TRL_OUTPUTS[1:]))


# ------------------------------------------------------------------------------- TRL 1.12 / 1.13: the method
_METHOD_PARAMETERS = ("model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
                      "compute_aux_loss")


def trl_builds_logits() -> bool:
    """Whether the installed TRL's GRPO computes its log-probs from the ``[B, L, V]`` logits with the method this
    module replaces: TRL 1.12 / 1.13 (1.14 moved GRPO to its chunked LM head)."""
    from packaging.version import Version

    trl = importlib.import_module("trl")
    method = importlib.import_module("trl.trainer.grpo_trainer").GRPOTrainer._get_per_token_logps_and_entropies
    names = tuple(inspect.signature(method).parameters)[1: 1 + len(_METHOD_PARAMETERS)]
    return Version("1.12") <= Version(trl.__version__) < Version("1.14") and names == _METHOD_PARAMETERS


# Config fields by which transformers' models scale their logits after the head (TRL's own list).
_SCALE_FIELDS = ("logit_scale", "output_multiplier", "lm_head_multiplier")

# LM heads (by module) whose model returned exactly ``F.linear`` of the head's input: checked once per model.
_PLAIN_HEADS: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_TRANSFORMING_HEADS: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _config_cause(config: Any) -> str | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = next((getattr(text, f) for f in _SCALE_FIELDS if getattr(text, f, None) is not None), None)
    if scale is None and getattr(text, "logits_scaling", None) not in (None, 1, 1.0):
        scale = text.logits_scaling
    return _head_cause(getattr(text, "final_logit_softcapping", None), scale)


def _unwrap(trainer: Any, model: nn.Module) -> nn.Module:
    inner = trainer.accelerator.unwrap_model(model) if hasattr(trainer, "accelerator") else model
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


@contextmanager
def _last_position_head(head: nn.Module, kept: list[Tensor]) -> Iterator[None]:
    """While open, ``head`` keeps its input (the final hidden states) in ``kept`` and projects only the last
    position, so the model's forward never builds the ``[B, L, V]`` logits."""

    def pre_hook(_module: nn.Module, args: tuple) -> tuple:
        kept.append(args[0])
        return (args[0][..., -1:, :], *args[1:])

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


def get_per_token_logps_and_entropies(self: Any, model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                                      logits_to_keep: int, batch_size: int | None = None,
                                      compute_entropy: bool = False, compute_aux_loss: bool = False, *more: Any,
                                      **multimodal: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``GRPOTrainer._get_per_token_logps_and_entropies`` of TRL 1.12 / 1.13 on the fused LM head: per-token
    log-probs ``[B, logits_to_keep]`` of the completion tokens at ``self.temperature``, entropies (when asked;
    differentiable only with the entropy bonus on, as TRL's) and the MoE load-balancing loss (when asked), from the
    same model calls in rows of ``batch_size``."""
    orig = _original(get_per_token_logps_and_entropies, "trl.trainer.grpo_trainer",
                     "GRPOTrainer._get_per_token_logps_and_entropies")
    call = (self, model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
            *more)
    inner = _unwrap(self, model)
    head = inner.get_output_embeddings()
    cause = None
    if more or any(v is not None for v in multimodal.values()):
        cause = "multimodal inputs are computed by TRL's own method"
    elif type(head) is not nn.Linear:
        cause = f"the LM head is a {type(head).__name__}, not a plain nn.Linear (LoRA-wrapped or quantized)"
    elif head in _TRANSFORMING_HEADS:
        cause = "the model transforms its LM head's output"
    else:
        cause = _config_cause(inner.config) or _weight_cause(head.weight)
    if cause is not None:
        _fall_back(cause)
        return orig(*call, **multimodal)

    batch_size = batch_size or input_ids.size(0)
    keep_arg = "logits_to_keep" in getattr(self, "model_kwarg_keys", ())
    entropy_grad = bool(getattr(self, "_entropy_bonus_enabled", False))
    logps, entropies, aux_losses = [], [], []
    for start in range(0, input_ids.size(0), batch_size):
        ids, mask = input_ids[start: start + batch_size], attention_mask[start: start + batch_size]
        inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        if keep_arg:  # the head then sees the last logits_to_keep + 1 positions only
            inputs["logits_to_keep"] = logits_to_keep + 1
        if compute_aux_loss:
            inputs["output_router_logits"] = True
        kept: list[Tensor] = []
        with _last_position_head(head, kept):
            outputs = model(**inputs)
        if head not in _PLAIN_HEADS and not _returns_plain_logits(head, kept[0], outputs.logits):
            _TRANSFORMING_HEADS.add(head)
            _fall_back("the model transforms its LM head's output")
            return orig(*call, **multimodal)
        # hidden state t predicts token t + 1: drop the last position, keep the completion's
        hidden = kept[0][:, :-1][:, -logits_to_keep:]
        lp, ent = fused_logprobs(hidden, head.weight, head.bias, ids[:, -logits_to_keep:], self.temperature,
                                 compute_entropy)
        dtype = outputs.logits.dtype  # TRL returns the logits' dtype
        logps.append(lp.to(dtype))
        if compute_entropy:  # TRL's entropies carry a gradient only for the entropy bonus
            entropies.append((ent if entropy_grad else ent.detach()).to(dtype))
        if compute_aux_loss:
            aux_losses.append(outputs.aux_loss)
    return (torch.cat(logps, 0), torch.cat(entropies, 0) if compute_entropy else None,
            torch.stack(aux_losses).mean() if compute_aux_loss else None)


@torch.no_grad()
def _returns_plain_logits(head: nn.Module, hidden: Tensor, logits: Tensor | None) -> bool:
    """Whether the model returned the head's own output at the last position (no softcap, scale or other
    transform after the head); remembered per head once true."""
    if logits is None or logits.shape[-2] != 1:
        return False
    plain = torch.equal(logits, head(hidden[..., -1:, :]).to(logits.dtype))
    if plain:
        _PLAIN_HEADS.add(head)
    return plain
