"""``fastppo train [--config FILE] [--field value ...]`` and ``fastppo train --resume RUN_DIR``."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from fastppo.engine.checkpoint import CheckpointError, write_text_atomic
from fastppo.engine.config import ConfigError, PPOConfig, from_dict, help_text, load_yaml, parse_overrides

if TYPE_CHECKING:  # the trainer pulls in transformers: imported only when a run starts
    from fastppo.engine.trainer import StepCallback

USAGE = """usage: fastppo train [--config FILE.yaml] [--field value ...] [--nproc N]
       fastppo train --resume RUN_DIR [--nproc N]
       torchrun --nproc_per_node N [--nnodes M --rdzv_endpoint HOST:PORT ...] -m fastppo train ...

With no arguments: the embedded default (a tiny Llama learns to reverse digit strings: supervised warm-up on
noisy demonstrations, then PPO against a verifier with an adaptive KL penalty to the warm-up model; about
1-2 minutes on a 2-core CPU).
Writes RUN_DIR (default runs/<timestamp>): config.yaml, metrics.jsonl, tensorboard/, curves.png,
samples_before.txt / samples_after.txt, checkpoints/, final/, summary.json.
--nproc N runs N data-parallel processes on this machine (it starts torchrun for you; FSDP2 over gloo on CPU, NCCL
on GPUs); the global batch and the results do not depend on N. Several nodes: call torchrun yourself.
--resume continues from the newest valid checkpoint (a corrupt newer one is skipped with a warning) with
RUN_DIR/config.yaml, which may differ from the checkpoint's config only in: {mutable}.

fields (YAML keys and --field overrides):
"""


def _pop_option(argv: list[str], name: str) -> str | None:
    for i, tok in enumerate(argv):
        if tok == name:
            if i + 1 >= len(argv):
                raise ConfigError(f"{name} needs a value")
            val = argv[i + 1]
            del argv[i: i + 2]
            return val
        if tok.startswith(name + "="):
            del argv[i]
            return tok.split("=", 1)[1]
    return None


def build_config(argv: list[str]) -> tuple[PPOConfig, Path, bool]:
    """Parse the train arguments into ``(config, run_dir, resume)``; raises ``ConfigError`` on bad input."""
    argv = list(argv)
    resume = _pop_option(argv, "--resume")
    cfg_file = _pop_option(argv, "--config")
    if resume is not None:
        if cfg_file is not None or argv:
            raise ConfigError("--resume RUN_DIR takes no other arguments: the run continues with its saved config")
        run_dir = Path(resume)
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise CheckpointError(f"cannot resume {resume!r}: {saved} is missing (not a fastppo run directory?)")
        cfg = load_yaml(saved).validate()
        return cfg, run_dir, True
    cfg = load_yaml(cfg_file) if cfg_file is not None else PPOConfig()
    cfg = from_dict(parse_overrides(argv), cfg).validate()
    run_dir = Path(cfg.output_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise ConfigError(f"{run_dir} already holds checkpoints: use --resume {run_dir} or another --output_dir")
    cfg.output_dir = str(run_dir)
    return cfg, run_dir, False


def _launch_torchrun(nproc: int, argv: list[str]) -> int:
    """``fastppo train --nproc N ...``: the same command under ``torchrun --standalone --nproc_per_node N``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "fastppo", "train", *argv]
    return subprocess.call(cmd)


def main(argv: list[str], *, on_step_end: Sequence[StepCallback] = ()) -> int:
    """``fastppo train ARGS``; ``on_step_end`` is passed to ``PPOTrainer.train`` (in this process only: not to the
    processes that ``--nproc`` starts)."""
    if any(a in ("-h", "--help") for a in argv):
        from fastppo.engine.preflight import RESUME_MUTABLE

        print(USAGE.format(mutable=", ".join(RESUME_MUTABLE)) + help_text())
        return 0
    from fastppo.engine.distributed_launch import launched_by_torchrun

    argv = list(argv)
    try:
        nproc = _pop_option(argv, "--nproc")
        if nproc is not None and (not nproc.isdigit() or int(nproc) < 1):
            raise ConfigError(f"--nproc expects a number of processes >= 1, got {nproc!r}")
        if nproc is not None and int(nproc) > 1 and launched_by_torchrun():
            raise ConfigError("--nproc starts torchrun itself: under torchrun, set --nproc_per_node instead")
        cfg, run_dir, resume = build_config(argv)
    except (ConfigError, CheckpointError) as exc:
        print(f"fastppo train: error: {exc}", file=sys.stderr)
        return 2
    if nproc is not None and int(nproc) > 1:
        if on_step_end:
            raise ValueError("on_step_end callbacks cannot reach the processes that --nproc starts: start them "
                             "under torchrun yourself")
        return _launch_torchrun(int(nproc), argv)
    if launched_by_torchrun():
        from torch.distributed.elastic.multiprocessing.errors import record

        # record: an exception on any rank is written where torchrun reports it as the run's root cause
        return record(_run)(cfg, run_dir, resume, True, on_step_end)
    return _run(cfg, run_dir, resume, False, on_step_end)


def _run(cfg: PPOConfig, run_dir: Path, resume: bool, distributed: bool,
         on_step_end: Sequence[StepCallback] = ()) -> int:
    from fastppo.engine.trainer import PPOTrainer

    t0 = time.perf_counter()
    ctx = None
    try:
        if distributed:
            from fastppo.engine import distributed as dist_mod

            ctx = dist_mod.init(cfg)
            if not resume:
                # rank 0's run directory (a default one is named by a timestamp that may differ across ranks)
                run_dir = Path(ctx.broadcast_object(str(run_dir)))
                cfg.output_dir = str(run_dir)
            ctx.check_same_config(cfg)  # first: every later check then fails the same way on every rank
            dist_mod.check_config(cfg, ctx.world)
        is_main = ctx is None or ctx.is_main
        if not resume and is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if is_main:
            procs = f" on {ctx.world} processes" if ctx is not None else ""
            print(f"fastppo train: run dir {run_dir}{' (resuming)' if resume else ''}{procs}", flush=True)
        trainer = PPOTrainer(cfg, run_dir, resume=resume, ctx=ctx)
        summary = trainer.train(on_step_end=on_step_end)
    except (ConfigError, CheckpointError) as exc:
        rank = f" (rank {ctx.rank})" if ctx is not None else ""
        print(f"fastppo train: error{rank}: {exc}", file=sys.stderr)
        return 2
    finally:
        if ctx is not None:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    if ctx is not None and not ctx.is_main:
        return 0
    wall = time.perf_counter() - t0
    print(
        f"fastppo train: done {summary['steps']} PPO steps in {wall:.0f}s | mean reward first 10% of steps "
        f"{summary['reward_first_10pct']:.3f} -> last 10% {summary['reward_last_10pct']:.3f} | KL to reference "
        f"(last 10%) {summary['kl_last_10pct']:.3f}, max {summary['kl_max']:.3f} | greedy held-out score "
        f"{summary['greedy_score_before']:.3f} -> {summary['greedy_score_after']:.3f} | {run_dir}",
        flush=True,
    )
    return 0
