"""Data-parallel PPO over torch.distributed: the one module where the engine meets process groups, FSDP2 and DCP.

A run launched by torchrun (``RANK``/``WORLD_SIZE`` set) gets a ``DistContext``; a plain ``fastppo train`` never
imports this module. What happens per PPO step with ``W`` processes and a global batch of ``B`` sequences:

* every rank draws the same global prompt list and encodes it (so all share the prompt width ``P``), then generates
  its ``B / W`` rows with per-sample random streams (``fastppo.engine.streams``): the global batch does not depend
  on ``W``. Generation runs on unsharded weights (one all-gather per FSDP unit before, none per token).
* rewards, old/reference log-probs and values are computed on the local rows (sharded forwards), then ONE
  all-gather of the ``[B/W, P+R]`` token ids/masks and ONE of the ``[B/W, R]`` float rows gives every rank the
  whole batch: the KL penalty, GAE, whitening and every logged statistic are computed on global values, exactly
  as in one process.
* each global micro-batch (of ``micro_batch_size`` rows) is split into ``W`` pieces; each rank's loss on its piece
  is weighted by the piece's share of the micro-batch (its tokens for ``token-mean``, its sequences for the
  ``seq-*`` modes) and by ``W`` (FSDP averages the gradients), so the update equals the one-process update.
  Gradient clipping uses the global norm (FSDP's DTensor norm).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastppo.engine import checkpoint as ckpt_io
from fastppo.engine.config import ConfigError, PPOConfig
from fastppo.engine.context import LossFn
from fastppo.engine.distributed_launch import launched_by_torchrun

# Fields that may legitimately differ between ranks (none today: output_dir is broadcast from rank 0 first).
_PER_RANK_FIELDS: tuple[str, ...] = ()
DCP_FORMAT = "dcp"


@dataclass
class DistContext:
    """The torchrun ``context.ProcessContext``: this rank's place in the process group, and what the trainer does
    through it (collectives, the split of each micro-batch, FSDP2 sharding, DCP checkpoints)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    distributed = True  # a class attribute (not a field): any DistContext is a process group, even of one rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------------- collectives
    def _to_comm(self, t: Tensor) -> Tensor:
        return t.cpu() if dist.get_backend() == "gloo" else t

    def all_reduce(self, t: Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> Tensor:
        buf = self._to_comm(t).clone()
        dist.all_reduce(buf, op=op)
        return buf.to(t.device)

    def max_int(self, x: int) -> int:
        return int(self.all_reduce(torch.tensor([x], dtype=torch.int64), dist.ReduceOp.MAX).item())

    def all_gather_rows(self, t: Tensor) -> Tensor:
        """``[b, ...]`` on every rank (same shape) -> ``[W * b, ...]`` in rank order."""
        buf = self._to_comm(t.contiguous())
        out = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(out, buf)
        return torch.cat(out).to(t.device)

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    # --------------------------------------------------------------------------------------------- the batch
    def local_rows(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` global rows (``n % world == 0`` is checked at start-up)."""
        k = n // self.world
        return slice(self.rank * k, (self.rank + 1) * k)

    def gather_experience(self, parts: dict[str, Tensor]) -> dict[str, Tensor]:
        """Concatenate every rank's rows of each tensor, with two collectives (integer rows, float rows)."""
        ints = {k: v for k, v in parts.items() if not v.is_floating_point()}
        floats = {k: v for k, v in parts.items() if v.is_floating_point()}
        out: dict[str, Tensor] = {}
        for group, dtype in ((ints, torch.int64), (floats, torch.float32)):
            if not group:
                continue
            cols = [v.reshape(v.shape[0], -1).to(dtype) for v in group.values()]
            packed = self.all_gather_rows(torch.cat(cols, dim=1))
            start = 0
            for (k, v), c in zip(group.items(), cols, strict=True):
                out[k] = packed[:, start: start + c.shape[1]].reshape(-1, *v.shape[1:]).to(v.dtype)
                start += c.shape[1]
        return out

    def micro_piece(self, micro: Tensor, mask: Tensor, agg: str) -> tuple[Tensor, Tensor]:
        """This rank's piece of a global micro-batch ``micro`` (row indices) and its weight: the share of the
        micro-batch's aggregation denominator it holds, so the weighted piece losses sum to the micro-batch loss."""
        piece = micro.tensor_split(self.world)[self.rank]
        if agg == "token-mean":
            w = mask[piece].sum() / mask[micro].sum()
        else:
            w = torch.tensor(piece.numel() / micro.numel(), device=mask.device)
        return piece, w

    @property
    def grad_scale(self) -> float:
        """FSDP averages gradients over the ranks (gloo has no pre-scaled sum); the weighted piece losses must
        be summed, so they are multiplied by the world size first (exact for powers of two)."""
        return float(self.world)

    def piece_loss(self, micro: Tensor, mask: Tensor, agg: str, loss_fn: LossFn
                   ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``loss_fn`` on this rank's ``micro_piece``, loss and stats multiplied by the piece's weight."""
        piece, w = self.micro_piece(micro, mask, agg)
        loss, stats = loss_fn(piece)
        return piece, loss * w, {k: v * w for k, v in stats.items()}

    def backward(self, loss: Tensor, accum: int) -> None:
        (loss * (self.grad_scale / accum)).backward()

    def reduce_stats(self, stats: dict[str, Tensor], keep: tuple[str, ...]) -> dict[str, Tensor]:
        """Sum the (already weighted) per-rank stats, one collective; ``keep`` are global already."""
        names = [k for k in stats if k not in keep]
        summed = self.all_reduce(torch.stack([stats[k].float() for k in names]))
        return {**stats, **dict(zip(names, summed.unbind(0), strict=True))}

    # ---------------------------------------------------------------------------------------------- sharding
    def shard(self, model: nn.Module) -> None:
        """FSDP2: ``fully_shard`` each decoder layer, the LM (root) and a value head (its own root)."""
        import warnings

        from torch.distributed.fsdp import fully_shard

        # HF models return logits/hidden states that are views; the engine never writes into them in place, which
        # is what this FSDP2 warning is about
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        lm = getattr(model, "lm", model)
        for layer in _decoder_layers(lm):
            fully_shard(layer)
        fully_shard(lm)
        if hasattr(model, "v_head"):
            fully_shard(model.v_head)

    @contextlib.contextmanager
    def unsharded(self, model: nn.Module) -> Iterator[None]:
        """Full weights for the duration (generation): all-gather once, keep them through every decode step (no
        collective per token, so ranks may stop generating at different steps), then shard again."""
        mods = _fsdp_modules(model)
        for m in mods:
            m.set_reshard_after_forward(False)
        for m in mods:
            m.unshard()
        try:
            yield
        finally:
            for m in mods:
                m.set_reshard_after_forward(True)
                m.reshard()

    def full_model(self, model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module | None:
        """The unsharded weights gathered (a collective) into ``build()`` on rank 0; None on the others."""
        full_sd = full_state_dict(model)
        if not self.is_main:
            return None
        full = build()
        full.load_state_dict(full_sd)
        return full

    # ------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, run_dir: Path, step: int, **kw: Any) -> Path:
        return save_checkpoint(self, run_dir, step, **kw)

    def load_checkpoint(self, ckpt: Path, **kw: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return load_checkpoint(self, ckpt, **kw)

    # ----------------------------------------------------------------------------------------- start-up check
    def check_same_config(self, cfg: PPOConfig) -> None:
        """Every rank must run the same configuration: a mismatch (different YAML per node, a stray override)
        would silently train different models; say which fields differ on which rank."""
        mine = {k: v for k, v in cfg.to_dict().items() if k not in _PER_RANK_FIELDS}
        digest = hashlib.sha256(json.dumps(mine, sort_keys=True, default=str).encode()).hexdigest()
        digests: list[str] = [""] * self.world
        dist.all_gather_object(digests, digest)
        if len(set(digests)) == 1:
            return
        configs: list[dict[str, Any]] = [{}] * self.world
        dist.all_gather_object(configs, mine)
        lines = []
        for r, other in enumerate(configs):
            diff = sorted(k for k in mine if configs[0].get(k) != other.get(k))
            if diff:
                lines.append(f"rank {r}: " + ", ".join(f"{k}={other.get(k)!r} (rank 0: {configs[0].get(k)!r})"
                                                        for k in diff))
        raise ConfigError("the ranks were started with different configurations: " + "; ".join(lines))


def _decoder_layers(lm: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face causal LM (``model.layers``, ``transformer.h``, ...); none found
    means the whole LM is one FSDP unit."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers"):
        obj: Any = lm
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return list(obj)
    return []


def _fsdp_modules(model: nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def init(cfg: PPOConfig) -> DistContext:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA) with ``cfg.dist_timeout`` seconds per
    collective, so a dead or stuck rank makes the others fail instead of hanging."""
    if not launched_by_torchrun():
        raise RuntimeError("fastppo.engine.distributed.init needs torchrun's RANK/WORLD_SIZE/MASTER_ADDR")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    want_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if want_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=cfg.dist_timeout), device_id=None)
    return DistContext(rank, world, local_rank, device)


def check_config(cfg: PPOConfig, world: int) -> None:
    """What data parallelism over ``world`` processes needs from the configuration."""
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the number of processes ({world})")
    if cfg.micro_batch_size % world:
        raise ConfigError(f"micro_batch_size={cfg.micro_batch_size} must be divisible by the number of processes "
                          f"({world}): each micro-batch is split evenly across them")
    if cfg.lora_r:
        raise ConfigError("lora_r > 0 is not supported in multi-process runs yet (run LoRA in one process)")


# ----------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(ctx: DistContext, run_dir: Path, step: int, *, models: dict[str, nn.Module],
                    optimizer: torch.optim.Optimizer, scheduler: Any, state: dict[str, Any],
                    metrics: list[dict[str, Any]], keep: int) -> Path:
    """A DCP checkpoint ``checkpoints/step_N/``: ``dcp/`` (sharded models + optimizer, written by every rank),
    ``rng_rank{r}.pt`` (each rank's generator states), ``scheduler.pt``, ``state.json`` (step, data position,
    KL controller, world size), ``metrics.jsonl``. Rank 0 stages the directory, every rank writes its files, then
    rank 0 commits it (``checkpoint.commit_checkpoint``: manifest last, atomic rename, pruning) once every rank has
    finished. A crash leaves no partial checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if ctx.is_main:
        ckpt_io.begin_checkpoint(run_dir, step)
    ctx.barrier()
    tmp = ckpt_io.staging_dir(run_dir, step)
    mods = nn.ModuleDict(models)  # one module tree: its state-dict keys are 'policy.…', 'critic.…'
    model_sd, optim_sd = get_state_dict(mods, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    meta, tensors = ckpt_io.rng_state()
    torch.save({"meta": json.dumps(meta), **tensors}, tmp / f"rng_rank{ctx.rank}.pt")
    ckpt_io.fsync_file(tmp / f"rng_rank{ctx.rank}.pt")
    ctx.barrier()
    if ctx.is_main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "world_size": ctx.world,
                                                    "models": list(models)}))
        ckpt_io.write_metrics(tmp, metrics)
        ckpt_io.commit_checkpoint(run_dir, step, keep=keep, meta={"format": DCP_FORMAT, "world_size": ctx.world})
    ctx.barrier()
    return ckpt_io.checkpoint_dir(run_dir, step)


def load_checkpoint(ctx: DistContext, ckpt: Path, *, models: dict[str, nn.Module],
                    optimizer: torch.optim.Optimizer, scheduler: Any,
                    echo=print) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Restore a DCP checkpoint into the sharded models/optimizer (DCP reshards when the world size changed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    ckpt_io.check_format(ckpt, multi_process=True)
    state = json.loads((ckpt / "state.json").read_text())
    if list(models) != state["models"]:
        raise ckpt_io.CheckpointError(f"checkpoint {ckpt} holds models {state['models']}, this run has "
                                      f"{list(models)} (critic setting changed?)")
    saved_world = int(state["world_size"])
    mods = nn.ModuleDict(models)  # one module tree: its state-dict keys are 'policy.…', 'critic.…'
    model_sd, optim_sd = get_state_dict(mods, optimizer)
    sd = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(sd, checkpoint_id=str(ckpt / "dcp"))
    set_state_dict(mods, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    if saved_world == ctx.world:
        rng = torch.load(ckpt / f"rng_rank{ctx.rank}.pt", weights_only=True)
        ckpt_io.set_rng_state(json.loads(rng.pop("meta")), rng)
    elif ctx.is_main:
        # every random draw of the loop comes from (seed, step, sample) streams, so the generators' own states
        # are not needed to continue the same run
        echo(f"resume: checkpoint written by {saved_world} processes, resharding it onto {ctx.world} "
             "(models and optimizer resharded by torch.distributed.checkpoint; per-rank RNG states not restored)")
    return state, ckpt_io.read_metrics(ckpt)


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The unsharded weights on CPU, on rank 0 (a collective: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
