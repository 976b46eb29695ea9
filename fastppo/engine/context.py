"""The process context the trainer runs in: what differs between one process and a torch.distributed group.

``ProcessContext`` is what ``PPOTrainer`` calls, with no branch of its own on the number of processes.
``LocalContext`` is one process: every collective is the identity, the model is never sharded, checkpoints are
single-file safetensors ones (``checkpoint.py``); it imports nothing of torch.distributed, so a plain ``fastppo
train`` has no distributed code path to pay for. ``distributed.DistContext`` is the torchrun one (FSDP2, gloo /
NCCL collectives, sharded DCP checkpoints), built by ``distributed.init``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from fastppo.engine import checkpoint as ckpt_io

LossFn = Callable[[Tensor], tuple[Tensor, dict[str, Tensor]]]


class ProcessContext(Protocol):
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """The process that writes the run directory's files and prints."""

    @property
    def distributed(self) -> bool:
        """A torch.distributed process group (even of one process): its checkpoints are sharded ones, and the
        features that are single-process only are refused."""

    def barrier(self) -> None: ...

    def all_reduce(self, t: Tensor) -> Tensor:
        """The sum over the processes."""

    def max_int(self, x: int) -> int:
        """The largest ``x`` of any process."""

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""

    def local_rows(self, n: int) -> slice:
        """This process's contiguous share of ``n`` global rows."""

    def gather_experience(self, parts: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every process's rows of each tensor, concatenated in rank order."""

    def piece_loss(self, micro: Tensor, mask: Tensor, agg: str, loss_fn: LossFn
                   ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(piece, loss, stats)``: ``loss_fn`` on this process's piece of the global micro-batch ``micro`` (row
        indices), loss and stats weighted so that the pieces of all processes sum to the micro-batch's."""

    def backward(self, loss: Tensor, accum: int) -> None:
        """Accumulate ``loss``'s gradient as one of ``accum`` micro-batches of an optimizer step."""

    def reduce_stats(self, stats: dict[str, Tensor], keep: tuple[str, ...]) -> dict[str, Tensor]:
        """Per-process (weighted) stats summed over the processes; ``keep`` are global already."""

    def shard(self, model: nn.Module) -> None: ...

    def unsharded(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """Full weights for the duration (generation)."""

    def full_model(self, model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module | None:
        """``model`` with its full weights, on the main process (None on the others); ``build`` makes an empty
        unsharded copy when one is needed. Every process must call it."""

    def save_checkpoint(self, run_dir: Path, step: int, *, models: dict[str, nn.Module],
                        optimizer: torch.optim.Optimizer, scheduler: Any, state: dict[str, Any],
                        metrics: list[dict[str, Any]], keep: int) -> Path: ...

    def load_checkpoint(self, ckpt: Path, *, models: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                        scheduler: Any, echo: Callable[..., Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Restore ``ckpt`` (as ``checkpoint.latest_checkpoint`` returns it: verified) in place."""


class LocalContext:
    """One process, no process group: collectives are the identity, nothing is sharded."""

    rank = 0
    world = 1
    is_main = True
    distributed = False

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def barrier(self) -> None:
        pass

    def all_reduce(self, t: Tensor) -> Tensor:
        return t

    def max_int(self, x: int) -> int:
        return x

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def local_rows(self, n: int) -> slice:
        return slice(0, n)

    def gather_experience(self, parts: dict[str, Tensor]) -> dict[str, Tensor]:
        return parts

    def piece_loss(self, micro: Tensor, mask: Tensor, agg: str, loss_fn: LossFn
                   ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        loss, stats = loss_fn(micro)
        return micro, loss, stats

    def backward(self, loss: Tensor, accum: int) -> None:
        (loss / accum).backward()

    def reduce_stats(self, stats: dict[str, Tensor], keep: tuple[str, ...]) -> dict[str, Tensor]:
        return stats

    def shard(self, model: nn.Module) -> None:
        pass

    def unsharded(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def full_model(self, model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module | None:
        return model

    def save_checkpoint(self, run_dir: Path, step: int, *, models: dict[str, nn.Module],
                        optimizer: torch.optim.Optimizer, scheduler: Any, state: dict[str, Any],
                        metrics: list[dict[str, Any]], keep: int) -> Path:
        return ckpt_io.save_checkpoint(run_dir, step, policy=models["policy"], critic=models.get("critic"),
                                       optimizer=optimizer, scheduler=scheduler, state=state, metrics=metrics,
                                       keep=keep)

    def load_checkpoint(self, ckpt: Path, *, models: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                        scheduler: Any, echo: Callable[..., Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return ckpt_io.load_checkpoint(ckpt, policy=models["policy"], critic=models.get("critic"),
                                       optimizer=optimizer, scheduler=scheduler, verified=True)
