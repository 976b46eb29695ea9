"""What the engine tests share: a tiny configuration (a 1-layer 16-wide Llama, 8 rollouts per step, seconds per
run), a silent ``echo`` for the trainer and a run's metrics without its wall-clock fields."""

from __future__ import annotations

import json
from pathlib import Path

from fastppo.engine.config import PPOConfig

TINY = dict(
    total_steps=3, batch_size=8, mini_batch_size=4, micro_batch_size=2, forward_batch_size=8, max_new_tokens=4,
    tiny_hidden_size=16, tiny_layers=1, tiny_heads=2, tiny_intermediate_size=32, task_num_prompts=64,
    task_min_digits=2, task_max_digits=4, sft_steps=5, sft_batch_size=8, eval_prompts=8, num_samples=2,
    save_every=0, progress=False, tensorboard=False, plot=False, torch_threads=1, device="cpu",
)

# what differs between two otherwise identical runs: the wall clock
TIMING_KEYS = ("tokens_per_s", "time_generation", "time_experience", "time_update", "time_step")


def tiny_config(**overrides) -> PPOConfig:
    return PPOConfig(**{**TINY, **overrides}).validate()


def quiet(*_args, **_kwargs) -> None:
    """An ``echo`` for ``PPOTrainer`` that prints nothing: the tests read the run's files, not its console."""


def run_metrics(run: Path) -> list[dict]:
    """The rows of ``run/metrics.jsonl`` without their timing fields, to compare two runs step by step."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]
