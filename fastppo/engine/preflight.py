"""Checks a run passes before any model is built or trained: the kernel backend is usable on the run's device,
and a resumed run's ``config.yaml`` still describes the run its checkpoint belongs to.

A resumed run continues exactly (bitwise on CPU) only if nothing that shapes the trajectory changes. Editing
``RUN/config.yaml`` between a kill and ``--resume`` is therefore refused, naming the changed fields, except for
the fields in ``RESUME_MUTABLE``: they change how long the run goes and what it writes, not the steps it takes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastppo.engine import checkpoint as ckpt_io
from fastppo.engine.config import ConfigError, PPOConfig

# Fields a resumed run may change (they take effect, and the next checkpoint records them):
#   total_steps       extend (or shorten, not below the checkpoint's step) the run; a linear/cosine LR schedule is
#                     re-planned over the new total from the current update on
#   save_every, keep_checkpoints, progress, tensorboard, plot   checkpointing and reporting only
#   output_dir        the run directory may have been moved or renamed
RESUME_MUTABLE = ("total_steps", "save_every", "keep_checkpoints", "progress", "tensorboard", "plot", "output_dir")

# The fused-op families the engine calls (ppo_loss_from_logits / logprobs_and_entropy / gae).
_ENGINE_FAMILIES = ("logprobs", "ppo_loss", "gae")


def check_backend(cfg: PPOConfig, device: torch.device) -> None:
    """Raise ``ConfigError`` when ``cfg.backend`` cannot run the engine's ops on ``device`` (before the warm-up,
    not at the first PPO step)."""
    from fastppo._dispatch import BackendUnavailableError, resolve

    for family in _ENGINE_FAMILIES:
        try:
            resolve(cfg.backend, device, family)
        except BackendUnavailableError as exc:
            raise ConfigError(f"backend={cfg.backend!r} on device {device}: {exc}") from None


def resume_changes(saved: dict[str, Any], cfg: PPOConfig, step: int) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved, now)}`` for the allowed changes; ``ConfigError`` naming any other changed field.

    ``saved`` is the config recorded in the checkpoint; a field it lacks (a checkpoint older than the field)
    counts as its default.
    """
    now, default = cfg.to_dict(), PPOConfig().to_dict()
    changed = {k: (saved.get(k, default[k]), v) for k, v in now.items() if saved.get(k, default[k]) != v}
    refused = sorted(k for k in changed if k not in RESUME_MUTABLE)
    if refused:
        detail = ", ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused)
        raise ConfigError(
            f"cannot resume: config.yaml differs from the config of the checkpoint in {refused} ({detail}); a "
            f"resumed run continues exactly only with the same config. Only {', '.join(RESUME_MUTABLE)} may "
            "change on resume; undo the other edits, or start a new run"
        )
    if cfg.total_steps < step:
        raise ConfigError(f"cannot resume: total_steps={cfg.total_steps} is below the checkpoint's step {step}")
    return {k: changed[k] for k in changed if k != "output_dir"}


def resume_point(cfg: PPOConfig, run_dir: Path, echo: Callable[..., Any] = print) -> Path:
    """The checkpoint a resumed run starts from (the newest valid one), after checking ``cfg`` against it."""
    path = ckpt_io.latest_checkpoint(run_dir)
    state = json.loads((path / "state.json").read_text())  # verified by latest_checkpoint
    changes = resume_changes(state.get("config", {}), cfg, int(state["step"]))
    if changes:
        echo("resume: config changes applied: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    return path
