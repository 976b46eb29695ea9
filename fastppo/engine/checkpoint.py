"""Atomic checkpoints: everything a run needs to continue exactly.

Layout: ``RUN_DIR/checkpoints/step_000050/`` holding

  policy.safetensors      policy LM + value head (safetensors)
  critic.safetensors      separate critic, when critic=separate
  optimizer.pt            AdamW state (tensors only: loads with weights_only=True)
  scheduler.pt            LR scheduler state
  rng.safetensors         torch CPU (and CUDA) generator states
  state.json              step, data position, KL controller, python/numpy RNG states
  metrics.jsonl           every step's metrics so far
  manifest.json           sha256 + size of every file above; written last

A checkpoint is written into ``.tmp-step_N`` next to the others, every file fsynced, the manifest last, then the
directory is renamed into place (``os.replace``) and its parent fsynced. A crash at any moment leaves either the
complete new checkpoint or none; older checkpoints are pruned (keep the last K) only after the new one is in
place. Loading verifies the manifest, so a truncated or edited file is a clear error, never a silent resume;
resuming skips such a checkpoint (with a warning naming it) for the newest valid one.

That protocol (``begin_checkpoint`` / ``commit_checkpoint``) is the same for the sharded checkpoints of
multi-process runs (``engine/distributed.py``): every process writes its files into the staging directory, then
one process commits it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

_STEP_RE = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    """Flush one file's data to disk (for a file written by another library, e.g. ``torch.save``)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ------------------------------------------------------------------------------------------------ RNG states
def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(json-able python/numpy states, tensors for torch generators)``."""
    py = random.getstate()
    npy = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return meta, tensors


def set_rng_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = meta["numpy"]
    np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------------- saving
def checkpoint_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoints (renamed into place), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """Where checkpoint ``step`` lives once committed: ``RUN_DIR/checkpoints/step_N``."""
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def staging_dir(run_dir: str | Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before its commit (never read on resume)."""
    final = checkpoint_dir(run_dir, step)
    return final.with_name(f".tmp-{final.name}")


def begin_checkpoint(run_dir: str | Path, step: int) -> Path:
    """An empty ``staging_dir`` for checkpoint ``step``'s files; ``commit_checkpoint`` once every file is written.
    In a multi-process run one process calls this, and the others wait for it before writing theirs."""
    tmp = staging_dir(run_dir, step)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)  # a leftover of a crash during an earlier attempt at this step
    tmp.mkdir()
    return tmp


def commit_checkpoint(run_dir: str | Path, step: int, *, keep: int, meta: dict[str, Any] | None = None) -> Path:
    """Make the staged ``begin_checkpoint`` directory of ``step`` the checkpoint ``checkpoints/step_N``.

    Every file under it (subdirectories included) is fsynced, then ``manifest.json`` (``step``, ``meta``, sha256
    and size of every file) is written last, as the completed-marker, then the directory is renamed into place
    and its parent fsynced: a crash at any moment leaves either the complete new checkpoint or none. An existing
    checkpoint of the same step is replaced, and deleted only once the new one is in place. Then checkpoints are
    pruned to the last ``keep`` among this step and older ones. In a multi-process run one process calls this,
    after every process has written its files.
    """
    final, tmp = checkpoint_dir(run_dir, step), staging_dir(run_dir, step)
    root = final.parent
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    for name in files:
        fsync_file(tmp / name)
    manifest = {name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size} for name in files}
    with open(tmp / MANIFEST, "w") as f:
        json.dump({"step": step, **(meta or {}), "files": manifest}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for d in sorted((p for p in tmp.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        _fsync_dir(d)
    _fsync_dir(tmp)
    if final.exists():
        # Re-saving a step (e.g. the final save after a periodic one): move the old copy aside first, so the
        # rename below never targets a non-empty directory, and delete it only once the new one is in place.
        old = final.with_name(f".old-{final.name}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    # Prune among this step and older ones only: after a resume that skipped a corrupt newer checkpoint, that
    # one must never count among the kept ones (it would displace the good one just written).
    for _, path in [c for c in checkpoint_dirs(run_dir) if c[0] <= step][:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    policy: torch.nn.Module,
    critic: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    metrics: list[dict[str, Any]],
    keep: int,
) -> Path:
    """A single-process checkpoint (safetensors, see the module docstring), committed by ``commit_checkpoint``."""
    tmp = begin_checkpoint(run_dir, step)
    save_model(policy, str(tmp / "policy.safetensors"))
    if critic is not None:
        save_model(critic, str(tmp / "critic.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    rng_meta, rng_tensors = rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "rng": rng_meta}))
    write_metrics(tmp, metrics)
    return commit_checkpoint(run_dir, step, keep=keep)


def write_metrics(ckpt_dir: Path, metrics: list[dict[str, Any]]) -> None:
    """``metrics.jsonl`` of a checkpoint: every step's metrics so far."""
    (ckpt_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


def read_metrics(ckpt: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------- loading
def verify(ckpt: Path) -> dict[str, Any]:
    """Check the manifest and every file's size and hash; raise ``CheckpointError`` naming what is wrong."""
    man_path = ckpt / MANIFEST
    if not man_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: {MANIFEST} is missing")
    try:
        manifest = json.loads(man_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt}: {MANIFEST} is corrupt ({exc})") from None
    for name, info in files.items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is missing {name}")
        if path.stat().st_size != info["bytes"] or _sha256(path) != info["sha256"]:
            raise CheckpointError(f"checkpoint {ckpt}: {name} is corrupt (size/sha256 differ from {MANIFEST})")
    # multi-process runs write sharded checkpoints (torch.distributed.checkpoint, see engine/distributed.py)
    needs = ("dcp/.metadata", "scheduler.pt", "state.json") if manifest.get("format") == "dcp" else \
        ("policy.safetensors", "optimizer.pt", "scheduler.pt", "rng.safetensors", "state.json")
    for need in needs:
        if need not in files:
            raise CheckpointError(f"checkpoint {ckpt} does not list {need} in its manifest")
    return manifest


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped on resume because it is corrupt or incomplete."""


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest checkpoint of ``run_dir`` that passes ``verify``.

    A newer one that fails (a disk error, a hand-edited file) is skipped with a ``CheckpointWarning`` naming it
    and why, so the run resumes from the last good state instead of stopping; ``CheckpointError`` when no
    checkpoint exists yet, or when none is valid (the message lists each one's problem).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {str(run_dir)!r} does not exist")
    ckpts = checkpoint_dirs(run_dir)
    if not ckpts:
        raise CheckpointError(
            f"no checkpoint exists yet in {run_dir} (no complete checkpoints/step_*/; the run stopped before its "
            "first save, e.g. during the warm-up): nothing to resume, start a new run"
        )
    problems = []
    for _, path in reversed(ckpts):
        try:
            verify(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        for problem in problems:
            warnings.warn(f"skipping a corrupt checkpoint: {problem}; resuming from {path} instead",
                          CheckpointWarning, stacklevel=2)
        return path
    raise CheckpointError(f"no valid checkpoint in {run_dir}: " + "; ".join(problems))


def check_format(ckpt: Path, *, multi_process: bool) -> None:
    """Single-process runs write safetensors checkpoints, multi-process runs sharded DCP ones; neither kind of run
    resumes the other's (checked before any model is built, with what to do instead)."""
    manifest = json.loads((ckpt / MANIFEST).read_text())
    sharded = manifest.get("format") == "dcp"
    if sharded and not multi_process:
        raise CheckpointError(
            f"checkpoint {ckpt} was written by a {manifest.get('world_size')}-process run (sharded, "
            "torch.distributed.checkpoint); a single process cannot resume it: resume with "
            "fastppo train --resume RUN_DIR --nproc N (N >= 2, any N)")
    if multi_process and not sharded:
        raise CheckpointError(
            f"checkpoint {ckpt} was written by a single-process run (safetensors); a multi-process run cannot "
            "resume it: resume it with one process (fastppo train --resume RUN_DIR)")


def load_checkpoint(
    ckpt: Path,
    *,
    policy: torch.nn.Module,
    critic: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    verified: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Restore modules, optimizer, scheduler and RNG states in place; returns ``(state, metrics)``.
    ``verified``: ``ckpt`` was just checked by ``verify`` / ``latest_checkpoint`` (skip hashing it again)."""
    if not verified:
        verify(ckpt)
    check_format(ckpt, multi_process=False)
    _load_module(policy, ckpt / "policy.safetensors")
    if critic is not None:
        if not (ckpt / "critic.safetensors").is_file():
            raise CheckpointError(f"checkpoint {ckpt} has no critic.safetensors but the config uses a separate critic")
        _load_module(critic, ckpt / "critic.safetensors")
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    state = json.loads((ckpt / "state.json").read_text())
    set_rng_state(state.pop("rng"), load_file(str(ckpt / "rng.safetensors")))
    return state, read_metrics(ckpt)


def _load_module(module: torch.nn.Module, path: Path) -> None:
    try:
        missing, unexpected = load_model(module, str(path), strict=False)
    except Exception as exc:  # safetensors raises several types for damaged headers
        raise CheckpointError(f"cannot load {path}: {exc}") from None
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the model: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")


def save_module(module: torch.nn.Module, path: Path) -> None:
    """Write one module's weights atomically (temp file, fsync, rename)."""
    tmp = path.with_name(f".tmp-{path.name}")
    save_model(module, str(tmp))
    fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def load_module(module: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    _load_module(module, path)
