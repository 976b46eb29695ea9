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

import fastppo
from fastppo.engine.lm_head import body_of, lm_head_of
from fastppo.engine.models import cache_kwarg, position_ids_from_mask
from fastppo.engine.streams import token_seeds

# Checking "all sequences finished?" costs a host sync on a GPU; doing it every few tokens keeps the loop mostly
# async at the price of at most this many wasted decode steps. On CPU the check is free and runs every step.
_EOS_CHECK_EVERY = 4


@dataclass
class Rollout:
    prompt_ids: Tensor  # [B, P] left-padded
    prompt_mask: Tensor  # [B, P] 1 = real prompt token
    response_ids: Tensor  # [B, R] pad after EOS
    response_mask: Tensor  # [B, R] 1 = generated token (EOS included)
    logprobs: Tensor | None = None  # [B, R] float32: the sampler's log-prob of each token (when recorded)

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def select(self, idx: Tensor) -> Rollout:
        return Rollout(self.prompt_ids[idx], self.prompt_mask[idx], self.response_ids[idx], self.response_mask[idx],
                       None if self.logprobs is None else self.logprobs[idx])


def sample_next(logits: Tensor, temperature: float, top_k: int, top_p: float, greedy: bool,
                generator: torch.Generator | None = None, seeds: Tensor | None = None) -> Tensor:
    """One token per row from ``logits [B, V]``. ``[B]`` int64.

    Greedy: argmax. Else the fused ``fastppo.sample_tokens`` (temperature, top-k, top-p and an inverse-CDF draw in
    one pass over each row, no probabilities materialised). ``seeds [B]`` (int64, one per row): each row's draw
    depends on its own seed only (one uniform per row, ``fastppo.engine.streams.seed_to_uniform``), so a sample's
    tokens do not depend on the batch it is generated in; else one seed per row is drawn from ``generator``.
    """
    if greedy:
        return logits.argmax(-1)
    return fastppo.sample_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds,
                                 generator=generator)


class LastLogits:
    """``[B, V]`` logits of the last position of each forward of a sampling loop.

    A plain transformers causal LM whose logits are a linear map of its body's last hidden state (``lm_head_of``):
    run the body (``lm.base_model``, final norm included) and compute the head as ``W @ h.T`` then transpose. At
    decode shapes (``[B, H] x [H, V]`` with B in the tens) MKL runs that orientation about twice as fast as the
    ``h @ W.T`` of ``nn.Linear`` (measured on the project's 2-core CPU at B=32, H=256, V=151936: 34 vs 76 ms per
    step, the largest cost of generation at that vocabulary). Other models (PEFT-wrapped, soft-capped heads,
    models without ``logits_to_keep``) use their own forward, asking for the last position's logits only.
    """

    def __init__(self, lm: torch.nn.Module) -> None:
        self.lm = lm
        self.body = body_of(lm)
        self.head = lm_head_of(lm) if self.body is not None else None
        self.model = self.body if self.body is not None else lm
        self.cache_kw = cache_kwarg(self.model)
        self.last_only = True

    def __call__(self, cache: object | None, **kw) -> Tensor:
        if cache is not None:
            kw[self.cache_kw] = cache
        if self.body is not None:
            h = self.body(**kw).last_hidden_state[:, -1]  # [B, H]
            w = self.head.weight
            x = torch.mm(w, h.t()) if self.head.bias is None else torch.addmm(self.head.bias[:, None], w, h.t())
            return x.t().contiguous()
        if self.last_only:
            try:
                return self.lm(logits_to_keep=1, **kw).logits[:, -1]
            except TypeError as exc:
                if "logits_to_keep" not in str(exc):
                    raise
                self.last_only = False  # a model without it: full logits, the last position taken
        return self.lm(**kw).logits[:, -1]


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
    record_logprobs: bool = False,
) -> Rollout:
    """Sample up to ``max_new_tokens`` per left-padded prompt ``[B, P]``; returns a ``Rollout``.

    ``cache="dynamic"`` grows the KV cache step by step; ``"static"`` preallocates ``P + max_new_tokens`` slots
    (fixed shapes, friendlier to torch.compile / CUDA graphs). ``use_cache=False`` recomputes the whole prefix
    each step (the slow path the cached loop must equal). ``seeds [B]`` (int64, see ``fastppo.engine.streams``):
    per-sample random streams, token ``t`` of row ``b`` drawn with ``token_seeds(seeds, t)[b]``.
    ``record_logprobs``: keep the sampler's log-prob of each token (``log_softmax(logits / temperature)`` of the
    decode step's logits: what rollout correction compares the trainer's log-probs with).
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
    last_logits = LastLogits(lm)
    finished = torch.zeros(b, dtype=torch.bool, device=dev)
    tokens: list[Tensor] = []
    alive: list[Tensor] = []
    sampled_lp: list[Tensor] = []
    step_ids, step_pos = prompt_ids, pos
    for t in range(max_new_tokens):
        logits = last_logits(kv, input_ids=step_ids, attention_mask=attn, position_ids=step_pos, use_cache=use_cache)
        nxt = sample_next(logits, temperature, top_k, top_p, greedy, generator,
                          None if seeds is None else token_seeds(seeds, t))
        valid = ~finished
        nxt = torch.where(valid, nxt, torch.full_like(nxt, pad_token_id))
        if record_logprobs:
            sampled_lp.append(fastppo.token_logprobs(logits, nxt, temperature=temperature, top_k=top_k, top_p=top_p,
                                                     mask=valid))  # a retired row's pad token: 0
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
        if (dev.type == "cpu" or (t + 1) % _EOS_CHECK_EVERY == 0) and t + 1 < max_new_tokens \
                and bool(finished.all()):
            break
    resp = torch.stack(tokens, dim=1)
    mask = torch.stack(alive, dim=1)
    width = int(mask.sum(1).max())  # one sync: trim columns no sequence uses
    logprobs = torch.stack(sampled_lp, dim=1)[:, :width] if record_logprobs else None
    return Rollout(prompt_ids, prompt_mask.long(), resp[:, :width], mask[:, :width].long(), logprobs)
