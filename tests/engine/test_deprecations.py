"""No deprecation notice from fastppo's own calls into transformers / torch during a training run.

transformers reports some deprecations through its logger (``warning_once``, printed once per process), others as
``FutureWarning``; both are collected here around a real (tiny) run: generation with both cache kinds, experience,
update, checkpoint, evaluation.
"""

from __future__ import annotations

import logging
import traceback
import warnings

import pytest
import torch

from fastppo.engine.models import build_causal_lm, build_tokenizer, cache_kwarg
from fastppo.engine.rollout import generate
from fastppo.engine.trainer import PPOTrainer
from tests.engine.tiny import quiet, tiny_config


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def notices():
    """Every deprecation that transformers logs, or that is warned, while the test body runs.

    A warning raised while some third-party module is being imported (accelerate imports deepspeed, when installed,
    from inside ``save_pretrained``) is that package's own business, not a call of ours, and is left out.
    """
    from transformers.utils import logging as hf_logging

    # warning_once remembers messages process-wide; forget them so an earlier test cannot hide one here
    hf_logging.warning_once.cache_clear()
    handler = _Collect()
    hf_root = logging.getLogger("transformers")
    hf_root.addHandler(handler)
    found: list[str] = []

    def record(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if not (issubclass(category, (DeprecationWarning, FutureWarning)) or "deprecat" in text.lower()):
            return
        if any(f.filename.startswith("<frozen importlib") for f in traceback.extract_stack()):
            return
        found.append(f"{category.__name__} {filename}:{lineno}: {text}")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        yield found
        found += [m for m in handler.messages if "deprecat" in m.lower()]
    hf_root.removeHandler(handler)


def test_generation_uses_the_current_cache_keyword(notices):
    cfg = tiny_config()
    tok = build_tokenizer(cfg)
    lm = build_causal_lm(cfg, tok).eval()
    enc = tok(["1 2 3 =", "4 ="], padding=True, return_tensors="pt")
    for cache in ("dynamic", "static"):
        generate(lm, enc["input_ids"], enc["attention_mask"], max_new_tokens=3, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id, cache=cache, generator=torch.Generator().manual_seed(0))
    assert cache_kwarg(lm) in ("cache", "past_key_values")
    assert notices == []


def test_a_training_run_triggers_no_deprecation(tmp_path, notices):
    cfg = tiny_config(total_steps=2, save_every=1, tensorboard=True, plot=True)
    PPOTrainer(cfg, tmp_path, echo=quiet).train()
    assert notices == []
