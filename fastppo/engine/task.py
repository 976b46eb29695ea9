"""The embedded default task: reverse a string of digits.

Prompt ``"3 1 4 ="``, correct response ``"4 1 3"`` then EOS. The reward is verifiable from the prompt alone
(``reverse_reward``): the fraction of positions that are right, divided by the longer of the two lengths, so only
the exact answer scores 1.

Why it shows RL working in minutes on a CPU: the warm-up imitates *noisy* demonstrations (each digit replaced by a
random one with probability ``demo_noise``), so the warm-up policy is a decent but unreliable reverser. PPO against
the verifier, with a KL penalty to that warm-up model, then visibly sharpens it: the reward climbs while the KL
stays bounded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

DIGITS = [str(d) for d in range(10)]
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
SEP = "="


def make_tokenizer():
    """A word-level tokenizer over digits, '=' and the special tokens, built in code (no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + DIGITS + [SEP])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with single spaces
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        padding_side="left",
    )


def target_of(prompt: str) -> list[str]:
    """The verifier's answer for ``prompt``: its digits before '=', reversed."""
    return [t for t in prompt.split() if t in DIGITS][::-1]


def reverse_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Score in [0, 1] per response: matching positions / max(len(target), len(response))."""
    scores = []
    for prompt, resp in zip(prompts, responses, strict=False):
        want = target_of(prompt)
        got = resp.split()
        hits = sum(a == b for a, b in zip(want, got, strict=False))
        scores.append(hits / max(len(want), len(got), 1))
    return scores


def make_prompts(n: int, min_digits: int, max_digits: int, seed: int) -> list[str]:
    rng = np.random.default_rng([seed, 7])
    lengths = rng.integers(min_digits, max_digits + 1, size=n)
    return [" ".join(str(d) for d in rng.integers(0, 10, size=k)) + f" {SEP}" for k in lengths]


def make_demonstrations(prompts: list[str], noise: float, seed: int) -> list[str]:
    """Noisy demonstration responses: each reversed digit is replaced by a random digit with probability noise."""
    rng = np.random.default_rng([seed, 11])
    demos = []
    for p in prompts:
        out = [str(rng.integers(0, 10)) if rng.random() < noise else d for d in target_of(p)]
        demos.append(" ".join(out))
    return demos


def load_prompts_file(path: str) -> list[Any]:
    """Prompts of a .txt (one per line) or .jsonl file (a ``prompt`` string, or chat ``messages`` per row; the
    messages are returned as they are, for ``inputs.render_prompts`` to render with the chat template)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts_file {path!r} does not exist")
    if p.suffix == ".jsonl":
        prompts = []
        for i, line in enumerate(p.read_text().splitlines()):
            if line.strip():
                row = json.loads(line)
                if "messages" in row:
                    prompts.append(row["messages"])
                    continue
                if "prompt" not in row:
                    raise ValueError(f"{path}:{i + 1}: a jsonl prompts file needs a 'prompt' (or chat 'messages') "
                                     "field in every row")
                prompts.append(str(row["prompt"]))
    else:
        prompts = [line for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts_file {path!r} holds no prompts")
    return prompts


class PromptStream:
    """Prompts in a seeded order, reshuffled each epoch; its whole state is one integer (``position``).

    The order of epoch ``e`` is a pure function of ``(seed, e)``, so a resumed run reproduces it exactly.
    """

    def __init__(self, prompts: list[str], seed: int, position: int = 0) -> None:
        self.prompts = prompts
        self.seed = seed
        self.position = position
        self._epoch = -1
        self._order: np.ndarray | None = None

    def _order_for(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, 13, epoch]).permutation(len(self.prompts))
            self._epoch = epoch
        return self._order

    def take(self, n: int) -> list[str]:
        out = []
        for _ in range(n):
            epoch, idx = divmod(self.position, len(self.prompts))
            out.append(self.prompts[int(self._order_for(epoch)[idx])])
            self.position += 1
        return out


def sft_warmup(model, tokenizer, prompts: list[str], demos: list[str], steps: int, batch_size: int, lr: float,
               seed: int, device: torch.device, log=None) -> list[float]:
    """Supervised warm-up: next-token loss on the response tokens (+ EOS) of prompt/demonstration pairs."""
    if steps == 0:
        return []
    gen = torch.Generator().manual_seed(seed + 17)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    eos = tokenizer.eos_token_id
    enc_p = [tokenizer(p)["input_ids"] for p in prompts]
    enc_r = [tokenizer(r, add_special_tokens=False)["input_ids"] + [eos] for r in demos]
    losses = []
    model.train()
    for step in range(steps):
        idx = torch.randint(len(prompts), (batch_size,), generator=gen).tolist()
        seqs = [enc_p[i] + enc_r[i] for i in idx]
        width = max(len(s) for s in seqs)
        ids = torch.full((batch_size, width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        attn = torch.zeros((batch_size, width), dtype=torch.long)
        for row, i in enumerate(idx):
            s = enc_p[i] + enc_r[i]
            ids[row, : len(s)] = torch.tensor(s)
            attn[row, : len(s)] = 1
            labels[row, len(enc_p[i]): len(s)] = torch.tensor(enc_r[i])  # loss on the response only
        out = model(input_ids=ids.to(device), attention_mask=attn.to(device), labels=labels.to(device),
                    use_cache=False)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            losses.append(float(out.loss.detach()))
            if log is not None:
                log(step, losses[-1])
    model.eval()
    return losses
