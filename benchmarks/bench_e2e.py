"""Benchmark: end-to-end PPO step throughput of the bundled engine vs TRL's PPOTrainer.

Same tiny model for both (the engine's code-built Llama: hidden 64, 2 layers, 4 heads, MLP 128, over the
embedded digit-reversal task's word-level vocabulary, built by the engine's own builder for both), same batch,
same response length limit, same prompts, no warm-up SFT, one PPO epoch with one minibatch, fp32, on the
benchmark device, and on CPU the same torch thread count (the engine's choice for the tiny model). Inherent
differences: TRL's PPO needs a separate value model and a reward model (two more tiny Llamas: one more forward
in the experience phase and one more backward in the update), the engine uses a value head on the policy
trunk and the task's verifier function as reward.

A PPO step = generation (rollout) + experience (policy/reference/value forward, rewards, GAE) + update.
Reported per provider: median step time, tokens/s (response tokens per step / step time; for TRL the
response-token count is ``batch x response_length``, an upper bound since TRL does not report it, so its
tokens/s is optimistic), and for the engine the median time split (generation / experience / update).

TRL: ``PPOTrainer`` moved to ``trl.experimental.ppo`` in TRL 1.10 and was removed later (huggingface/trl
PR 7020); with a TRL that has it, it runs here fully offline on the same tiny model built from config and the
same code-built tokenizer; otherwise its row says missing, with the reason.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from .providers import Missing, peer_attr, version_of
from .runner import Row

OP = "ppo_step"


def settings(quick: bool) -> dict[str, int]:
    if quick:
        return {"batch": 16, "resp_len": 8, "warmup_steps": 1, "steps": 2}
    return {"batch": 64, "resp_len": 10, "warmup_steps": 2, "steps": 8}


def _row(provider: str, group: str, device: torch.device, s: dict[str, int]) -> Row:
    return Row(suite="e2e", op=OP, mode="step", provider=provider, group=group, device=device.type, dtype="float32",
               shape=f"batch={s['batch']} resp_len<={s['resp_len']}", B=s["batch"], T=s["resp_len"])


# ---------------------------------------------------------------------------------------------- fastppo engine
def _engine_config(device: torch.device, s: dict[str, int], run_dir: str):
    from fastppo.engine.config import PPOConfig

    return PPOConfig(
        output_dir=run_dir, device=device.type, total_steps=s["warmup_steps"] + s["steps"], sft_steps=0,
        batch_size=s["batch"], mini_batch_size=s["batch"], micro_batch_size=s["batch"], forward_batch_size=s["batch"],
        max_new_tokens=s["resp_len"], ppo_epochs=1, save_every=0, tensorboard=False, progress=False, plot=False,
        eval_prompts=1, num_samples=1, task_num_prompts=max(256, 4 * s["batch"]),
    )


def run_engine(device: torch.device, s: dict[str, int]) -> Row:
    row = _row("fastppo-engine", "fastppo", device, s)
    try:
        from fastppo.engine import PPOTrainer  # noqa: F401  (probe: the engine and its deps import)
    except Exception as exc:
        row.status = f"missing: engine not available ({type(exc).__name__}: {exc})"
        return row
    from fastppo.engine.trainer import PPOTrainer as Trainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(_engine_config(device, s, tmp), tmp, echo=lambda *a, **k: None)
        for _ in range(s["warmup_steps"]):
            trainer.train_step()
        steps = [trainer.train_step() for _ in range(s["steps"])]
        trainer.metrics.close()
    med = lambda k: statistics.median(m[k] for m in steps)  # noqa: E731
    step_s = med("time_step")
    row.median_ms = step_s * 1e3
    row.repeats = len(steps)
    split = {k: med(f"time_{k}") for k in ("generation", "experience", "update")}
    row.extra = {"tokens_per_s": med("tokens_per_s"), "time_split_s": split, "backend": trainer.cfg.backend}
    row.notes = f"{med('tokens_per_s'):.0f} tok/s; " + " ".join(
        f"{k[:3]} {100 * v / step_s:.0f}%" for k, v in split.items())
    return row


# ------------------------------------------------------------------------------------------------------ TRL
def _trl_classes() -> tuple[Any, Any]:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # we know it is experimental; keep the log clean
    for mod in ("trl.experimental.ppo", "trl"):
        try:
            return peer_attr(mod, "PPOTrainer"), peer_attr(mod, "PPOConfig")
        except Missing:
            continue
    raise Missing(f"installed trl {version_of('trl')} has no PPOTrainer (removed by huggingface/trl PR 7020; "
                  f"trl.experimental.ppo in 1.10-1.12 has it, e.g. trl==1.12.0)")


def run_trl(device: torch.device, s: dict[str, int]) -> Row:
    row = _row("trl-PPOTrainer", "peer", device, s)
    try:
        trainer_cls, config_cls = _trl_classes()
        elapsed = _trl_steps(trainer_cls, config_cls, device, s)
    except Missing as exc:
        row.status = f"missing: {exc}"
        return row
    except Exception as exc:
        row.status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        return row
    step_s = statistics.median(elapsed)
    row.median_ms = step_s * 1e3
    row.repeats = len(elapsed)
    tok = s["batch"] * s["resp_len"] / step_s
    row.extra = {"tokens_per_s_upper_bound": tok}
    row.extra["torch_threads"] = torch.get_num_threads()
    row.notes = f"<= {tok:.0f} tok/s (assumes every response is resp_len tokens)"
    return row


def _trl_steps(trainer_cls, config_cls, device: torch.device, s: dict[str, int]) -> list[float]:
    import copy

    import transformers
    from datasets import Dataset
    from transformers import LlamaForSequenceClassification, TrainerCallback

    from fastppo.engine import task as task_mod
    from fastppo.engine.models import build_causal_lm

    tok = task_mod.make_tokenizer()
    eng_cfg = _engine_config(device, s, "")
    torch.manual_seed(0)
    # The engine's own builder, so both sides train the very same architecture; TRL's PPO needs a separate value
    # model and a reward model (the engine uses a value head on the policy and the task's verifier function).
    policy, ref = build_causal_lm(eng_cfg, tok), build_causal_lm(eng_cfg, tok)
    cls_cfg = copy.deepcopy(policy.config)
    cls_cfg.num_labels, cls_cfg.id2label, cls_cfg.label2id = 1, {0: "score"}, {"score": 0}
    value, reward = LlamaForSequenceClassification(cls_cfg), LlamaForSequenceClassification(cls_cfg)
    total_steps = s["warmup_steps"] + s["steps"]
    prompts = task_mod.make_prompts(s["batch"] * total_steps, eng_cfg.task_min_digits, eng_cfg.task_max_digits, 0)
    ds = Dataset.from_dict({"input_ids": [tok(p)["input_ids"] for p in prompts]})

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        args = config_cls(
            output_dir=tmp, per_device_train_batch_size=s["batch"], gradient_accumulation_steps=1,
            num_mini_batches=1, num_ppo_epochs=1, total_episodes=s["batch"] * total_steps,
            response_length=s["resp_len"], stop_token_id=tok.eos_token_id, temperature=1.0, report_to=[],
            num_sample_generations=0, save_strategy="no", logging_steps=10**6, use_cpu=device.type == "cpu",
            missing_eos_penalty=None, seed=0, bf16=False, disable_tqdm=True,
        )
        trainer = trainer_cls(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                              value_model=value, train_dataset=ds, callbacks=[Stamp()])
        # TRL's PPO logs every step; keep those dicts off the benchmark's stdout
        for cb in (transformers.trainer_callback.PrinterCallback, transformers.trainer_callback.ProgressCallback):
            trainer.remove_callback(cb)
        t0 = time.perf_counter()
        trainer.train()
    times = [b - a for a, b in zip([t0, *stamps[:-1]], stamps, strict=True)]
    if len(times) < total_steps:
        raise RuntimeError(f"TRL ran {len(times)} steps, expected {total_steps}")
    return times[s["warmup_steps"]:]


def run(device: torch.device, quick: bool, log: Callable[[str], None] = print) -> list[Row]:
    s = settings(quick)
    threads = torch.get_num_threads()  # the engine picks its own thread count for the tiny model; restore after
    rows = []
    engine_threads = threads
    try:
        for fn in (run_engine, run_trl):
            if fn is run_trl and device.type == "cpu":
                torch.set_num_threads(engine_threads)  # TRL gets the thread count the engine chose for this model
            t0 = time.perf_counter()
            try:
                row = fn(device, s)
            except Exception as exc:  # a broken provider is a row, not the end of the suite
                row = _row("fastppo-engine" if fn is run_engine else "trl-PPOTrainer", "", device, s)
                row.status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            rows.append(row)
            log(f"[e2e] {row.provider}: {row.status} {row.notes} ({time.perf_counter() - t0:.1f}s)")
            if fn is run_engine:
                engine_threads = torch.get_num_threads()
                row.extra["torch_threads"] = engine_threads
            torch.set_num_threads(threads)
    finally:
        torch.set_num_threads(threads)
    eng, trl = rows
    if eng.status == "ok" and trl.status == "ok":
        eng.extra["speedup_vs_trl"] = trl.median_ms / eng.median_ms
        eng.notes += f"; step {eng.extra['speedup_vs_trl']:.1f}x faster than TRL"
    return rows
