"""Who is benchmarked: fastppo's backends, the baselines (eager PyTorch, torch.compile) and the peers.

A provider turns a case's inputs into a zero-argument callable returning the outputs to check. Peers are
optional imports: when one cannot be imported (or cannot run on this device) its ``setup`` raises
``Missing`` and the suite writes a row ``missing: <reason>``, so nothing is silently dropped.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Optional

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
    # False for reference points that do not compute the op (the copy baseline): no error check, no err_flag.
    checked: bool = True


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


def openrlhf_attr(module: str, attr: str) -> Any:
    """``openrlhf.models.<module>.<attr>``. ``openrlhf/models/__init__`` imports the actor, which needs flash-attn's
    CUDA build; where that package init cannot load, ``openrlhf.models`` is registered as a bare package over the
    installed directory so the installed, unmodified ``utils.py`` / ``loss.py`` load (as on a GPU box)."""
    full = f"openrlhf.models.{module}"
    mod, err = _import(full)
    if mod is None:
        spec = importlib.util.find_spec("openrlhf")
        if spec is None or spec.origin is None:
            raise Missing(f"cannot import {full} ({err})")
        if "openrlhf.models" not in sys.modules:
            pkg = types.ModuleType("openrlhf.models")
            pkg.__path__ = [str(Path(spec.origin).parent / "models")]
            sys.modules["openrlhf.models"] = pkg
        _import.cache_clear()
        mod, err2 = _import(full)
        if mod is None:
            raise Missing(f"cannot import {full} ({err}; without the package init: {err2})")
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise Missing(f"{full} has no {attr} in the installed version") from None


def openrlhf_gae() -> Callable[..., Any]:
    """OpenRLHF's ``get_advantages_and_returns`` (a method of its Ray experience maker that never uses ``self``).

    Where ``experience_maker`` cannot be imported (it pulls in ray actors / vLLM / flash-attn), the method's
    source is taken from the installed file unchanged and compiled on its own."""
    mod, err = _import("openrlhf.trainer.ppo_utils.experience_maker")
    if mod is not None and hasattr(mod, "RemoteExperienceMaker"):
        return mod.RemoteExperienceMaker.get_advantages_and_returns.__get__(object())
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or spec.origin is None:
        raise Missing(f"cannot import openrlhf ({err})")
    path = Path(spec.origin).parent / "trainer" / "ppo_utils" / "experience_maker.py"
    tree = ast.parse(path.read_text())
    found = [f for c in tree.body if isinstance(c, ast.ClassDef) for f in c.body
             if isinstance(f, ast.FunctionDef) and f.name == "get_advantages_and_returns"]
    if not found:
        raise Missing(f"get_advantages_and_returns not found in {path}")
    ns: dict[str, Any] = {"torch": torch, "Tuple": tuple, "Optional": Optional}
    exec(compile(ast.Module(body=found[:1], type_ignores=[]), str(path), "exec"), ns)  # noqa: S102
    return ns["get_advantages_and_returns"].__get__(object())


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
    """``torch.compile`` of a plain formula, fresh per case.

    Dynamo keys its cache on the function's code object, so wrappers made per case still share one cache and,
    past ``recompile_limit`` shapes/dtypes/grad modes, silently run eager: reset it so every case is compiled.
    """
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)
