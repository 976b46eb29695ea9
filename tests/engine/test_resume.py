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
from tests.engine.tiny import quiet, run_metrics, tiny_config

REPO = Path(__file__).resolve().parents[2]


def _train(args: list[str], step_delay: float | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # with a step delay: the same command through the fault-injection entry point (see train_with_faults.py)
    cmd = ["fastppo.cli", "train"] if step_delay is None else ["tests.engine.train_with_faults", "--step-delay",
                                                               str(step_delay)]
    return subprocess.Popen([sys.executable, "-m", *cmd, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


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
    pb = _train(["--config", str(conf), "--output_dir", str(killed)], step_delay=0.4)
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
    ma, mb = run_metrics(full), run_metrics(killed)
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


def _flip_a_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def test_corrupt_latest_checkpoint_falls_back_to_the_newest_valid_one(killed_and_resumed, tmp_path, capsys):
    full = killed_and_resumed[0]
    run = _copy(killed_and_resumed[1], tmp_path / "run")
    _flip_a_byte(run / "checkpoints/step_000008/policy.safetensors")
    with pytest.warns(ckpt_io.CheckpointWarning, match=r"step_000008: policy.safetensors is corrupt.*step_000006"):
        assert cli.main(["--resume", str(run)]) == 0
    assert "resumed from" in capsys.readouterr().out and "step_000006" in str(ckpt_io.checkpoint_dirs(run))
    # steps 7-8 were redone from step 6: the same bits as the uninterrupted run, and a valid step_000008 again
    a, b = load_file(str(full / "final/model.safetensors")), load_file(str(run / "final/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert run_metrics(run) == run_metrics(full)
    ckpt_io.verify(run / "checkpoints/step_000008")
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_000006", "step_000008"]


def test_a_corrupt_newer_checkpoint_never_displaces_the_good_one(killed_and_resumed, tmp_path):
    # After falling back from a corrupt step_000008 to step_000006, saving step 7 with keep_checkpoints=1 must keep
    # step 7 (pruning counts checkpoints up to the saved step only), not the corrupt step 8.
    run = _copy(killed_and_resumed[1], tmp_path / "run")
    _flip_a_byte(run / "checkpoints/step_000008/optimizer.pt")
    lin = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(lin.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    ckpt_io.save_checkpoint(run, 7, policy=lin, critic=None, optimizer=opt, scheduler=sched, state={}, metrics=[],
                            keep=1)
    assert [s for s, _ in ckpt_io.checkpoint_dirs(run)] == [7, 8]
    with pytest.warns(ckpt_io.CheckpointWarning, match="step_000008: optimizer.pt is corrupt"):
        assert ckpt_io.latest_checkpoint(run).name == "step_000007"


def test_no_valid_or_no_checkpoint_is_a_clear_error(killed_and_resumed, tmp_path, capsys):
    run = _copy(killed_and_resumed[1], tmp_path / "run")
    _flip_a_byte(run / "checkpoints/step_000008/policy.safetensors")
    (run / "checkpoints/step_000006/optimizer.pt").unlink()
    assert cli.main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "no valid checkpoint" in err and "step_000008: policy.safetensors is corrupt" in err
    assert "step_000006 is missing optimizer.pt" in err
    (run / "checkpoints/step_000006/manifest.json").unlink()
    assert cli.main(["--resume", str(run)]) == 2
    assert "step_000006 is incomplete: manifest.json is missing" in capsys.readouterr().err
    # killed during the warm-up: config.yaml (and maybe a reference) but no checkpoint yet
    shutil.rmtree(run / "checkpoints")
    (run / "reference.safetensors").unlink()
    assert cli.main(["--resume", str(run)]) == 2
    assert f"no checkpoint exists yet in {run}" in capsys.readouterr().err


def test_resume_refuses_config_edits_except_the_allowed_ones(killed_and_resumed, tmp_path, capsys):
    run = _copy(killed_and_resumed[1], tmp_path / "run")
    saved = yaml.safe_load((run / "config.yaml").read_text())

    def edit(**changes):
        (run / "config.yaml").write_text(yaml.safe_dump({**saved, **changes}, sort_keys=False))

    edit(lr=saved["lr"] * 2)
    assert cli.main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "differs from the config of the checkpoint in ['lr']" in err and "total_steps" in err
    edit(batch_size=16, seed=1, lr="1e-3")
    assert cli.main(["--resume", str(run)]) == 2
    assert "in ['batch_size', 'lr', 'seed']" in capsys.readouterr().err
    edit(total_steps=7)
    assert cli.main(["--resume", str(run)]) == 2
    assert "total_steps=7 is below the checkpoint's step 8" in capsys.readouterr().err
    # allowed: one more step, saved every step; it takes effect and the checkpoint records it
    edit(total_steps=9, save_every=1, output_dir=str(tmp_path / "elsewhere"))
    assert cli.main(["--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "config changes applied: total_steps 8 -> 9, save_every 2 -> 1" in out
    assert [m["step"] for m in run_metrics(run)] == list(range(1, 10))
    state = json.loads((run / "checkpoints/step_000009/state.json").read_text())
    assert state["config"]["total_steps"] == 9 and state["config"]["save_every"] == 1
    assert json.loads((run / "summary.json").read_text())["steps"] == 9


def test_new_run_refuses_a_dir_with_checkpoints(killed_and_resumed, capsys):
    assert cli.main(["--output_dir", str(killed_and_resumed[1])]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


def test_failed_save_leaves_previous_checkpoints_intact(tmp_path, monkeypatch):
    from fastppo.engine.trainer import PPOTrainer

    tr = PPOTrainer(tiny_config(total_steps=1), tmp_path, echo=quiet)
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
