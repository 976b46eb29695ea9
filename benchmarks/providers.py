"""Who is benchmarked: fastppo's backends, the baselines (eager PyTorch, torch.compile) and the peers.

A provider turns a case's inputs into a zero-argument callable returning the outputs to check. Peers are
optional imports: when one cannot be imported (or cannot run on this device) its ``setup`` raises
``Missing`` and the suite writes a row ``missing: <reason>``, so nothing is silently dropped.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import Tensor

Outputs = dict[str, Tensor]
Runner = Callable[[], Outputs]


class Missing(Exception):
    """The provider cannot run here; the message says why (becomes the row's ``missing: ...`` status)."""


class Skipped(Exception):
    """The provider could run but is deliberately not timed; the message says why (``skipped: ...``)."""


@dataclass(frozen=True)
class Provider:
    name: str
    group: str  # "fastppo" | "baseline" | "peer"
    setup: Callable[[Any], Runner]  # case -> runner; raises Missing
    notes: str = ""


@cache
def _import(module: str) -> tuple[Any, str | None]:
    try:
        return importlib.import_module(module), None
    except Exception as exc:  # peers fail with ImportError, but also RuntimeError/AttributeError on version skew
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()


def peer_attr(module: str, attr: str) -> Any:
    """``module.attr`` of an optional peer, or raise Missing with the import error."""
    mod, err = _import(module)
    if mod is None:
        raise Missing(f"cannot import {module} ({err})")
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise Missing(f"{module} has no {attr} in the installed version") from None


def needs_cuda(device: torch.device, what: str) -> None:
    if device.type != "cuda":
        raise Missing(f"{what} runs on CUDA only")


def version_of(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


PEER_DISTS = ("torch", "triton", "transformers", "trl", "verl", "openrlhf", "liger-kernel", "flash-attn", "fastppo")


# ------------------------------------------------------------------------------------------ fastppo backends
def fastppo_backends(family: str | None, device: torch.device) -> list[tuple[str, str | None]]:
    """``[(backend, None | why it cannot run)]`` for every fastppo backend, discovered at run time.

    ``family`` is the kernel family (``fastppo._dispatch.FAMILY_LAUNCHERS``); ``None`` for the elementwise ops,
    which run in PyTorch on every backend, so only ``torch`` is benchmarked for them.
    """
    import fastppo
    from fastppo import _dispatch

    if family is None:
        return [("torch", None)]
    out: list[tuple[str, str | None]] = []
    for name, info in fastppo.backends().items():
        if not info.available:
            out.append((name, f"backend unavailable: {info.reason}"))
        elif not _dispatch.implements(name, family):
            out.append((name, f"this build has no {family!r} kernels"))
        elif not _dispatch._device_ok(name, device):
            out.append((name, f"does not run on {device.type} tensors"))
        elif name == "triton" and device.type == "cpu":
            # TRITON_INTERPRET=1 runs kernels in a Python interpreter: a debugging mode, meaningless to time.
            out.append((name, "Triton interpreter (TRITON_INTERPRET=1) is a debugging mode, not timed"))
        else:
            out.append((name, None))
    return out


def fastppo_name(backend: str) -> str:
    return f"fastppo[{backend}]"


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile`` of a plain formula, fresh per case (no recompile limit games across shapes)."""
    return torch.compile(fn, dynamic=False)
