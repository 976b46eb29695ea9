"""Sharded (DCP) checkpoints in 2 real gloo processes: after a resume that skipped a corrupt newer checkpoint, the
next save survives its own pruning (only checkpoints up to the saved step count against ``keep``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastppo.engine import checkpoint as ckpt_io
from fastppo.engine import distributed
from tests.distributed.spawn import run_world


def _flip_a_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()  # AdamW state exists, so the optimizer shards are not empty
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    return model, opt, sched


def _resume_past_a_corrupt_checkpoint(rank: int, world: int, run: str) -> None:
    run_dir = Path(run)
    ctx = distributed.DistContext(rank, world, rank, torch.device("cpu"))
    model, opt, sched = _model_and_optimizer(0)

    def save(step: int, keep: int) -> Path:
        return distributed.save_checkpoint(ctx, run_dir, step, models={"policy": model}, optimizer=opt,
                                           scheduler=sched, state={"data_position": step}, metrics=[], keep=keep)

    save(2, keep=2)
    save(4, keep=2)
    if ctx.is_main:
        _flip_a_byte(run_dir / "checkpoints/step_000004/state.json")
    ctx.barrier()

    # resume: the corrupt step 4 is skipped with a warning naming it, step 2 is restored
    with pytest.warns(ckpt_io.CheckpointWarning, match=r"step_000004: state.json is corrupt.*step_000002"):
        ckpt = ckpt_io.latest_checkpoint(run_dir)
    assert ckpt.name == "step_000002"
    model2, opt2, sched2 = _model_and_optimizer(1)
    state, _ = distributed.load_checkpoint(ctx, ckpt, models={"policy": model2}, optimizer=opt2, scheduler=sched2)
    assert state["step"] == 2 and state["data_position"] == 2
    assert torch.equal(model2.weight, model.weight)

    # the next save, keep=1: the step just written is kept (and step 2 pruned), whatever the corrupt step 4 is
    final = save(3, keep=1)
    ctx.barrier()
    assert final.is_dir(), "the checkpoint just written was pruned"
    assert [s for s, _ in ckpt_io.checkpoint_dirs(run_dir)] == [3, 4]
    ckpt_io.verify(final)
    with pytest.warns(ckpt_io.CheckpointWarning, match="step_000004: state.json is corrupt"):
        assert ckpt_io.latest_checkpoint(run_dir).name == "step_000003"
    ctx.barrier()  # nobody leaves (and nobody's tmp_path is removed) while another rank still reads


def test_save_after_resuming_past_a_corrupt_newer_checkpoint_survives_pruning(tmp_path):
    run_world(_resume_past_a_corrupt_checkpoint, 2, str(tmp_path))
