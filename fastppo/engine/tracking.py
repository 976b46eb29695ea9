"""Where metrics go: ``metrics.jsonl`` (one line per step), TensorBoard event files, and the final PNG plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fastppo.engine.checkpoint import write_text_atomic

PLOTTED = (
    ("reward_mean", "reward (score mean)"),
    ("kl", "KL to reference (per sequence)"),
    ("entropy", "entropy (per token)"),
    ("value_loss", "value loss"),
    ("clipfrac", "clip fraction"),
    ("response_length", "response length"),
)


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool, history: list[dict[str, Any]] | None = None) -> None:
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.history: list[dict[str, Any]] = list(history or [])
        # On resume the file may hold steps logged after the checkpoint by the killed run: rewrite it from the
        # checkpoint's history so it matches an uninterrupted run line for line.
        write_text_atomic(self.path, "".join(json.dumps(m) + "\n" for m in self.history))
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            last = self.history[-1]["step"] if self.history else 0
            # purge_step drops events the killed run wrote past the checkpoint
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=last + 1 if self.history else None)

    def log(self, metrics: dict[str, Any]) -> None:
        self.history.append(metrics)
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            step = metrics["step"]
            for key, val in metrics.items():
                if key != "step" and isinstance(val, (int, float)) and math.isfinite(val):
                    self.writer.add_scalar(_tb_name(key), val, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


class MemoryLog:
    """The metrics history kept in memory only: ranks other than 0 of a multi-process run (rank 0 writes the
    files)."""

    def __init__(self, history: list[dict[str, Any]] | None = None) -> None:
        self.history = list(history or [])

    def log(self, metrics: dict[str, Any]) -> None:
        self.history.append(metrics)

    def close(self) -> None:
        pass


def _tb_name(key: str) -> str:
    if key.startswith("time_") or key == "tokens_per_s":
        return f"perf/{key}"
    if key in ("reward_mean", "reward_std", "score_max", "response_length"):
        return f"env/{key}"
    return f"ppo/{key}"


def plot_curves(history: list[dict[str, Any]], path: Path, title: str = "fastppo train") -> None:
    """reward / KL / entropy / value loss / clipfrac / response length against the PPO step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in history]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, label) in zip(axes.flat, PLOTTED, strict=False):
        ys = [m.get(key, float("nan")) for m in history]
        ax.plot(steps, ys, lw=1.0, alpha=0.5, color="tab:blue")
        if len(ys) >= 10:
            w = max(len(ys) // 15, 3)
            smooth = [sum(ys[max(0, i - w + 1): i + 1]) / len(ys[max(0, i - w + 1): i + 1]) for i in range(len(ys))]
            ax.plot(steps, smooth, lw=2.0, color="tab:red", label=f"moving mean ({w})")
            ax.legend(fontsize=8)
        if key == "kl" and any("kl_coef" in m for m in history):
            twin = ax.twinx()  # the (adaptive) coefficient that holds the KL in check
            twin.plot(steps, [m.get("kl_coef", float("nan")) for m in history], lw=1.2, ls="--", color="tab:green")
            twin.set_ylabel("kl_coef (dashed)", color="tab:green", fontsize=8)
            twin.tick_params(axis="y", labelsize=7, colors="tab:green")
        ax.set_title(label)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    tmp.replace(path)
