"""The fused LM head in the engine (config ``fused_lm_head``): logprobs, entropy and the PPO loss from the model
body's last hidden states and the ``lm_head`` weight, so the ``[B, L, V]`` logits of a forward never exist.

A causal LM's logits are ``lm_head(hidden_states[-1])`` (the final-normed last hidden state). The model is asked
for its hidden states and for the logits of one position only (``logits_to_keep=1``: generation's usual call),
then ``fastppo.linear_*`` / ``ppo_loss_from_hidden`` do the rest chunk by chunk. Models whose logits are more than
a linear map of that state (Gemma-2 soft-capping, Cohere's logit scale) or whose head is not a plain
``nn.Linear`` (a LoRA-adapted or sharded head) keep the full-logits path.
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


def last_hidden(lm: nn.Module, **kw) -> Tensor:
    """``[B, L, H]``: the head's input (the final-normed last hidden state) of a causal LM. A plain model runs its
    body only (no LM head at all); others run their forward with the logits of one position only."""
    from fastppo.engine.models import forward_keep

    body = body_of(lm)
    if body is not None:
        return body(**kw).last_hidden_state
    return forward_keep(lm, 1, output_hidden_states=True, **kw).hidden_states[-1]


def _on_valid_rows(fn, hid: Tensor, labels: Tensor, mask: Tensor | None) -> tuple[Tensor, ...]:
    """``fn(hidden [M, H], labels [M]) -> tuple of [M]`` over the valid (``mask``) response tokens only, scattered
    back to ``[B, R]`` with zeros at the others: padding after EOS costs no LM-head matmul (where the fused LM head
    skips it too: ``autograd_linear.valid_rows_on_cpu``); otherwise over every token."""
    from fastppo.autograd_linear import valid_rows_on_cpu

    keep = None if mask is None else valid_rows_on_cpu(mask)
    if keep is None:
        return fn(hid, labels)
    outs = fn(hid.reshape(-1, hid.shape[-1]).index_select(0, keep), labels.reshape(-1).index_select(0, keep))
    full = []
    for o in outs:
        t = o.new_zeros(labels.numel())
        t[keep] = o
        full.append(t.view(labels.shape))
    return tuple(full)


def policy_logprobs_entropy(policy: nn.Module, ids: Tensor, attn: Tensor, pos: Tensor, labels: Tensor, p: int,
                            cfg, values: bool = True, mask: Tensor | None = None
                            ) -> tuple[Tensor, Tensor, Tensor | None]:
    """One policy (``ValueModel``) forward: ``(logprobs [B, R], entropy [B, R], values [B, L] or None)``; with the
    response ``mask [B, R]``, 0 at masked tokens."""
    import fastppo
    from fastppo.engine.experience import response_slice

    head = lm_head_of(policy.lm) if cfg.fused_lm_head else None
    if head is None:  # logits of the response positions only (the LM head skips the prompt)
        logits, vals = policy(ids, attn, pos, keep=labels.shape[1] + 1, values=values)
        lp, ent = fastppo.logprobs_and_entropy(logits[:, :-1], labels, temperature=cfg.temperature,
                                               backend=cfg.backend)
    else:
        hid, vals = policy(ids, attn, pos, hidden_only=True, values=values)
        lp, ent = _on_valid_rows(
            lambda h, lab: fastppo.linear_logprobs_and_entropy(h, head.weight, lab, bias=head.bias,
                                                               temperature=cfg.temperature, backend=cfg.backend),
            response_slice(hid, p), labels, mask)
    return lp, ent, vals


def reference_logprobs(ref_lm: nn.Module, ids: Tensor, attn: Tensor, pos: Tensor, labels: Tensor, p: int,
                       cfg, mask: Tensor | None = None) -> Tensor:
    """The reference model's logprobs of the response ``[B, R]`` (one forward; with ``mask``, 0 at masked tokens)."""
    import fastppo
    from fastppo.engine.experience import response_slice
    from fastppo.engine.models import forward_keep

    kw = dict(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False)
    head = lm_head_of(ref_lm) if cfg.fused_lm_head else None
    if head is None:
        logits = forward_keep(ref_lm, labels.shape[1] + 1, **kw).logits
        return fastppo.token_logprobs(logits[:, :-1], labels, temperature=cfg.temperature, backend=cfg.backend)
    hid = last_hidden(ref_lm, **kw)
    return _on_valid_rows(
        lambda h, lab: (fastppo.linear_logprobs(h, head.weight, lab, bias=head.bias, temperature=cfg.temperature,
                                                backend=cfg.backend),),
        response_slice(hid, p), labels, mask)[0]
