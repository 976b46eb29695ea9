"""Checks of the run's inputs against each other, before any model runs: every prompt tokenizes to at least one
token, the tokenizer fits the model's embedding, chat prompts have a chat template to render them. Each failure is a
``ConfigError`` that names the file / row / sizes at fault, instead of an error from inside the attention."""

from __future__ import annotations

from typing import Any

from torch import nn

from fastppo.engine.config import ConfigError


def render_prompts(rows: list[Any], tokenizer, source: str) -> list[str]:
    """Prompt strings from ``rows``: strings as they are, chat ``messages`` (a list of ``{role, content}``) rendered by
    the tokenizer's chat template with the generation prompt appended."""
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            out.append(row)
            continue
        if getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError(f"{source}: row {i + 1} holds chat 'messages' but the tokenizer "
                              f"({type(tokenizer).__name__}) has no chat template to render them; use a tokenizer "
                              "with one, or plain 'prompt' rows")
        if not isinstance(row, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in row):
            raise ConfigError(f"{source}: row {i + 1}: 'messages' must be a list of {{role, content}} objects")
        out.append(tokenizer.apply_chat_template(row, tokenize=False, add_generation_prompt=True))
    return out


def check_prompts_tokenize(prompts: list[str], tokenizer, source: str) -> None:
    """Raise when a prompt tokenizes to no token (the model would get a zero-length sequence)."""
    ids = tokenizer(prompts)["input_ids"]
    for i, row in enumerate(ids):
        if len(row) == 0:
            raise ConfigError(f"{source}: prompt {i + 1} ({prompts[i]!r}) tokenizes to no token; remove it or fix the "
                              "tokenizer")


def check_tokenizer_fits(tokenizer, lm: nn.Module, what: str = "model") -> None:
    """Raise when the tokenizer can produce ids the model's embedding has no row for."""
    emb = lm.get_input_embeddings()
    n_tok, n_emb = len(tokenizer), emb.num_embeddings
    if n_tok > n_emb:
        raise ConfigError(f"the tokenizer has {n_tok} tokens but the {what}'s embedding has {n_emb} rows: ids >= "
                          f"{n_emb} would index past it; use the model's own tokenizer or resize its embeddings")
