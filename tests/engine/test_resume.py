"""Checkpoints: a run SIGKILLed after its first checkpoint and resumed ends bitwise equal to an uninterrupted run;
damaged or missing checkpoints give clear errors; a failed save leaves the previous checkpoints intact."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fastppo.engine import checkpoint as ckpt_io
from fastppo.engine import cli
from tests.engine.tiny import tiny_config

TIMING_KEYS = ("tokens_per_s", "time_generation", "time_experience", "time_update", "time_step")
REPO = Path(__file__).resolve().parents[2]


def _train(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "fastppo.cli", "train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    cfg = tiny_config(total_steps=8, save_every=2, keep_checkpoints=2, tensorboard=True).to_dict()
    cfg.pop("output_dir")
    conf = tmp / "tiny.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    full, killed = tmp / "full", tmp / "killed"
    # both at once: two cores; the killed one sleeps between steps so the kill lands mid-run
    pa = _train(["--config", str(conf), "--output_dir", str(full)])
    pb = _train(["--config", str(conf), "--output_dir", str(killed)], {"FASTPPO_TEST_STEP_DELAY": "0.4"})
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "step_000002").is_dir():
        assert pb.poll() is None, f"run ended before its first checkpoint:\n{pb.stdout.read()}"
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.02)
    pb.send_signal(signal.SIGKILL)
    pb.wait()
    assert pb.returncode == -signal.SIGKILL
    assert not (killed / "summary.json").exists()
    steps_at_kill = len((killed / "metrics.jsonl").read_text().splitlines())
    assert steps_at_kill < 8
    out_a, _ = pa.communicate(timeout=300)
    assert pa.returncode == 0, out_a
    pr = _train(["--resume", str(killed)])
    out_r, _ = pr.communicate(timeout=300)
    assert pr.returncode == 0, out_r
    assert "resumed from" in out_r
    return full, killed


def test_resume_after_sigkill_equals_uninterrupted_run(killed_and_resumed):
    full, killed = killed_and_resumed
    for rel in ("final/model.safetensors", "checkpoints/step_000008/policy.safetensors"):
        a, b = load_file(str(full / rel)), load_file(str(killed / rel))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{rel}:{k} differs"
    oa = torch.load(full / "checkpoints/step_000008/optimizer.pt", weights_only=True)
    ob = torch.load(killed / "checkpoints/step_000008/optimizer.pt", weights_only=True)
    for i, st in oa["state"].items():
        for k, v in st.items():
            assert torch.equal(v, ob["state"][i][k])
    ma, mb = _metrics(full), _metrics(killed)
    assert [m["step"] for m in ma] == list(range(1, 9))
    assert ma == mb
    assert (killed / "samples_after.txt").read_text() == (full / "samples_after.txt").read_text()
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (full, killed))
    assert sa["reward_last_10pct"] == sb["reward_last_10pct"]
    # keep_checkpoints=2
    assert [p.name for p in sorted((killed / "checkpoints").iterdir())] == ["step_000006", "step_000008"]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_corrupt_checkpoint_is_a_clear_error(killed_and_resumed, tmp_path, capsys):
    run = _copy(killed_and_resumed[1], tmp_path / "run")
    f = run / "checkpoints/step_000008/policy.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    assert cli.main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "policy.safetensors is corrupt" in err and "step_000008" in err


def test_missing_checkpoint_file_is_a_clear_error(killed_and_resumed, tmp_path, capsys):
    run = _copy(killed_and_resumed[1], tmp_path / "run")
    (run / "checkpoints/step_000008/optimizer.pt").unlink()
    assert cli.main(["--resume", str(run)]) == 2
    assert "is missing optimizer.pt" in capsys.readouterr().err
    (run / "checkpoints/step_000008/manifest.json").unlink()
    assert cli.main(["--resume", str(run)]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err
    shutil.rmtree(run / "checkpoints")
    assert cli.main(["--resume", str(run)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    (run / "reference.safetensors").unlink()
    assert cli.main(["--resume", str(run)]) == 2
    assert "reference.safetensors is missing" in capsys.readouterr().err


def test_new_run_refuses_a_dir_with_checkpoints(killed_and_resumed, capsys):
    assert cli.main(["--output_dir", str(killed_and_resumed[1])]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


def test_failed_save_leaves_previous_checkpoints_intact(tmp_path, monkeypatch):
    from fastppo.engine.trainer import PPOTrainer

    tr = PPOTrainer(tiny_config(total_steps=1), tmp_path, echo=lambda *a: None)
    tr.train()  # saves step_000001
    before = (tmp_path / "checkpoints/step_000001/policy.safetensors").read_bytes()
    tr.step = 2

    def boom(path):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_io, "_sha256", boom)
    with pytest.raises(OSError, match="simulated"):
        tr.save()
    monkeypatch.undo()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "step_000002" not in names and "step_000001" in names  # only a .tmp- leftover, ignored on resume
    assert [s for s, _ in ckpt_io.checkpoint_dirs(tmp_path)] == [1]
    assert (tmp_path / "checkpoints/step_000001/policy.safetensors").read_bytes() == before
    ckpt_io.verify(tmp_path / "checkpoints/step_000001")
