"""Run a test body in ``world`` real processes joined by a gloo process group (torch.multiprocessing spawn)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable[..., None], world: int, init_file: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_world(fn: Callable[..., None], world: int, *args) -> None:
    """``fn(rank, world, *args)`` in each of ``world`` processes; an exception in any of them fails the caller."""
    fd, init_file = tempfile.mkstemp(prefix="fastppo-gloo-")
    os.close(fd)
    os.unlink(init_file)  # the file store creates it
    try:
        mp.spawn(_entry, args=(fn, world, init_file, args), nprocs=world, join=True)
    finally:
        if os.path.exists(init_file):
            os.unlink(init_file)
