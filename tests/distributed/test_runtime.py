"""The engine's distributed runtime pieces in 2 real gloo processes: config mismatch detected at start-up, experience
gathered in rank order, micro-batch piece weights, the multi-process loader refusing a single-process checkpoint,
then a surviving rank failing fast (not hanging) when its peer dies."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastppo.engine import distributed
from fastppo.engine.checkpoint import CheckpointError
from fastppo.engine.config import ConfigError
from tests.engine.tiny import tiny_config


def _body(rank: int, world: int, tmp: str) -> None:
    ctx = distributed.DistContext(rank, world, rank, torch.device("cpu"))
    cfg = tiny_config()
    ctx.check_same_config(cfg)  # equal configs pass
    other = dataclasses.replace(cfg, lr=cfg.lr * (1 + rank), clip_range=0.2)
    with pytest.raises(ConfigError, match=r"rank 1: lr=0\.001 \(rank 0: 0\.0005\)"):
        ctx.check_same_config(other)

    # every rank's rows, in rank order, ints and floats through one collective each
    ids = torch.arange(6).view(2, 3) + 100 * rank
    vals = torch.full((2, 4), float(rank))
    out = ctx.gather_experience({"ids": ids, "vals": vals, "scores": torch.tensor([rank, rank + 0.5])})
    assert out["ids"].dtype == torch.int64 and out["ids"].shape == (4, 3)
    assert torch.equal(out["ids"], torch.cat([torch.arange(6).view(2, 3), torch.arange(6).view(2, 3) + 100]))
    assert torch.equal(out["vals"][:2], torch.zeros(2, 4)) and torch.equal(out["vals"][2:], torch.ones(2, 4))
    assert torch.equal(out["scores"], torch.tensor([0.0, 0.5, 1.0, 1.5]))
    assert ctx.local_rows(8) == slice(4 * rank, 4 * rank + 4)
    assert ctx.max_int(3 + rank) == 4

    # piece weights add up to 1 over the ranks (token-mean: token share; seq-* modes: sequence share)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.float32)
    micro = torch.tensor([3, 0, 1, 2])
    for agg in ("token-mean", "seq-mean-token-mean"):
        piece, w = ctx.micro_piece(micro, mask, agg)
        assert torch.equal(piece, micro[2 * rank: 2 * rank + 2])
        total = ctx.all_reduce(w.reshape(1).float())
        assert abs(float(total) - 1.0) < 1e-6
    piece, w = ctx.micro_piece(micro, mask, "token-mean")
    assert abs(float(w) - (5 / 9 if rank == 0 else 4 / 9)) < 1e-6

    # a single-process (safetensors) checkpoint: a clear error, not a crash inside DCP
    ckpt = Path(tmp) / "step_000002"
    if rank == 0:
        ckpt.mkdir()
        (ckpt / "manifest.json").write_text(json.dumps({"step": 2, "files": {}}))
    ctx.barrier()
    with pytest.raises(CheckpointError, match="written by a single-process run"):
        distributed.load_checkpoint(ctx, ckpt, models={}, optimizer=None, scheduler=None)


def test_start_up_checks():
    with pytest.raises(ConfigError, match="batch_size=8 must be divisible by the number of processes"):
        distributed.check_config(tiny_config(), 3)
    with pytest.raises(ConfigError, match="micro_batch_size=2 must be divisible"):
        distributed.check_config(tiny_config(batch_size=12, mini_batch_size=6, micro_batch_size=2), 3)
    distributed.check_config(tiny_config(), 2)
    with pytest.raises(ConfigError, match="dist_timeout must be > 0"):
        tiny_config(dist_timeout=0.0)


def _worker(rank: int, init_file: str, tmp: str, report: str) -> None:
    """The runtime checks, then rank 1 dies and rank 0 times how long its next collective takes to fail (one set
    of processes for both: starting them is the slow part)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))
    try:
        _body(rank, 2, tmp)
    except BaseException:
        Path(tmp, f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)
    dist.barrier()
    if rank == 1:
        os._exit(3)  # dies without a word, as a SIGKILLed or OOM-killed rank does
    t0 = time.monotonic()
    try:
        dist.all_reduce(torch.ones(4))
        msg = "no error"
    except RuntimeError as exc:
        msg = str(exc)
    Path(report).write_text(json.dumps({"seconds": time.monotonic() - t0, "error": msg}))
    os._exit(0)  # the process group cannot be torn down cleanly with a dead peer


def test_runtime_pieces_then_a_dying_peer(tmp_path):
    fd, init_file = tempfile.mkstemp(prefix="fastppo-gloo-")
    os.close(fd)
    os.unlink(init_file)
    report = tmp_path / "rank0.json"
    ctx = mp.start_processes(_worker, args=(init_file, str(tmp_path), str(report)), nprocs=2, join=False,
                             start_method="spawn")
    for p in ctx.processes:
        p.join(180)
    errors = "\n".join(f.read_text() for f in sorted(tmp_path.glob("rank*.err")))
    assert not errors, errors
    assert [p.exitcode for p in ctx.processes] == [0, 3]
    got = json.loads(report.read_text())
    assert got["error"] != "no error"
    assert got["seconds"] < 30, got
