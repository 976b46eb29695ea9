"""The checkpoint commit protocol on small modules (seconds, no training): pruning after a resume past a corrupt
newer checkpoint, re-saving a step, leftovers of an interrupted save."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastppo.engine import checkpoint as ckpt_io


def _flip_a_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _save(run: Path, step: int, keep: int, lin: torch.nn.Module | None = None) -> Path:
    lin = lin if lin is not None else torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(lin.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    return ckpt_io.save_checkpoint(run, step, policy=lin, critic=None, optimizer=opt, scheduler=sched,
                                   state={"data_position": step}, metrics=[{"step": step}], keep=keep)


def test_save_after_resuming_past_a_corrupt_newer_checkpoint_survives_pruning(tmp_path):
    _save(tmp_path, 2, keep=2)
    _save(tmp_path, 4, keep=2)
    _flip_a_byte(tmp_path / "checkpoints/step_000004/policy.safetensors")
    with pytest.warns(ckpt_io.CheckpointWarning, match=r"step_000004: policy.safetensors is corrupt.*step_000002"):
        assert ckpt_io.latest_checkpoint(tmp_path).name == "step_000002"
    final = _save(tmp_path, 3, keep=1)
    assert final.is_dir()
    assert [s for s, _ in ckpt_io.checkpoint_dirs(tmp_path)] == [3, 4]  # step 2 pruned, step 3 kept
    with pytest.warns(ckpt_io.CheckpointWarning, match="step_000004"):
        assert ckpt_io.latest_checkpoint(tmp_path) == final


def test_resaving_a_step_replaces_it_and_leaves_no_temporaries(tmp_path):
    first = torch.nn.Linear(2, 2)
    _save(tmp_path, 1, keep=3, lin=first)
    # leftovers of a save killed before its rename: ignored by resume, cleared by the next save of that step
    (tmp_path / "checkpoints/.tmp-step_000001").mkdir()
    (tmp_path / "checkpoints/.tmp-step_000001/policy.safetensors").write_bytes(b"partial")
    second = torch.nn.Linear(2, 2)
    path = _save(tmp_path, 1, keep=3, lin=second)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]
    manifest = ckpt_io.verify(path)
    assert manifest["step"] == 1 and "policy.safetensors" in manifest["files"]
    assert list(json.loads((path / ckpt_io.MANIFEST).read_text())) == ["step", "files"]
    restored = torch.nn.Linear(2, 2)
    ckpt_io.load_module(restored, path / "policy.safetensors")
    assert torch.equal(restored.weight, second.weight)
