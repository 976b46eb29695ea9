"""The PPO loop: rollout -> experience -> ``ppo_epochs`` x shuffled minibatches of updates, with checkpoints.

One ``PPOTrainer`` owns the models, optimizer, scheduler, KL controller and prompt stream. Everything stateful is
in the checkpoint, so ``PPOTrainer(cfg, run_dir, resume=True)`` continues a killed run exactly (on CPU,
bitwise).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import fastppo
from fastppo.engine import checkpoint as ckpt_io
from fastppo.engine import inputs, preflight
from fastppo.engine import ptx as ptx_mod
from fastppo.engine import task as task_mod
from fastppo.engine.config import ConfigError, PPOConfig
from fastppo.engine.context import LocalContext, ProcessContext
from fastppo.engine.experience import (
    Experience,
    fill_from_update,
    make_experience,
    response_slice,
    score_rollout,
    update_is_on_policy,
)
from fastppo.engine.lm_head import lm_head_of
from fastppo.engine.models import (
    AdapterDisabledReference,
    ValueModel,
    apply_lora,
    build_causal_lm,
    build_reward,
    build_tokenizer,
    frozen_copy,
    resolve_device,
)
from fastppo.engine.rollout import Rollout, generate
from fastppo.engine.streams import sample_seeds, stream_seed
from fastppo.engine.tracking import MemoryLog, MetricsLog, plot_curves
from fastppo.linear import ppo_loss_and_terms_from_hidden

# Called with the step number after each PPO step, once its metrics are logged and its checkpoint (if due) saved.
StepCallback = Callable[[int], None]


class KLController:
    """Fixed, or adaptive (Ziegler et al. 2019): ``coef *= 1 + clip(kl/target - 1, ±0.2) * n / horizon``."""

    def __init__(self, coef: float, adaptive: bool, target: float, horizon: int) -> None:
        self.value = coef
        self.adaptive = adaptive
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_sequences: int) -> None:
        if self.adaptive:
            err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + err * n_sequences / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def _lr_lambda(cfg: PPOConfig, total_updates: int):
    def f(i: int) -> float:
        if cfg.warmup_steps and i < cfg.warmup_steps:
            return (i + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        frac = min((i - cfg.warmup_steps) / max(total_updates - cfg.warmup_steps, 1), 1.0)
        if cfg.lr_schedule == "linear":
            return 1.0 - frac
        return 0.5 * (1.0 + math.cos(math.pi * frac))

    return f


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class PPOTrainer:
    def __init__(self, cfg: PPOConfig, run_dir: str | Path, *, resume: bool = False, echo=print,
                 ctx: ProcessContext | None = None) -> None:
        """``ctx``: the process context, a ``fastppo.engine.distributed.DistContext`` when launched by torchrun;
        by default one process on ``cfg.device`` (``context.LocalContext``)."""
        cfg.validate()
        self.cfg = cfg
        self.is_main = ctx is None or ctx.is_main
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.echo = echo if self.is_main else (lambda *a, **k: None)
        echo = self.echo
        threads = cfg.torch_threads or (1 if not cfg.model else 0)
        if threads:
            torch.set_num_threads(threads)
        self.ctx: ProcessContext = ctx if ctx is not None else LocalContext(resolve_device(cfg.device))
        self.device = self.ctx.device
        preflight.check_backend(cfg, self.device)
        resume_from = preflight.resume_point(cfg, self.run_dir, echo) if resume else None
        if resume_from is not None:
            ckpt_io.check_format(resume_from, multi_process=self.ctx.distributed)
        seed_everything(cfg.seed)
        self.tokenizer = build_tokenizer(cfg)
        self.reward_fn = build_reward(cfg, self.device)
        self._setup_prompts()

        lm = build_causal_lm(cfg, self.tokenizer, cfg.model).to(self.device)
        inputs.check_tokenizer_fits(self.tokenizer, lm)
        ref_path = self.run_dir / "reference.safetensors"
        if not resume:
            self._warmup(lm)  # every rank runs the same seeded warm-up: identical weights, no broadcast needed
            if self.is_main:
                ckpt_io.save_module(lm, ref_path)  # the reference is fixed for the whole run; resume reloads it
        if cfg.lora_r:
            # the base weights (after warm-up) stay frozen under the adapter and are the reference; they travel in
            # the policy checkpoint, so resume needs nothing else
            lm = apply_lora(lm, cfg)
            self.ref_lm: torch.nn.Module = AdapterDisabledReference(lm)
        else:
            self.ref_lm = frozen_copy(lm)
            if resume:
                ckpt_io.load_module(self.ref_lm, ref_path)
        self.policy = ValueModel(lm).to(self.device)
        self.critic: ValueModel | None = None
        if cfg.critic == "separate" and cfg.advantage_estimator == "gae":  # critic-free estimators need no critic
            trunk = build_causal_lm(cfg, self.tokenizer, cfg.critic_model).to(self.device) if cfg.critic_model \
                else frozen_copy(lm).requires_grad_(True)
            self.critic = ValueModel(trunk).to(self.device)
        for model in (self.ref_lm, self.policy, self.critic):
            if model is not None:
                self.ctx.shard(model)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if self.critic is not None:
            params += [p for p in self.critic.parameters() if p.requires_grad]
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        updates = cfg.total_steps * cfg.ppo_epochs * (cfg.batch_size // cfg.mini_batch_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg, updates))
        # one epoch of one minibatch: the update's own forward gives the old log-probs (no policy forward in the
        # experience pass); tests switch it off to check the results are the same. Single process only: across ranks
        # each computes only its piece of a micro-batch's log-probs.
        self.old_from_update = update_is_on_policy(cfg) and not self.ctx.distributed
        self.ptx: ptx_mod.PtxBatches | None = None
        if cfg.ptx_coef > 0:
            if self.ctx.distributed:
                raise ConfigError("ptx_coef > 0 in a multi-process run is not supported yet")
            texts = ptx_mod.load_texts(cfg.ptx_file) if cfg.ptx_file else [
                f"{p} {d}" for p, d in zip(self.train_prompts, task_mod.make_demonstrations(
                    self.train_prompts, cfg.demo_noise, cfg.seed), strict=True)]
            self.ptx = ptx_mod.PtxBatches(texts, self.tokenizer, cfg.ptx_batch_size, cfg.seed, self.device)
        self.kl_ctl = KLController(cfg.kl_coef, cfg.adaptive_kl, cfg.kl_target, cfg.kl_horizon)
        self.stream = task_mod.PromptStream(self.train_prompts, cfg.seed)
        self.step = 0
        history: list[dict[str, Any]] = []
        if resume:
            path = resume_from
            state, history = self.ctx.load_checkpoint(path, models=self._models(), optimizer=self.optimizer,
                                                      scheduler=self.scheduler, echo=self.echo)
            self.step = int(state["step"])
            self.stream.position = int(state["data_position"])
            self.kl_ctl.load_state_dict(state["kl_controller"])
            self.echo(f"resumed from {path} at step {self.step}/{cfg.total_steps}")
        self.metrics: MetricsLog | MemoryLog = MetricsLog(self.run_dir, cfg.tensorboard, history) if self.is_main \
            else MemoryLog(history)

    def _models(self) -> dict[str, torch.nn.Module]:
        models: dict[str, torch.nn.Module] = {"policy": self.policy}
        if self.critic is not None:
            models["critic"] = self.critic
        return models

    # --------------------------------------------------------------------------------------------- set-up
    def _setup_prompts(self) -> None:
        cfg = self.cfg
        if cfg.task == "reverse":
            n_eval = max(cfg.eval_prompts, cfg.num_samples, 1)
            pool = task_mod.make_prompts(cfg.task_num_prompts + n_eval, cfg.task_min_digits, cfg.task_max_digits,
                                         cfg.seed)
            self.train_prompts, self.eval_prompts = pool[:-n_eval], pool[-n_eval:]
        else:
            rows = task_mod.load_prompts_file(cfg.prompts_file)
            self.train_prompts = inputs.render_prompts(rows, self.tokenizer, cfg.prompts_file)
            inputs.check_prompts_tokenize(self.train_prompts, self.tokenizer, cfg.prompts_file)
            self.eval_prompts = self.train_prompts[: max(cfg.num_samples, 1)]

    def _warmup(self, lm: torch.nn.Module) -> None:
        cfg = self.cfg
        if cfg.task != "reverse" or cfg.sft_steps == 0:
            return
        demos = task_mod.make_demonstrations(self.train_prompts, cfg.demo_noise, cfg.seed)
        t0 = time.perf_counter()
        losses = task_mod.sft_warmup(lm, self.tokenizer, self.train_prompts, demos, cfg.sft_steps,
                                     cfg.sft_batch_size, cfg.sft_lr, cfg.seed, self.device)
        self.echo(f"warm-up: {cfg.sft_steps} supervised steps on noisy demonstrations (noise {cfg.demo_noise}) "
                  f"in {time.perf_counter() - t0:.1f}s, loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    # ------------------------------------------------------------------------------------------------ rollout
    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        enc = self.tokenizer(prompts, padding=True, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def _generate(self, prompts: list[str], greedy: bool, seeds: Tensor | None = None,
                  rows: slice | None = None) -> Rollout:
        """Generate for ``prompts[rows]``, encoded with the whole list (one prompt width for every rank)."""
        ids, mask = self._encode(prompts)
        if rows is not None:
            ids, mask = ids[rows], mask[rows]
        cfg = self.cfg
        self.policy.eval()
        with self.ctx.unsharded(self.policy):
            return generate(self.policy.lm, ids, mask, max_new_tokens=cfg.max_new_tokens,
                            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, greedy=greedy,
                            cache=cfg.kv_cache, seeds=seeds, record_logprobs=cfg.rollout_is_level is not None)

    @torch.no_grad()
    def evaluate(self, prompts: list[str]) -> tuple[float, list[str], list[str], list[float]]:
        """Greedy generations on ``prompts``: ``(mean score, prompts, responses, scores)``. Uses no RNG."""
        out = []
        for s in range(0, len(prompts), self.cfg.forward_batch_size):
            ro = self._generate(prompts[s: s + self.cfg.forward_batch_size], greedy=True)
            scores, ps, rs = score_rollout(ro, self.tokenizer, self.reward_fn, self.cfg)
            out += list(zip(ps, rs, scores.cpu().tolist(), strict=False))
        ps, rs, ss = (list(x) for x in zip(*out, strict=False))
        return sum(ss) / len(ss), ps, rs, ss

    def write_samples(self, name: str) -> float:
        mean, ps, rs, ss = self.evaluate(self.eval_prompts)
        n = self.cfg.num_samples
        lines = [f"# greedy generations ({name}); mean score over {len(ps)} held-out prompts: {mean:.4f}"]
        lines += [f"{p!r} -> {r!r}  score={s:.3f}" for p, r, s in zip(ps[:n], rs[:n], ss[:n], strict=False)]
        if self.is_main:
            ckpt_io.write_text_atomic(self.run_dir / f"samples_{name}.txt", "\n".join(lines) + "\n")
        return mean

    # ------------------------------------------------------------------------------------------------- update
    def _forward_train(self, exp: Experience, hidden_only: bool = False) -> tuple[Tensor, Tensor | None]:
        """Response-position logits ``[B, R, V]`` (the LM head skips the prompt), or with ``hidden_only`` the last
        hidden states ``[B, R, H]`` (fused LM head), and values ``[B, R]`` (None under critic-free estimators: no
        value head runs)."""
        r = exp.labels.shape[1]
        need_values = self.cfg.advantage_estimator == "gae"
        if hidden_only:
            hid, values = self.policy(exp.input_ids, exp.attention_mask, exp.position_ids, hidden_only=True,
                                      values=need_values and self.critic is None)
            head_in = response_slice(hid, exp.prompt_width)
        else:
            logits, values = self.policy(exp.input_ids, exp.attention_mask, exp.position_ids, keep=r + 1,
                                         values=need_values and self.critic is None)
            head_in = logits[:, :-1]
        if need_values and self.critic is not None:
            _, values = self.critic(exp.input_ids, exp.attention_mask, exp.position_ids, keep=1)
        return head_in, (response_slice(values, exp.prompt_width) if need_values else None)

    def micro_loss(self, e: Experience) -> tuple[Tensor, dict[str, Tensor]]:
        """PPO loss (fused ``ppo_loss_from_hidden``; ``ppo_loss_from_logits`` with ``fused_lm_head`` off) +
        ``vf_coef`` x value loss on one micro-batch.

        On-policy (``old_from_update``) the old log-probs are this forward's own, detached (ratio 1): the stats
        then carry them (``old_logprobs``, ``entropy``) for the experience."""
        cfg = self.cfg
        # config fused_lm_head: from the last hidden states and the lm_head weight, the [B, R, V] logits never exist
        head = lm_head_of(self.policy.lm) if cfg.fused_lm_head else None
        x, values = self._forward_train(e, hidden_only=head is not None)
        old: Tensor | None = e.old_logprobs
        extra: dict[str, Tensor] = {}
        if self.old_from_update and head is None:
            with torch.no_grad():
                lp, h = fastppo.logprobs_and_entropy(x.detach(), e.labels, temperature=cfg.temperature, top_k=cfg.top_k,
                                                     top_p=cfg.top_p, mask=e.mask, backend=cfg.backend)
            old, extra = lp * e.mask, {"old_logprobs": lp, "entropy": h}
        elif self.old_from_update:
            old = None  # the fused loss takes each token's own log-prob as its old one: no extra pass over the head
        kw = dict(ref_logprobs=e.ref_logprobs if cfg.kl_in_loss else None, rollout_logprobs=e.rollout_logprobs,
                  objective=cfg.objective(kl_coef=self.kl_ctl.value), backend=cfg.backend)
        if head is not None:
            pg, st, tok = ppo_loss_and_terms_from_hidden(x, head.weight, e.labels, old, e.advantages, e.mask,
                                                         bias=head.bias, **kw)
            if old is None:
                extra = {"old_logprobs": tok["logprobs"], "entropy": tok["entropy"]}
        else:
            pg, st = fastppo.ppo_loss_from_logits(x, e.labels, old, e.advantages, e.mask, **kw)
        if values is not None:
            vl, vst = fastppo.value_loss(values, e.values, e.returns, e.mask, clip=cfg.value_clip, agg=cfg.loss_agg,
                                         backend=cfg.backend)
            loss = pg + cfg.vf_coef * vl
        else:  # critic-free estimators: no value head runs, nothing to train there
            zero = pg.new_zeros(()).detach()
            loss, vst = pg, {"vf_loss": zero, "vf_clipfrac": zero}
        stats = {**st, "value_loss": vst["vf_loss"].detach(), "vf_clipfrac": vst["vf_clipfrac"].detach(), **extra}
        return loss, stats

    def update(self, exp: Experience) -> dict[str, Tensor]:
        """``ppo_epochs`` x shuffled minibatches (gradient accumulation over micro-batches). Stats stay on device."""
        cfg = self.cfg
        n = exp.labels.shape[0]
        accum = cfg.grad_accum_steps
        self.policy.train()
        if self.critic is not None:
            self.critic.train()
        keys = ("loss", "pg_loss", "clipfrac", "approx_kl", "value_loss", "vf_clipfrac", "grad_norm")
        acc: dict[str, list[Tensor]] = {k: [] for k in keys + (("ptx_loss",) if self.ptx is not None else ())}
        n_updates = 0
        fresh = {k: torch.empty_like(exp.ref_logprobs) for k in ("old_logprobs", "entropy")}
        for epoch in range(cfg.ppo_epochs):
            # the minibatch order is a function of (seed, step, epoch): the same in every process and on resume
            gen = torch.Generator().manual_seed(stream_seed(cfg.seed, self.step, epoch, 0xB47C))
            perm = torch.randperm(n, generator=gen).to(exp.labels.device)
            for mb in perm.split(cfg.mini_batch_size):
                self.optimizer.zero_grad(set_to_none=True)
                for micro in mb.split(cfg.micro_batch_size):
                    # this process's piece of the global micro-batch (all of it in one process), weighted by its
                    # share of the aggregation
                    piece, loss, st = self.ctx.piece_loss(micro, exp.mask, cfg.loss_agg,
                                                          lambda rows: self.micro_loss(exp.select(rows)))
                    if "old_logprobs" in st:  # old_from_update: single-process only, so piece == micro
                        fresh["old_logprobs"][piece] = st["old_logprobs"]
                        fresh["entropy"][piece] = st["entropy"]
                    self.ctx.backward(loss, accum)
                    for k in ("loss", "pg_loss", "clipfrac", "approx_kl", "value_loss", "vf_clipfrac"):
                        acc[k].append(st[k].detach().float())
                if self.ptx is not None:  # PPO-ptx: + ptx_coef x the NLL of this optimizer step's pretraining batch
                    ids, am = self.ptx.batch(self.step, n_updates)
                    nll = ptx_mod.ptx_nll(self.policy.lm, ids, am, cfg.backend)
                    (cfg.ptx_coef * nll).backward()
                    acc["ptx_loss"].append(nll.detach().float())
                n_updates += 1
                max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
                if hasattr(norm, "full_tensor"):  # FSDP: a replicated DTensor holding the global norm
                    norm = norm.full_tensor()
                acc["grad_norm"].append(norm.detach())
                self.optimizer.step()
                self.scheduler.step()
        self.policy.eval()
        if self.critic is not None:
            self.critic.eval()
        if self.old_from_update:
            fill_from_update(exp, fresh["old_logprobs"], fresh["entropy"], cfg)
        out = {k: torch.stack(v).float().mean() for k, v in acc.items()}
        return self.ctx.reduce_stats(out, keep=("grad_norm",))

    def _pad_responses(self, ro: Rollout) -> Rollout:
        """Pad this rank's responses to the longest response of any rank (the width one process would have)."""
        width = self.ctx.max_int(ro.response_ids.shape[1])
        extra = width - ro.response_ids.shape[1]
        if extra == 0:
            return ro
        pad = lambda t, v: torch.nn.functional.pad(t, (0, extra), value=v)  # noqa: E731
        return Rollout(ro.prompt_ids, ro.prompt_mask, pad(ro.response_ids, self.tokenizer.pad_token_id),
                       pad(ro.response_mask, 0), None if ro.logprobs is None else pad(ro.logprobs, 0.0))

    # --------------------------------------------------------------------------------------------------- step
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_step(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        prompts = self.stream.take(cfg.batch_size // cfg.samples_per_prompt)
        prompts = [p for p in prompts for _ in range(cfg.samples_per_prompt)]  # group members adjacent
        # every rank holds the global prompt list and generates its rows of it
        rows = self.ctx.local_rows(len(prompts))
        seeds = sample_seeds(cfg.seed, self.step, torch.arange(len(prompts), device=self.device)[rows])
        rollout = self._generate(prompts, greedy=False, seeds=seeds, rows=rows)
        scores, _, _ = score_rollout(rollout, self.tokenizer, self.reward_fn, cfg)
        rollout = self._pad_responses(rollout)
        self._sync()
        t1 = time.perf_counter()
        kl_coef = self.kl_ctl.value
        exp = make_experience(rollout, scores, self.policy, self.ref_lm, self.critic, cfg, kl_coef,
                              gather=self.ctx.gather_experience, old_from_update=self.old_from_update)
        self._sync()
        t2 = time.perf_counter()
        up = self.update(exp)
        self._sync()
        t3 = time.perf_counter()

        m = exp.mask
        with torch.no_grad():
            seq_kl = exp.kl.sum(1)
            resid_var = fastppo.masked_var(exp.returns - exp.values, m)
            ret_var = fastppo.masked_var(exp.returns, m)
            stats = {
                "reward_mean": exp.scores.mean(),
                "reward_std": exp.scores.std() if exp.scores.numel() > 1 else torch.zeros(()),
                "kl": seq_kl.mean(),
                "entropy": fastppo.masked_mean(exp.entropy, m),
                "explained_variance": 1.0 - resid_var / ret_var.clamp_min(1e-8),
                "value_mean": fastppo.masked_mean(exp.values, m),
                "return_mean": fastppo.masked_mean(exp.returns, m),
                "response_length": m.sum(1).mean(),
                "response_tokens": m.sum(),
                "advantage_abs_mean": fastppo.masked_mean(exp.advantages.abs(), m),  # no boolean-index sync
                **up,
            }
        values = torch.stack([v.float() for v in stats.values()]).cpu().tolist()  # the one host sync per step
        host = dict(zip(stats, values, strict=True))
        n_tokens = host.pop("response_tokens")
        self.kl_ctl.update(host["kl"], cfg.batch_size)
        self.step += 1
        return {
            "step": self.step,
            **host,
            "kl_coef": kl_coef,
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_s": n_tokens / (t3 - t0),
            "time_generation": t1 - t0,
            "time_experience": t2 - t1,
            "time_update": t3 - t2,
            "time_step": t3 - t0,
        }

    # ------------------------------------------------------------------------------------------------- train
    def save(self) -> Path:
        state = {"data_position": self.stream.position, "kl_controller": self.kl_ctl.state_dict(),
                 "config": self.cfg.to_dict()}
        return self.ctx.save_checkpoint(self.run_dir, self.step, models=self._models(), optimizer=self.optimizer,
                                        scheduler=self.scheduler, state=state, metrics=self.metrics.history,
                                        keep=self.cfg.keep_checkpoints)

    def train(self, *, on_step_end: Sequence[StepCallback] = ()) -> dict[str, Any]:
        """Run the remaining PPO steps, save, write the final model and summary. ``on_step_end``: callables
        ``f(step)`` run after each step (after its checkpoint, if one is due), e.g. to stop or slow a run."""
        cfg = self.cfg
        t_start = time.perf_counter()
        if self.step == 0:
            before = self.write_samples("before")
            self.echo(f"greedy score before PPO (held-out prompts): {before:.3f}")
        bar = None
        if cfg.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.total_steps, initial=self.step, desc="PPO", unit="step", dynamic_ncols=True)
        last_saved = self.step if self.step else -1
        while self.step < cfg.total_steps:
            m = self.train_step()
            self.metrics.log(m)
            if bar is not None:
                bar.set_postfix(reward=f"{m['reward_mean']:.3f}", kl=f"{m['kl']:.3f}", ent=f"{m['entropy']:.2f}",
                                refresh=False)
                bar.update(1)
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save()
                last_saved = self.step
            for callback in on_step_end:
                callback(self.step)
        if bar is not None:
            bar.close()
        if last_saved != self.step:
            self.save()
        return self.finish(time.perf_counter() - t_start)

    def finish(self, seconds: float) -> dict[str, Any]:
        cfg = self.cfg
        self.metrics.close()
        after = self.write_samples("after")
        # the policy's full weights (a collective in a multi-process run: every process takes part)
        full = self.ctx.full_model(self.policy, lambda: ValueModel(build_causal_lm(cfg, self.tokenizer, cfg.model)))
        if full is None:  # not the main process: it writes nothing
            return {"steps": self.step, "run_dir": str(self.run_dir)}
        lm_to_save, v_head = full.lm, full.v_head
        before_line = (self.run_dir / "samples_before.txt").read_text().splitlines()[0]
        before = float(before_line.rsplit(":", 1)[1])
        final = self.run_dir / "final"
        final.mkdir(exist_ok=True)
        from transformers.utils import logging as hf_logging

        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a one-shard "Writing model shards" bar is noise under our own bar
        try:
            lm_to_save.save_pretrained(final)
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()
        self.tokenizer.save_pretrained(final)
        ckpt_io.save_module(v_head, final / "value_head.safetensors")
        hist = self.metrics.history
        k = max(len(hist) // 10, 1)
        first = sum(h["reward_mean"] for h in hist[:k]) / k
        last = sum(h["reward_mean"] for h in hist[-k:]) / k
        kl_last = sum(h["kl"] for h in hist[-k:]) / k
        kl_max = max(h["kl"] for h in hist)
        if cfg.plot and hist:
            plot_curves(hist, self.run_dir / "curves.png",
                        title=f"fastppo train ({cfg.task}): reward {first:.3f} -> {last:.3f}")
        summary = {
            "steps": self.step, "reward_first_10pct": first, "reward_last_10pct": last, "kl_last_10pct": kl_last,
            "kl_max": kl_max, "greedy_score_before": before, "greedy_score_after": after,
            "train_seconds_this_process": seconds, "run_dir": str(self.run_dir),
        }
        ckpt_io.write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
        return summary
