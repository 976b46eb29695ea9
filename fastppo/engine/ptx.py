"""PPO-ptx (InstructGPT): the pretraining term. Every optimizer step adds ``ptx_coef x`` the mean next-token NLL of
a batch of pretraining texts to the PPO loss, so the policy keeps the ability the RL objective would erode.

Texts come from ``ptx_file`` (.txt lines, or .jsonl rows with a ``text`` field) or, for the built-in reverse task,
its demonstrations (prompt + demonstration + EOS). The batch of optimizer step ``i`` of PPO step ``s`` is a pure
function of ``(seed, s, i)``, so a resumed run draws the same batches. With ``ptx_coef=0`` nothing here runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

import fastppo
from fastppo.engine.config import ConfigError
from fastppo.engine.models import position_ids_from_mask
from fastppo.engine.streams import stream_seed


def load_texts(path: str) -> list[str]:
    p = Path(path)
    if p.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(p.read_text().splitlines()):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise ConfigError(f"{path}:{i + 1}: a jsonl ptx_file needs a 'text' string in every row")
                texts.append(row["text"])
    else:
        texts = [line for line in p.read_text().splitlines() if line.strip()]
    if not texts:
        raise ConfigError(f"ptx_file {path!r} holds no text")
    return texts


class PtxBatches:
    """Tokenized pretraining texts and the batch of each optimizer step: ``(input_ids, attention_mask)`` ``[n, L]``."""

    def __init__(self, texts: list[str], tokenizer, batch_size: int, seed: int, device: torch.device) -> None:
        eos = tokenizer.eos_token_id
        self.rows = [tokenizer(t)["input_ids"] + [eos] for t in texts]
        if any(len(r) < 2 for r in self.rows):
            raise ConfigError("every ptx text must tokenize to at least one token")
        self.pad = tokenizer.pad_token_id
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    def batch(self, step: int, update: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(stream_seed(self.seed, step, update, 0x7E7))
        idx = torch.randint(len(self.rows), (self.batch_size,), generator=gen).tolist()
        rows = [self.rows[i] for i in idx]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):  # left-padded like the prompts
            ids[j, width - len(r):] = torch.tensor(r)
            mask[j, width - len(r):] = 1
        return ids.to(self.device), mask.to(self.device)


def ptx_nll(lm: torch.nn.Module, ids: Tensor, mask: Tensor, backend: str) -> Tensor:
    """Mean next-token NLL over the valid tokens of ``ids [n, L]`` (through the fused log-prob op)."""
    out = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
    lp = fastppo.token_logprobs(out.logits[:, :-1], ids[:, 1:], backend=backend)
    valid = (mask[:, :-1] * mask[:, 1:]).float()
    return -(lp * valid).sum() / valid.sum()
