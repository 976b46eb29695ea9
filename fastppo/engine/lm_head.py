"""Where a causal LM's head and its input are, for the fused LM head in the engine (config ``fused_lm_head``):
logprobs, entropy and the PPO loss from the model body's last hidden states and the ``lm_head`` weight, so the
``[B, L, V]`` logits of a forward never exist; and forwards that compute the logits of the last positions only.

A causal LM's logits are ``lm_head(hidden_states[-1])`` (the final-normed last hidden state). The model is asked
for its hidden states and for the logits of one position only (``logits_to_keep=1``: generation's usual call),
then ``fastppo.linear_*`` / ``ppo_loss_from_hidden`` do the rest chunk by chunk (called by the experience pass and
the trainer's update). Models whose logits are more than a linear map of that state (Gemma-2 soft-capping,
Cohere's logit scale) or whose head is not a plain ``nn.Linear`` (a LoRA-adapted or sharded head) keep the
full-logits path.

This module imports no other engine module: models, rollout and experience build on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class LMHead:
    """The output projection of a causal LM: ``logits = hidden @ weight.T + bias``."""

    weight: Tensor  # [V, H]
    bias: Tensor | None  # [V]


def _base(lm: nn.Module) -> nn.Module:
    if hasattr(lm, "_policy"):  # AdapterDisabledReference: the LoRA policy's base weights
        lm = lm._policy[0]
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def lm_head_of(lm: nn.Module) -> LMHead | None:
    """The LM head of ``lm`` when its logits are exactly ``hidden_states[-1] @ W.T (+ b)``, else None."""
    base = _base(lm)
    cfg = getattr(base, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return None
    if not hasattr(base, "get_output_embeddings"):
        return None
    head = base.get_output_embeddings()
    if type(head) is not nn.Linear or type(head.weight.data) is not Tensor:
        return None  # adapted (LoRA) or distributed (DTensor) heads: the full-logits path handles them
    return LMHead(head.weight, head.bias)


def body_of(lm: nn.Module) -> nn.Module | None:
    """The decoder body of a plain transformers causal LM with a linear head (``lm.base_model``: embeddings, layers,
    final norm), whose ``last_hidden_state`` is the head's input; None for wrapped models (PEFT adapters, the
    LoRA reference, FSDP-sharded heads), which go through their own forward."""
    if hasattr(lm, "get_base_model") or hasattr(lm, "_policy") or lm_head_of(lm) is None or _fsdp_managed(lm):
        return None
    body = getattr(lm, "base_model", None)
    return body if isinstance(body, nn.Module) and body is not lm else None


def _fsdp_managed(lm: nn.Module) -> bool:
    """FSDP2 runs its hooks from the root module's forward first: a sharded model must be called as a whole."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2 cannot have sharded it
        return False
    return any(isinstance(m, FSDPModule) for m in lm.modules())


def forward_keep(lm: nn.Module, keep: int, **kw):
    """``lm(**kw)`` with logits for the last ``keep`` positions only (``logits_to_keep``; all when 0). A model whose
    forward does not take ``logits_to_keep`` computes them all and the result is sliced."""
    if keep <= 0:
        return lm(**kw)
    try:
        return lm(logits_to_keep=keep, **kw)
    except TypeError as exc:
        if "logits_to_keep" not in str(exc):
            raise
    out = lm(**kw)
    out.logits = out.logits[:, -keep:]
    return out


def last_hidden(lm: nn.Module, **kw) -> Tensor:
    """``[B, L, H]``: the head's input (the final-normed last hidden state) of a causal LM. A plain model runs its
    body only (no LM head at all); others run their forward with the logits of one position only."""
    body = body_of(lm)
    if body is not None:
        return body(**kw).last_hidden_state
    return forward_keep(lm, 1, output_hidden_states=True, **kw).hidden_states[-1]
