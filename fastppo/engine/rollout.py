"""The engine's own batched sampling loop over a KV cache.

Prompts are left-padded to a common width ``P``; positions are counted over valid tokens, so every prompt starts
at position 0 whatever its padding. Each step feeds only the newest token and the cache (transformers
``DynamicCache``), samples with temperature / top-k / top-p, and retires sequences at EOS. Tokens after a
sequence's EOS are ``pad`` with mask 0; the EOS itself is part of the response (mask 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastppo.engine.models import cache_kwarg, position_ids_from_mask
from fastppo.engine.streams import seed_to_uniform, token_seeds

# Checking "all sequences finished?" costs a host sync; doing it every few tokens keeps the loop mostly async at
# the price of at most this many wasted decode steps.
_EOS_CHECK_EVERY = 4


@dataclass
class Rollout:
    prompt_ids: Tensor  # [B, P] left-padded
    prompt_mask: Tensor  # [B, P] 1 = real prompt token
    response_ids: Tensor  # [B, R] pad after EOS
    response_mask: Tensor  # [B, R] 1 = generated token (EOS included)

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def select(self, idx: Tensor) -> Rollout:
        return Rollout(self.prompt_ids[idx], self.prompt_mask[idx], self.response_ids[idx], self.response_mask[idx])


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf. ``[B, V] -> [B, V]``; keeps >= 1 token."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (the first token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: Tensor, temperature: float, top_k: int, top_p: float, greedy: bool,
                generator: torch.Generator | None = None, seeds: Tensor | None = None) -> Tensor:
    """One token per row from ``logits [B, V]`` (float32). ``[B]`` int64.

    ``seeds [B]`` (int64, one per row): each row's draw depends on its own seed only (inverse CDF of one uniform
    per row), so a sample's tokens do not depend on the batch it is generated in; else ``torch.multinomial``.
    """
    if greedy:
        return logits.argmax(-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = logits.softmax(-1)
    if seeds is None:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    cum = probs.double().cumsum(-1)
    target = seed_to_uniform(seeds).to(cum.device)[:, None] * cum[:, -1:]
    idx = (cum < target).sum(-1)
    # rounding can put the target above the last cumulative value: take the last token with mass then
    last = torch.where(probs > 0, torch.arange(probs.shape[-1], device=probs.device), -1).amax(-1)
    return torch.minimum(idx, last)


@torch.no_grad()
def generate(
    lm: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    use_cache: bool = True,
    cache: str = "dynamic",
    generator: torch.Generator | None = None,
    seeds: Tensor | None = None,
) -> Rollout:
    """Sample up to ``max_new_tokens`` per left-padded prompt ``[B, P]``; returns a ``Rollout``.

    ``cache="dynamic"`` grows the KV cache step by step; ``"static"`` preallocates ``P + max_new_tokens`` slots
    (fixed shapes, friendlier to torch.compile / CUDA graphs). ``use_cache=False`` recomputes the whole prefix
    each step (the slow path the cached loop must equal). ``seeds [B]`` (int64, see ``fastppo.engine.streams``):
    per-sample random streams, token ``t`` of row ``b`` drawn with ``token_seeds(seeds, t)[b]``.
    """
    from transformers import DynamicCache, StaticCache

    if prompt_ids.dim() != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_ids/prompt_mask must both be [B, P], got {tuple(prompt_ids.shape)}, "
                         f"{tuple(prompt_mask.shape)}")
    b = prompt_ids.shape[0]
    dev = prompt_ids.device
    attn = prompt_mask.long()
    pos = position_ids_from_mask(attn)
    if cache not in ("dynamic", "static"):
        raise ValueError(f"cache must be 'dynamic' or 'static', got {cache!r}")
    kv = None
    if use_cache:
        kv = (DynamicCache(config=lm.config) if cache == "dynamic"
              else StaticCache(config=lm.config, max_cache_len=prompt_ids.shape[1] + max_new_tokens))
    cache_kw = {cache_kwarg(lm): kv} if use_cache else {}
    finished = torch.zeros(b, dtype=torch.bool, device=dev)
    tokens: list[Tensor] = []
    alive: list[Tensor] = []
    step_ids, step_pos = prompt_ids, pos
    for t in range(max_new_tokens):
        out = lm(input_ids=step_ids, attention_mask=attn, position_ids=step_pos, use_cache=use_cache, **cache_kw)
        logits = out.logits[:, -1, :].float()
        nxt = sample_next(logits, temperature, top_k, top_p, greedy, generator,
                          None if seeds is None else token_seeds(seeds, t))
        valid = ~finished
        nxt = torch.where(valid, nxt, torch.full_like(nxt, pad_token_id))
        tokens.append(nxt)
        alive.append(valid)
        finished = finished | (nxt == eos_token_id)
        # a retired row's pad token is masked out of attention, like the padding of the prompt
        attn = torch.cat([attn, valid.long()[:, None]], dim=1)
        new_pos = pos[:, -1:] + 1
        pos = torch.cat([pos, new_pos], dim=1)
        if use_cache:
            step_ids, step_pos = nxt[:, None], new_pos
        else:
            step_ids, step_pos = torch.cat([prompt_ids, torch.stack(tokens, 1)], dim=1), pos
        if (t + 1) % _EOS_CHECK_EVERY == 0 and t + 1 < max_new_tokens and bool(finished.all()):
            break
    resp = torch.stack(tokens, dim=1)
    mask = torch.stack(alive, dim=1)
    width = int(mask.sum(1).max())  # one sync: trim columns no sequence uses
    return Rollout(prompt_ids, prompt_mask.long(), resp[:, :width], mask[:, :width].long())
