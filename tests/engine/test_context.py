"""The one-process context: collectives are the identity, and a single-process run never loads the engine's
distributed module nor starts a process group."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from fastppo.engine.context import LocalContext

REPO = Path(__file__).resolve().parents[2]


def test_local_context_collectives_are_the_identity():
    ctx = LocalContext(torch.device("cpu"))
    assert (ctx.rank, ctx.world, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    t = torch.arange(4.0)
    assert ctx.all_reduce(t) is t and ctx.max_int(7) == 7 and ctx.broadcast_object("x") == "x"
    ctx.barrier()
    assert ctx.local_rows(8) == slice(0, 8)
    parts = {"ids": torch.arange(6).view(2, 3)}
    assert ctx.gather_experience(parts) is parts
    stats = {"loss": torch.tensor(1.5)}
    assert ctx.reduce_stats(stats, keep=()) is stats
    micro = torch.tensor([3, 1])
    piece, loss, st = ctx.piece_loss(micro, torch.ones(4, 2), "token-mean", lambda rows: (rows.sum().float(), {}))
    assert piece is micro and float(loss) == 4.0 and st == {}
    w = torch.ones(2, requires_grad=True)
    ctx.backward((w * 3).sum(), accum=2)
    assert torch.equal(w.grad, torch.full((2,), 1.5))
    model = torch.nn.Linear(2, 2)
    ctx.shard(model)
    with ctx.unsharded(model):
        pass
    assert ctx.full_model(model, build=lambda: None) is model


def test_a_single_process_run_has_no_distributed_code_path(tmp_path):
    code = textwrap.dedent("""
        import sys, torch
        from fastppo.engine.trainer import PPOTrainer
        from tests.engine.tiny import quiet, tiny_config
        PPOTrainer(tiny_config(total_steps=2, save_every=1), sys.argv[1], echo=quiet).train()
        print("distributed module loaded:", "fastppo.engine.distributed" in sys.modules)
        print("process group:", torch.distributed.is_initialized())
    """)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "distributed module loaded: False" in out.stdout and "process group: False" in out.stdout, out.stdout
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step_000001", "step_000002"]
