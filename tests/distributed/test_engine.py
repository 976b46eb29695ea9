"""Data-parallel PPO for real: torchrun, 2 gloo processes, FSDP2, DCP checkpoints.

One module-scoped set of runs (started concurrently; process start-up is the slow part):
  single   one process                                         (the reference for world-size invariance)
  full     2 processes (fastppo train --nproc 2), uninterrupted (the reference for resume)
  killed   2 processes, rank 1 SIGKILLed after the step-2 checkpoint, then resumed with 2 processes
  reshard  a copy of the killed run resumed with 1 torchrun process (DCP reshards 2 -> 1)
  failing  2 processes, rank 1 raises after its first step
"""

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

from tests.engine.tiny import run_metrics, tiny_config

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _torchrun(nproc: int, args: list[str], faults: list[str] | None = None) -> subprocess.Popen:
    """``fastppo train args`` under torchrun; with ``faults`` (flags of ``tests/engine/train_with_faults.py``)
    through that fault-injection entry point instead."""
    entry = ["tests.engine.train_with_faults", *faults] if faults else ["fastppo", "train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", *entry, *args]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _single(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fastppo", "train", *args], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(p: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = p.communicate(timeout=timeout)
    return out


def _worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker process with ``RANK=rank`` (its direct child)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == launcher and f"RANK={rank}\0".encode() in (d / "environ").read_bytes():
                return int(d.name)
        except (OSError, IndexError, ValueError):
            continue
    return None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    cfg = tiny_config(total_steps=4, save_every=2, keep_checkpoints=2, sft_steps=5, eval_prompts=4).to_dict()
    cfg.pop("output_dir")
    conf = tmp / "tiny.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    r = {name: tmp / name for name in ("single", "full", "killed", "reshard", "failing")}
    ps = _single(["--config", str(conf), "--output_dir", str(r["single"])])
    pf = _single(["--config", str(conf), "--output_dir", str(r["full"]), "--nproc", "2"])  # the shorthand
    pk = _torchrun(2, ["--config", str(conf), "--output_dir", str(r["killed"])], ["--step-delay", "1.0"])
    deadline = time.monotonic() + 240
    while not (r["killed"] / "checkpoints" / "step_000002").is_dir():
        assert pk.poll() is None, f"run ended before its first checkpoint:\n{pk.stdout.read()}"
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.05)
    victim = _worker_pid(pk.pid, 1)
    assert victim is not None, "rank 1's process not found"
    os.kill(victim, signal.SIGKILL)
    t_kill = time.monotonic()
    out_k = _finish(pk, 120)
    killed_exit_s = time.monotonic() - t_kill
    assert pk.returncode != 0, out_k
    assert not (r["killed"] / "summary.json").exists()
    shutil.copytree(r["killed"], r["reshard"])
    # resume the killed run (2 processes), resume its copy on 1 process, and a run whose rank 1 fails
    pr = _torchrun(2, ["--resume", str(r["killed"])])
    p1 = _torchrun(1, ["--resume", str(r["reshard"])])
    t_fail = time.monotonic()
    px = _torchrun(2, ["--config", str(conf), "--output_dir", str(r["failing"])], ["--fail-rank", "1"])
    out = {"single": _finish(ps), "full": _finish(pf), "failing": _finish(px)}
    failing_s = time.monotonic() - t_fail
    out["killed"], out["reshard"] = _finish(pr), _finish(p1)
    for name in ("single", "full", "killed", "reshard"):
        assert "fastppo train: done 4 PPO steps" in out[name], f"{name}:\n{out[name]}"
    return r, out, {"killed_exit_s": killed_exit_s, "failing": px.returncode, "failing_s": failing_s}


def test_two_processes_match_one_process(runs):
    r, _, _ = runs
    one, two = run_metrics(r["single"]), run_metrics(r["full"])
    assert len(one) == len(two) == 4
    for key in ("loss", "kl", "grad_norm", "pg_loss", "value_loss", "entropy", "reward_mean", "advantage_abs_mean"):
        assert abs(one[0][key] - two[0][key]) <= 1e-5 * max(1.0, abs(one[0][key])), (key, one[0][key], two[0][key])
    # matching curves after the first step (the same samples are drawn; only reduction order differs)
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "kl", "reward_mean", "response_length", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
    assert one[0]["grad_norm"] > 0 and one[0]["loss"] != 0


def test_resume_after_sigkill_of_one_rank_is_bitwise(runs):
    r, out, timing = runs
    assert "resumed from" in out["killed"] and "checkpoints/step_000002" in out["killed"]
    assert timing["killed_exit_s"] < 60, "the surviving rank did not stop after its peer was killed"
    a = load_file(str(r["full"] / "final/model.safetensors"))
    b = load_file(str(r["killed"] / "final/model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), f"final/{k} differs"
    va = load_file(str(r["full"] / "final/value_head.safetensors"))
    vb = load_file(str(r["killed"] / "final/value_head.safetensors"))
    assert all(torch.equal(va[k], vb[k]) for k in va)
    assert run_metrics(r["full"]) == run_metrics(r["killed"])
    # sharded checkpoint layout, the completed-marker listing every rank's files
    man = json.loads((r["full"] / "checkpoints/step_000004/manifest.json").read_text())
    assert man["format"] == "dcp" and man["world_size"] == 2
    for name in ("dcp/.metadata", "rng_rank0.pt", "rng_rank1.pt", "scheduler.pt", "state.json", "metrics.jsonl"):
        assert name in man["files"], name
    # only rank 0 writes logs and samples: one line per step, no duplicates
    assert len((r["full"] / "metrics.jsonl").read_text().splitlines()) == 4
    assert out["full"].count("greedy score before PPO") == 1


def test_resume_with_another_world_size_reshards(runs):
    r, out, _ = runs
    assert "resharding it onto 1" in out["reshard"], out["reshard"]
    full, resharded = run_metrics(r["full"]), run_metrics(r["reshard"])
    assert [m["step"] for m in resharded] == [1, 2, 3, 4]
    for a, b in zip(full, resharded, strict=True):
        for key in ("loss", "kl", "reward_mean", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])


def test_a_failing_rank_stops_the_run(runs):
    _, out, timing = runs
    assert timing["failing"] != 0
    assert "injected failure on rank 1" in out["failing"], out["failing"]
    assert timing["failing_s"] < 240


def test_single_process_cannot_resume_a_sharded_checkpoint(runs, tmp_path):
    r, _, _ = runs
    run = tmp_path / "copy"
    shutil.copytree(r["full"], run)
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    p = _single(["--resume", str(run)])
    text = _finish(p, 120)
    assert p.returncode == 2, text
    assert "written by a 2-process run" in text and "--nproc" in text
