"""fastppo's bundled PPO engine (``fastppo train``).

  config.py      PPOConfig: one dataclass with help text; YAML + ``--field value`` overrides; validation
  task.py        the embedded default task (digit reversal with a verifier reward, noisy-demo warm-up)
  models.py      tokenizer, policy + value head, critic, frozen / LoRA-base reference, reward model / function
  rollout.py     the batched KV-cached sampling loop (left-padded prompts, temperature / top-k / top-p, EOS)
  experience.py  logprobs, values, rewards with the KL penalty, GAE / GRPO / RLOO / REINFORCE++ advantages
  trainer.py     PPOTrainer: rollout -> experience -> ppo_epochs x minibatches; stats; checkpoints
  context.py     what the trainer calls that differs between one process (LocalContext) and a torchrun group
  distributed.py the torchrun context (collectives, FSDP2, sharded DCP checkpoints); single-process runs skip it
  checkpoint.py  atomic, verified checkpoints and exact resume (skipping a corrupt newest one)
  preflight.py   before any model work: the backend is usable; a resume's config matches its checkpoint
  tracking.py    metrics.jsonl, TensorBoard, curves.png
  cli.py         ``fastppo train [--config FILE] [--field value ...]`` / ``fastppo train --resume RUN_DIR``

The engine reaches the fused ops only through the public API (``fastppo.ppo_loss_from_logits`` etc.), so it
runs on whatever backend dispatch picks (config field ``backend``).
"""

from __future__ import annotations

from fastppo.engine.config import ConfigError, PPOConfig

__all__ = ["ConfigError", "PPOConfig", "PPOTrainer"]


def __getattr__(name: str):
    # the trainer pulls in transformers; import it only when asked for
    if name == "PPOTrainer":
        from fastppo.engine.trainer import PPOTrainer

        return PPOTrainer
    raise AttributeError(name)
