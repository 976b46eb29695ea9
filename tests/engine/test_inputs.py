"""Bad inputs on the local-model path fail before any model runs, with errors that say what is wrong."""

from __future__ import annotations

import json

import pytest
import torch

from fastppo.benchmarks.bench_e2e import build_tokenizer
from fastppo.engine.config import ConfigError
from fastppo.engine.experience import score_rollout
from fastppo.engine.rollout import Rollout
from fastppo.engine.trainer import PPOTrainer
from tests.engine.tiny import quiet, tiny_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A word-level tokenizer of 40 tokens and a tiny Llama with a 40-row embedding, saved in their own dirs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("local")
    tok = build_tokenizer(40)
    tok.save_pretrained(root / "tok")
    conf = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(conf).save_pretrained(root / "model")
    small = LlamaConfig(**{**conf.to_dict(), "vocab_size": 30})
    LlamaForCausalLM(small).save_pretrained(root / "small")
    return root


def _cfg(saved, prompts_file, **kw):
    base = dict(model=str(saved / "model"), tokenizer=str(saved / "tok"), task="prompts_file",
                prompts_file=str(prompts_file), reward_fn="fastppo.benchmarks.bench_e2e:length_reward", sft_steps=0)
    return tiny_config(**{**base, **kw})


def test_prompt_tokenizing_to_nothing(saved, tmp_path):
    pf = tmp_path / "p.jsonl"
    pf.write_text(json.dumps({"prompt": "1 2 ="}) + "\n" + json.dumps({"prompt": "   "}) + "\n")
    with pytest.raises(ConfigError, match=r"prompt 2 .* tokenizes to no token"):
        PPOTrainer(_cfg(saved, pf), tmp_path / "run", echo=quiet)


def test_tokenizer_larger_than_the_embedding(saved, tmp_path):
    pf = tmp_path / "p.txt"
    pf.write_text("1 2 =\n")
    with pytest.raises(ConfigError, match=r"tokenizer has 40 tokens but the model's embedding has 30 rows"):
        PPOTrainer(_cfg(saved, pf, model=str(saved / "small")), tmp_path / "run", echo=quiet)


def test_chat_messages_without_a_chat_template(saved, tmp_path):
    pf = tmp_path / "chat.jsonl"
    pf.write_text(json.dumps({"messages": [{"role": "user", "content": "1 2 ="}]}) + "\n")
    with pytest.raises(ConfigError, match=r"row 1 holds chat 'messages' but the tokenizer .* has no chat template"):
        PPOTrainer(_cfg(saved, pf), tmp_path / "run", echo=quiet)


@pytest.mark.parametrize("scores,match", [([1.0], r"returned \(1,\) scores for 2 responses"),
                                          ([1.0, float("nan")], "NaN/Inf")])
def test_reward_with_wrong_count_or_non_finite_scores(scores, match):
    tok = build_tokenizer(40)
    ro = Rollout(torch.tensor([[4, 5], [6, 7]]), torch.ones(2, 2, dtype=torch.long), torch.tensor([[8], [9]]),
                 torch.ones(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=match):
        score_rollout(ro, tok, lambda p, r: scores, tiny_config())
