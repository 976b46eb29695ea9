"""``fastppo train --model PATH --tokenizer TOKPATH`` on real model families saved locally: tiny Llama, Qwen2 (tied
embeddings, V=151936), Mistral and GPT-NeoX built from configs, each with its tokenizer in its own directory (a
word-level tokenizer built in code), one PPO step each over the variants: shared and separate critic, LoRA, a
reward model (a sequence classifier saved the same way), GRPO, and chat ``messages`` prompts rendered by the
tokenizer's chat template."""

from __future__ import annotations

import json

import pytest

from fastppo.benchmarks.bench_e2e import build_tokenizer
from fastppo.engine import cli

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}={% endif %}"
SMALL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


def _family(name: str, vocab: int):
    import transformers as tf

    if name == "llama":
        return tf.LlamaConfig(vocab_size=vocab, num_key_value_heads=2, **SMALL), tf.LlamaForCausalLM
    if name == "qwen2":
        return (tf.Qwen2Config(vocab_size=vocab, num_key_value_heads=2, tie_word_embeddings=True, **SMALL),
                tf.Qwen2ForCausalLM)
    if name == "mistral":
        return tf.MistralConfig(vocab_size=vocab, num_key_value_heads=1, **SMALL), tf.MistralForCausalLM
    return tf.GPTNeoXConfig(vocab_size=vocab, **SMALL), tf.GPTNeoXForCausalLM


CASES = [
    ("llama", 64, ["--critic", "separate", "--reward", "model"]),
    ("qwen2", 151936, ["--advantage_estimator", "grpo", "--samples_per_prompt", "2", "--kl_in_loss", "true",
                       "--chat"]),
    ("mistral", 64, ["--lora_r", "4", "--lora_target_modules", "q_proj,v_proj"]),
    ("gpt_neox", 64, []),
]


@pytest.mark.parametrize("family,vocab,extra", CASES, ids=[c[0] for c in CASES])
def test_train_a_step_from_local_paths(tmp_path, family, vocab, extra):
    import torch
    from transformers import AutoModelForSequenceClassification

    tok = build_tokenizer(vocab)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(tmp_path / "tok")
    conf, cls = _family(family, vocab)
    conf.pad_token_id, conf.eos_token_id = tok.pad_token_id, tok.eos_token_id
    torch.manual_seed(0)
    cls(conf).save_pretrained(tmp_path / "model")
    extra = list(extra)
    if "--chat" in extra:
        extra.remove("--chat")
        rows = [{"messages": [{"role": "user", "content": f"{i} {i + 1}"}]} for i in range(8)]
    else:
        rows = [{"prompt": f"{i} {i + 1} ="} for i in range(8)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    if "model" in extra:  # the reward model: a sequence classifier with its tokenizer, saved the same way
        rconf, _ = _family(family, vocab)
        rconf.num_labels, rconf.pad_token_id = 1, tok.pad_token_id
        AutoModelForSequenceClassification.from_config(rconf).save_pretrained(tmp_path / "rm")
        tok.save_pretrained(tmp_path / "rm")
        extra += ["--reward_model", str(tmp_path / "rm")]
    else:
        extra += ["--reward_fn", "fastppo.benchmarks.bench_e2e:length_reward"]
    run = tmp_path / "run"
    argv = ["--model", str(tmp_path / "model"), "--tokenizer", str(tmp_path / "tok"), "--task", "prompts_file",
            "--prompts_file", str(tmp_path / "prompts.jsonl"), "--total_steps", "1", "--batch_size", "4",
            "--mini_batch_size", "4", "--micro_batch_size", "4", "--forward_batch_size", "4", "--max_new_tokens", "3",
            "--sft_steps", "0", "--num_samples", "1", "--progress", "false", "--tensorboard", "false",
            "--plot", "false", "--output_dir", str(run), "--device", "cpu", *extra]
    assert cli.main(argv) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert lines and all(v == v for v in lines[-1].values() if isinstance(v, float))  # one step, no NaN
