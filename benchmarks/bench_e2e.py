"""Benchmark: end-to-end GRPO steps of the bundled engine vs TRL's GRPOTrainer on a real-vocabulary model.

Realistic case (the one the README quotes): a 4-layer Qwen2 (hidden 256, 4 heads, MLP 1024, tied embeddings) built
from config with vocabulary V (151936 as Qwen2's, and 32000), saved locally with a word-level tokenizer of exactly V
entries (built in code, its own directory) and loaded by both trainers from those paths. Per step: 32 sequences (4
prompts x 8 samples), responses of up to 64 tokens sampled at temperature 1 (no top-k / top-p), GRPO advantages,
k3 KL (coef 0.04) in the loss against a frozen reference copy, one AdamW step per rollout, fp32, gradient
checkpointing off, the same prompts and the same reward function (a cheap length score) for both. The untrained
model almost never samples EOS, so responses run to the limit on both sides.

Each trainer runs in its own fresh process (so peak RSS is its own: ``ru_maxrss`` at the end, model loading
included) with the machine's default torch threads, on the bench's device (``--device cuda``: the same case on the
GPU, with the peak GPU memory reported as well; no target reads it). Reported per row: median step time, response
tokens/s (tokens counted from the response masks), the median generation / experience / update split (TRL: time inside
``_generate``, the rest of ``_generate_and_score_completions``, the rest of the step), peak RSS, and for the engine
the forward-only floor: the engine's own forward calls alone for the same token counts (generation: prefill +
one cached decode forward per response token, LM head for the last position only; experience: the reference
body over prompt + response and the LM-head matmul at response positions), measured after the training steps
and after the peak RSS was read.
Rows ``engine_memory``: the engine's peak extra memory for the experience phase and one update micro-batch on a
one-layer Llama with Qwen2's vocabulary (V=151936), config ``fused_lm_head`` on and off (in this process).

Rows ``trl-patched`` (``--only trl-patched``): the same GRPO case (the first realistic one) with TRL's GRPOTrainer
three ways, each in its own process: plain, with ``use_liger_kernel=True`` (Liger's layer kernels, which TRL >= 1.15
applies; Triton, so "missing" on CPU), and with ``fastppo.compat.patch("trl")`` applied before the trainer is built
(its log-probs and entropies on fastppo's fused LM head). Each row reports what the ``ppo_step`` rows do, plus step
1's loss and gradient norm (TRL logs the first step) and, after the timed steps, TRL's loss and gradient norm on the
last generated batch with seeded non-zero advantages (the case's own advantages are zero: its length reward is the
same for every 64-token response); the patched row's ``max_err`` is their largest difference from the plain row's
(absolute below 1, relative above), flagged WRONG beyond the suite's float32 error floor. The installed
TRL is used: a TRL 1.12 / 1.13 tree first on ``PYTHONPATH`` runs the same case on their logits-building GRPO.

``--quick`` runs a small variant (V=32000, 8 sequences, 16 tokens) and the toy case: the engine's tiny Llama on the
digit-reversal task, a smoke row only.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .providers import version_of
from .runner import Row
from .timing import _sync

OP = "ppo_step"
PATCHED_OP = "trl-patched"
OPS = (OP, PATCHED_OP)
ENGINE, TRL = "fastppo-engine", "trl-GRPOTrainer"
TRL_LIGER, TRL_PATCHED = "trl-GRPOTrainer+liger", "trl-GRPOTrainer+fastppo.patch"
_CHILD_TIMEOUT_S = 3600


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        real = [{"V": 32000, "prompts": 2, "samples": 4, "resp_len": 16, "warmup_steps": 1, "steps": 2}]
        toy = {"batch": 16, "resp_len": 8, "warmup_steps": 1, "steps": 2}
    else:
        real = [{"V": v, "prompts": 4, "samples": 8, "resp_len": 64, "warmup_steps": 1, "steps": 3}
                for v in (151936, 32000)]
        toy = {"batch": 64, "resp_len": 10, "warmup_steps": 2, "steps": 8}
    return {"realistic": real, "toy": toy}


# --------------------------------------------------------------------------------------------- model + data
MODEL = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True)


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer of exactly ``vocab_size`` entries: specials, digits, '=', then filler words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "=", *(str(d) for d in range(10))]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   padding_side="left")


def save_case(root: Path, vocab_size: int) -> tuple[Path, Path]:
    """Save the tokenizer and the seeded Qwen2 under ``root``; returns ``(model_dir, tokenizer_dir)``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer(vocab_size)
    tok_dir, model_dir = root / "tokenizer", root / "model"
    tok.save_pretrained(tok_dir)
    torch.manual_seed(0)
    conf = Qwen2Config(vocab_size=vocab_size, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       bos_token_id=tok.eos_token_id, **MODEL)
    Qwen2ForCausalLM(conf).save_pretrained(model_dir)
    return model_dir, tok_dir


def prompts(n: int) -> list[str]:
    import random

    rng = random.Random(0)
    return [" ".join(str(rng.randrange(10)) for _ in range(rng.randint(4, 8))) + " =" for _ in range(n)]


def length_reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """The same cheap score for both trainers: closeness of the response to 20 words."""
    return [-abs(len(c.split()) - 20) / 20.0 for c in completions]


# ------------------------------------------------------------------------------------------- the child runs
def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def child_engine(model_dir: str, tok_dir: str, s: dict[str, Any], work: str) -> dict[str, Any]:
    from fastppo.engine.config import PPOConfig
    from fastppo.engine.trainer import PPOTrainer

    pf = Path(work) / "prompts.txt"
    pf.write_text("\n".join(prompts(256)) + "\n")
    batch = s["prompts"] * s["samples"]
    cfg = PPOConfig(
        model=model_dir, tokenizer=tok_dir, task="prompts_file", prompts_file=str(pf),
        reward_fn="fastppo.benchmarks.bench_e2e:length_reward", output_dir=work, device=s.get("device", "cpu"),
        total_steps=s["warmup_steps"] + s["steps"], sft_steps=0, advantage_estimator="grpo",
        samples_per_prompt=s["samples"], batch_size=batch, mini_batch_size=batch, micro_batch_size=batch,
        forward_batch_size=batch, max_new_tokens=s["resp_len"], ppo_epochs=1, kl_in_loss=True, kl_kind="k3",
        kl_coef=0.04, adaptive_kl=False, lr=1e-6, temperature=1.0, top_k=0, top_p=1.0, save_every=0,
        tensorboard=False, progress=False, plot=False, num_samples=1, eval_prompts=1,
    )
    tr = PPOTrainer(cfg, work, echo=lambda *a, **k: None)
    for _ in range(s["warmup_steps"]):
        tr.train_step()
    steps = [tr.train_step() for _ in range(s["steps"])]
    tr.metrics.close()
    out = _summary([m["time_step"] for m in steps],
                   [m["tokens_per_s"] * m["time_step"] for m in steps],  # response tokens of the step
                   {k: [m[f"time_{k}"] for m in steps] for k in ("generation", "experience", "update")})
    out["peak_rss_mib"] = _rss_mib()  # before the floor's own forwards (the training run's high-water mark)
    out.update(_gpu_peak())
    out["floor_s"] = forward_floor(tr, s)
    return out


@torch.no_grad()
def forward_floor(tr, s: dict[str, Any]) -> dict[str, float]:
    """The forward passes alone (best of 2), with the forward calls the engine makes: generation = prefill + one
    cached decode forward per response token (body + LM head for the last position, ``rollout.LastLogits``),
    experience = the reference body over prompt + response and the LM-head matmul at the response positions (in
    chunks of the fused head's size), no softmax, no sampling, no Python loop bookkeeping."""
    from transformers import DynamicCache

    from fastppo.autograd_linear import chunk_rows
    from fastppo.engine.lm_head import last_hidden, lm_head_of
    from fastppo.engine.models import position_ids_from_mask
    from fastppo.engine.rollout import LastLogits

    lm = tr.policy.lm
    ps = [p for p in tr.train_prompts[: s["prompts"]] for _ in range(s["samples"])]
    ids, mask = tr._encode(ps)
    b, r, dev = ids.shape[0], s["resp_len"], ids.device
    resp = torch.randint(3, lm.config.vocab_size, (b, r), generator=torch.Generator().manual_seed(0)).to(dev)
    head = lm_head_of(tr.ref_lm)

    def gen() -> None:
        kv = DynamicCache(config=lm.config)
        step = LastLogits(lm)
        attn = mask.long()
        pos = position_ids_from_mask(attn)
        step_ids, step_pos = ids, pos
        for t in range(r):
            step(kv, input_ids=step_ids, attention_mask=attn, position_ids=step_pos, use_cache=True)
            attn = torch.cat([attn, torch.ones(b, 1, dtype=attn.dtype, device=dev)], 1)
            step_pos = pos[:, -1:] + 1 + t
            step_ids = resp[:, t: t + 1]

    def exp() -> None:
        full_ids = torch.cat([ids, resp], 1)
        attn = torch.cat([mask.long(), torch.ones(b, r, dtype=torch.long, device=dev)], 1)
        hid = last_hidden(tr.ref_lm, input_ids=full_ids, attention_mask=attn,
                          position_ids=position_ids_from_mask(attn), use_cache=False)
        h = hid[:, ids.shape[1] - 1: -1].reshape(-1, hid.shape[-1])
        c = chunk_rows(head.weight.shape[0], h.shape[1], h.dtype, h.device)
        for i in range(0, h.shape[0], c):
            torch.mm(h[i: i + c], head.weight.t())

    out = {}
    for name, fn in (("generation", gen), ("experience", exp)):
        times = []
        for _ in range(2):
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            times.append(time.perf_counter() - t0)
        out[name] = min(times)
    return out


def _gpu_peak() -> dict[str, float]:
    """On a GPU run, the device's peak allocated memory (the figure that matters there; RSS is the host's)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20}


def child_trl(model_dir: str, tok_dir: str, s: dict[str, Any], work: str) -> dict[str, Any]:
    """TRL's GRPOTrainer on the case; ``s["trl_mode"]``: ``plain`` (default), ``liger`` (``use_liger_kernel``) or
    ``patched`` (``fastppo.compat.patch("trl")`` first); ``s["log_first_step"]``: also return step 1's logged loss
    and gradient norm."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    mode = s.get("trl_mode", "plain")
    replaced: list[str] = []
    if mode == "patched":
        import fastppo.compat

        replaced = fastppo.compat.patch("trl")

    batch = s["prompts"] * s["samples"]
    total = s["warmup_steps"] + s["steps"]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ds = Dataset.from_dict({"prompt": prompts(s["prompts"] * total * 2)})
    stamps: list[float] = []
    gen_t: list[float] = []
    score_t: list[float] = []
    n_tok: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    args = GRPOConfig(
        output_dir=work, per_device_train_batch_size=batch, num_generations=s["samples"], gradient_accumulation_steps=1,
        max_completion_length=s["resp_len"], beta=0.04, num_iterations=1, learning_rate=1e-6, temperature=1.0,
        top_p=1.0, top_k=0, gradient_checkpointing=False, use_cpu=s.get("device", "cpu") == "cpu", bf16=False,
        report_to=[], use_liger_kernel=mode == "liger", logging_first_step=bool(s.get("log_first_step")),
        save_strategy="no", logging_steps=10**6, max_steps=total, seed=0, disable_tqdm=True, log_completions=False,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[Stamp()])
    for cb in (transformers.trainer_callback.PrinterCallback, transformers.trainer_callback.ProgressCallback):
        trainer.remove_callback(cb)
    inner_gen, inner_score = trainer._generate, trainer._generate_and_score_completions

    def timed_gen(*a, **k):
        t0 = time.perf_counter()
        out = inner_gen(*a, **k)
        gen_t.append(time.perf_counter() - t0)
        return out

    last_batch: list[dict] = []

    def timed_score(*a, **k):
        t0 = time.perf_counter()
        out = inner_score(*a, **k)
        score_t.append(time.perf_counter() - t0)
        n_tok.append(float(out["completion_mask"].sum()))
        last_batch[:] = [out]
        return out

    trainer._generate, trainer._generate_and_score_completions = timed_gen, timed_score
    t0 = time.perf_counter()
    trainer.train()
    steps = [b - a for a, b in zip([t0, *stamps[:-1]], stamps, strict=True)]
    if len(steps) != total or len(gen_t) != total or len(score_t) != total:
        raise RuntimeError(f"TRL ran {len(steps)} steps / {len(gen_t)} generations, expected {total}")
    w = s["warmup_steps"]
    split = {"generation": gen_t[w:], "experience": [a - b for a, b in zip(score_t[w:], gen_t[w:], strict=True)],
             "update": [st - sc for st, sc in zip(steps[w:], score_t[w:], strict=True)]}
    out = _summary(steps[w:], n_tok[w:], split)
    out["peak_rss_mib"] = _rss_mib()
    out.update(_gpu_peak())
    out["trl_version"] = version_of("trl")
    if replaced:
        out["patched"] = replaced
    if s.get("log_first_step"):
        first = next(h for h in trainer.state.log_history if "loss" in h)
        out["step1"] = {k: float(first[k]) for k in ("loss", "grad_norm")}
        out["loss_check"] = _loss_check(trainer, last_batch[0])
    return out


def _loss_check(trainer, batch: dict[str, Any]) -> dict[str, float]:
    """TRL's own loss and its gradient norm on the last generated batch with seeded non-zero advantages, after the
    timed steps: the case's rewards are (almost always) all equal, so its own advantages are zero, and with the
    reference equal to the policy, step 1's loss and gradient are zero whatever computes the log-probs."""
    adv = batch["advantages"]
    batch = {**batch, "advantages": torch.randn(adv.shape, generator=torch.Generator().manual_seed(0)).to(adv)}
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = [p.grad.double().pow(2).sum() for p in trainer.model.parameters() if p.grad is not None]
    return {"loss": float(loss), "grad_norm": float(torch.stack(grads).sum().sqrt())}


def _summary(step_s: list[float], tokens: list[float], split: dict[str, list[float]]) -> dict[str, Any]:
    return {"step_s": statistics.median(step_s), "steps": len(step_s),
            "tokens_per_s": statistics.median(t / s for t, s in zip(tokens, step_s, strict=True)),
            "response_tokens": statistics.median(tokens),
            "time_split_s": {k: statistics.median(v) for k, v in split.items()},
            "torch_threads": torch.get_num_threads()}


def _child_main(argv: list[str]) -> None:
    which, model_dir, tok_dir, s_json, work = argv
    fn = child_engine if which == "engine" else child_trl
    print("E2E_RESULT " + json.dumps(fn(model_dir, tok_dir, json.loads(s_json), work)), flush=True)


# ---------------------------------------------------------------------------------------------- parent side
def _real_row(provider: str, group: str, s: dict[str, Any]) -> Row:
    b = s["prompts"] * s["samples"]
    return Row(suite="e2e", op=OP, mode="grpo-step", provider=provider, group=group, device=s.get("device", "cpu"),
               dtype="float32",
               shape=f"Qwen2 4x256 V={s['V']} seqs={b} ({s['prompts']}x{s['samples']}) resp<={s['resp_len']}",
               V=s["V"], B=b, T=s["resp_len"])


def _run_child(which: str, model_dir: Path, tok_dir: Path, s: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as work:
        cmd = [sys.executable, "-m", "fastppo.benchmarks.bench_e2e", which, str(model_dir), str(tok_dir),
               json.dumps(s), work]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_CHILD_TIMEOUT_S)
    for line in proc.stdout.splitlines():
        if line.startswith("E2E_RESULT "):
            return json.loads(line[len("E2E_RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    raise RuntimeError(f"exit {proc.returncode}: {tail[0]}"[:300])


def _fill(row: Row, res: dict[str, Any]) -> None:
    """A child's result into its row: time, tokens/s, split, peak RSS (and GPU memory), the floor if any."""
    row.median_ms = res["step_s"] * 1e3
    row.repeats = res["steps"]
    row.extra = {k: v for k, v in res.items() if k not in ("step_s", "steps")}
    split = res["time_split_s"]
    row.notes = (f"{res['tokens_per_s']:.0f} tok/s; split " + " / ".join(f"{v:.2f}" for v in split.values()) +
                 f" s; peak RSS {res['peak_rss_mib'] / 1024:.2f} GiB")
    if "peak_gpu_mib" in res:
        row.notes += f"; peak GPU memory {res['peak_gpu_mib'] / 1024:.2f} GiB"
    if "floor_s" in res:
        row.notes += "; forward floor gen/exp " + " / ".join(f"{v:.2f}" for v in res["floor_s"].values()) + " s"


def run_realistic(s: dict[str, Any], log: Callable[[str], None]) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, tok_dir = save_case(Path(tmp), s["V"])
        for which, provider, group in (("engine", ENGINE, "fastppo"), ("trl", TRL, "peer")):
            row = _real_row(provider, group, s)
            t0 = time.perf_counter()
            if which == "trl" and version_of("trl") is None:
                row.status = "missing: trl is not installed"
            else:
                try:
                    _fill(row, _run_child(which, model_dir, tok_dir, s))
                except Exception as exc:  # a broken provider is a row, not the end of the suite
                    row.status = f"error: {type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            log(f"[e2e] V={s['V']} {provider}: {row.status} {row.notes} ({time.perf_counter() - t0:.1f}s)")
    eng, trl = rows
    if eng.status == "ok" and trl.status == "ok":
        eng.extra["tokens_per_s_vs_trl"] = eng.extra["tokens_per_s"] / trl.extra["tokens_per_s"]
        eng.extra["peak_rss_vs_trl"] = eng.extra["peak_rss_mib"] / trl.extra["peak_rss_mib"]
        eng.notes += (f"; {eng.extra['tokens_per_s_vs_trl']:.2f}x TRL's tokens/s at "
                      f"{eng.extra['peak_rss_vs_trl']:.2f}x its peak RSS")
    return rows


# --------------------------------------------------------------- TRL's trainer plain, with Liger, patched by fastppo
def _liger_missing(device: str) -> str | None:
    if device != "cuda":
        return ("missing: TRL's use_liger_kernel applies Liger's layer kernels (RMSNorm, SwiGLU, RoPE), which are "
                "Triton kernels for CUDA; TRL >= 1.15 no longer routes GRPO's loss to Liger's fused linear loss")
    if version_of("liger-kernel") is None:
        return "missing: liger-kernel is not installed"
    return None


def _check_err(patched: dict[str, Any], plain: dict[str, Any]) -> float:
    """The largest difference of step 1's loss and gradient norm and of the loss check's (absolute below 1,
    relative above)."""
    return max(abs(patched[part][k] - plain[part][k]) / max(abs(plain[part][k]), 1.0)
               for part in ("step1", "loss_check") for k in ("loss", "grad_norm"))


def run_trl_patched(s: dict[str, Any], log: Callable[[str], None]) -> list[Row]:
    """TRL's GRPOTrainer on the realistic case plain, with Liger and with ``fastppo.compat.patch("trl")``."""
    from .runner import ERR_FLOOR

    rows = []
    device = s.get("device", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, tok_dir = save_case(Path(tmp), s["V"])
        for mode, provider, group in (("plain", TRL, "peer"), ("liger", TRL_LIGER, "peer"),
                                      ("patched", TRL_PATCHED, "fastppo")):
            row = _real_row(provider, group, s)
            row.op = PATCHED_OP
            t0 = time.perf_counter()
            why = "missing: trl is not installed" if version_of("trl") is None else None
            why = why or (_liger_missing(device) if mode == "liger" else None)
            if why is not None:
                row.status = why
            else:
                try:
                    _fill(row, _run_child("trl", model_dir, tok_dir, {**s, "trl_mode": mode, "log_first_step": True}))
                except Exception as exc:  # a broken provider is a row, not the end of the suite
                    row.status = f"error: {type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            log(f"[e2e] trl-patched V={s['V']} {provider}: {row.status} {row.notes} ({time.perf_counter() - t0:.1f}s)")
    plain, patched = rows[0], rows[-1]
    if plain.status == "ok" and patched.status == "ok":
        ex, base = patched.extra, plain.extra
        ex["step_time_vs_plain"] = patched.median_ms / plain.median_ms
        ex["peak_rss_vs_plain"] = ex["peak_rss_mib"] / base["peak_rss_mib"]
        patched.notes += (f"; {ex['step_time_vs_plain']:.2f}x plain TRL's step time at "
                          f"{ex['peak_rss_vs_plain']:.2f}x its peak RSS")
        if "peak_gpu_mib" in ex and "peak_gpu_mib" in base:
            ex["peak_gpu_vs_plain"] = ex["peak_gpu_mib"] / base["peak_gpu_mib"]
            patched.notes += f", {ex['peak_gpu_vs_plain']:.2f}x its peak GPU memory"
        patched.max_err = _check_err(ex, base)
        patched.err_flag = "ok" if patched.max_err <= ERR_FLOOR[torch.float32] else "WRONG"
        patched.notes += f"; step 1 and loss check (loss, grad norm) vs plain: max err {patched.max_err:.1e}"
    return rows


# ------------------------------------------------------------------------------------------------ toy smoke
def _toy_config(device: torch.device, s: dict[str, int], run_dir: str):
    from fastppo.engine.config import PPOConfig

    return PPOConfig(
        output_dir=run_dir, device=device.type, total_steps=s["warmup_steps"] + s["steps"], sft_steps=0,
        batch_size=s["batch"], mini_batch_size=s["batch"], micro_batch_size=s["batch"], forward_batch_size=s["batch"],
        max_new_tokens=s["resp_len"], ppo_epochs=1, save_every=0, tensorboard=False, progress=False, plot=False,
        eval_prompts=1, num_samples=1, task_num_prompts=max(256, 4 * s["batch"]),
    )


def run_engine(device: torch.device, s: dict[str, int]) -> Row:
    """The toy smoke row: the engine's tiny Llama on the digit-reversal task."""
    row = Row(suite="e2e", op=OP, mode="toy-step", provider=ENGINE, group="fastppo", device=device.type,
              dtype="float32", shape=f"tiny Llama, batch={s['batch']} resp_len<={s['resp_len']}", B=s["batch"],
              T=s["resp_len"])
    from fastppo.engine.trainer import PPOTrainer

    threads = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = PPOTrainer(_toy_config(device, s, tmp), tmp, echo=lambda *a, **k: None)
            for _ in range(s["warmup_steps"]):
                trainer.train_step()
            steps = [trainer.train_step() for _ in range(s["steps"])]
            trainer.metrics.close()
    finally:
        torch.set_num_threads(threads)  # the engine picks one thread for the tiny model
    med = lambda k: statistics.median(m[k] for m in steps)  # noqa: E731
    step_s = med("time_step")
    row.median_ms = step_s * 1e3
    row.repeats = len(steps)
    split = {k: med(f"time_{k}") for k in ("generation", "experience", "update")}
    row.extra = {"tokens_per_s": med("tokens_per_s"), "time_split_s": split, "backend": trainer.cfg.backend}
    row.notes = f"smoke row; {med('tokens_per_s'):.0f} tok/s"
    return row


# ------------------------------------------------------------------- engine memory with and without the fused head
MEMORY_OP = "engine_memory"
MEMORY_VOCAB = 151936  # Qwen2's vocabulary: where the logits are the memory wall


def memory_settings(quick: bool) -> dict[str, int]:
    return {"batch": 8, "prompt": 8, "resp_len": 32 if quick else 128, "hidden": 64}


def run_lm_head_memory(device: torch.device, quick: bool) -> list[Row]:
    """Peak extra memory of the engine's experience phase and of one update micro-batch (forward, PPO loss with
    entropy and KL, backward) on a one-layer Llama with V=MEMORY_VOCAB, config ``fused_lm_head`` on and off.

    The rollout is synthetic (random token ids, full masks): memory depends on shapes only, not on the text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastppo.engine.experience import make_experience
    from fastppo.engine.models import ValueModel, frozen_copy
    from fastppo.engine.rollout import Rollout

    from .timing import peak_extra_bytes

    s = memory_settings(quick)
    b, p, r, v = s["batch"], s["prompt"], s["resp_len"], MEMORY_VOCAB
    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=v, hidden_size=s["hidden"], intermediate_size=2 * s["hidden"], num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    lm = LlamaForCausalLM(conf).to(device)
    policy, ref_lm = ValueModel(lm).to(device), frozen_copy(lm)
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(0, v, (b, n), generator=g).to(device)  # noqa: E731
    ones = lambda n: torch.ones(b, n, dtype=torch.long, device=device)  # noqa: E731
    rollout = Rollout(ids(p), ones(p), ids(r), ones(r))
    scores = torch.randn(b, generator=g).to(device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from fastppo.engine.config import PPOConfig

        cfg = PPOConfig(output_dir=tmp, device=device.type, total_steps=1, sft_steps=0, batch_size=b,
                        mini_batch_size=b, micro_batch_size=b, forward_batch_size=b, max_new_tokens=r, ppo_epochs=1,
                        save_every=0, tensorboard=False, progress=False, plot=False, eval_prompts=1, num_samples=1)
        cfg.kl_in_loss, cfg.kl_coef, cfg.entropy_coef = True, 0.05, 0.01
        for fused in (True, False):
            cfg.fused_lm_head = fused
            row = Row(suite="e2e", op=MEMORY_OP, mode="experience+update", provider=f"fastppo-engine[fused_lm_head="
                      f"{'on' if fused else 'off'}]", group="fastppo", device=device.type, dtype="float32",
                      shape=f"batch={b} prompt={p} resp={r} V={v} H={s['hidden']}", N=b * r, V=v, B=b, T=r)
            rows.append(row)
            try:
                with torch.no_grad():
                    exp_peak = peak_extra_bytes(lambda: make_experience(rollout, scores, policy, ref_lm, None, cfg,
                                                                        0.05), device)
                    exp = make_experience(rollout, scores, policy, ref_lm, None, cfg, 0.05)
                trainer = _MicroLoss(cfg, policy)

                def update(trainer=trainer, exp=exp):
                    policy.zero_grad(set_to_none=True)
                    loss, _ = trainer.micro_loss(exp)
                    loss.backward()
                    return loss.detach()
                update()  # warm-up (allocator, lazy inits); the grads it leaves are dropped by the next zero_grad
                t0 = time.perf_counter()
                update()
                row.median_ms, row.repeats = (time.perf_counter() - t0) * 1e3, 1
                policy.zero_grad(set_to_none=True)
                peak = peak_extra_bytes(update, device)
                policy.zero_grad(set_to_none=True)
                row.peak_extra_mib = None if peak is None else peak / 2**20
                row.extra = {"experience_peak_mib": None if exp_peak is None else exp_peak / 2**20,
                             "update_peak_mib": row.peak_extra_mib}
                logits_mib = b * (p + r) * v * 4 / 2**20
                row.notes = (f"update peak {_mib(row.peak_extra_mib)}, experience peak "
                             f"{_mib(row.extra['experience_peak_mib'])} (full logits [B, L, V] fp32: "
                             f"{logits_mib:.0f} MiB)")
            except Exception as exc:
                row.status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    return rows


def _mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f} MiB"


class _MicroLoss:
    """The engine trainer's ``micro_loss`` on a given policy without building a whole trainer (no rollout, task or
    optimizer): the same method, bound to an object holding what it reads."""

    def __init__(self, cfg, policy) -> None:
        from fastppo.engine.trainer import KLController, PPOTrainer

        self.cfg, self.policy, self.critic, self.old_from_update = cfg, policy, None, False
        self.kl_ctl = KLController(cfg.kl_coef, False, 6.0, 10000)
        self._forward_train = PPOTrainer._forward_train.__get__(self)
        self.micro_loss = PPOTrainer.micro_loss.__get__(self)


def run(device: torch.device, quick: bool, log: Callable[[str], None] = print,
        ops: tuple[str, ...] | set[str] = OPS) -> list[Row]:
    """The e2e rows of ``ops``: ``ppo_step`` (toy, realistic and the ``engine_memory`` rows), ``trl-patched``."""
    s = settings(quick)
    rows = []
    if OP in ops:
        t0 = time.perf_counter()
        try:
            rows.append(run_engine(device, s["toy"]))
        except Exception as exc:
            rows.append(Row(suite="e2e", op=OP, mode="toy-step", provider=ENGINE, group="fastppo",
                            device=device.type, dtype="float32", shape="tiny Llama",
                            status=f"error: {type(exc).__name__}: {exc}"[:300]))
        log(f"[e2e] toy {ENGINE}: {rows[-1].status} {rows[-1].notes} ({time.perf_counter() - t0:.1f}s)")
        for case in s["realistic"]:
            rows += run_realistic({**case, "device": device.type}, log)
    if PATCHED_OP in ops and s["realistic"]:
        rows += run_trl_patched({**s["realistic"][0], "device": device.type}, log)
    if OP not in ops:
        return rows
    t0 = time.perf_counter()
    for row in run_lm_head_memory(device, quick):
        rows.append(row)
        log(f"[e2e] {row.provider}: {row.status} {row.notes} ({time.perf_counter() - t0:.1f}s)")
    return rows


if __name__ == "__main__":
    _child_main(sys.argv[1:])
