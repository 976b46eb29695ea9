"""Loading the real peer frameworks for the compat tests (installed by ``.ci/install-peers.sh``).

A peer's tests are skipped only when the peer itself is not importable here.

- TRL: the installed TRL 1.x, plus TRL 0.11's ``trl/core.py`` (home of the v0.x ``logprobs_from_logits`` and
  ``masked_*`` helpers) which install-peers.sh unpacks under ``$FASTPPO_PEERS_DIR`` (default
  ``~/.cache/fastppo-peers``); it is loaded from that file as a standalone module so it can sit beside TRL 1.x.
- OpenRLHF: ``openrlhf.models/__init__`` imports the actor, which needs flash-attn's CUDA build. When that
  package init cannot load (CPU machines), ``openrlhf.models`` is registered as a bare package over the
  installed directory, so the installed ``utils.py`` / ``loss.py`` load unchanged. ``get_advantages_and_returns``
  and ``get_cumulative_returns`` are methods of the Ray experience maker (ray actors, vLLM); when that module
  cannot load, the two methods are compiled from the installed source file and bound to a dummy ``self``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch


def peer_module(name: str) -> types.ModuleType:
    """Import a peer module; skip only when the peer *distribution* is absent here.

    ``pytest.importorskip`` also skips when an installed peer fails to import (a broken environment, or fastppo
    shadowing one of its dependencies), which once hid every TRL/verl comparison; such a failure must fail.
    """
    top = name.split(".")[0]
    if importlib.util.find_spec(top) is None:
        pytest.skip(f"{top} is not installed (run .ci/install-peers.sh)", allow_module_level=True)
    return importlib.import_module(name)


def peers_dir() -> Path:
    return Path(os.environ.get("FASTPPO_PEERS_DIR", Path.home() / ".cache" / "fastppo-peers"))


def load_trl_v0_core() -> types.ModuleType:
    path = peers_dir() / "trl-0.11.4" / "trl" / "core.py"
    if not path.is_file():
        pytest.skip(f"TRL v0.x core.py not found at {path} (run .ci/install-peers.sh)", allow_module_level=True)
    name = "_peer_trl_v0_core"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def load_openrlhf() -> tuple[types.ModuleType, types.ModuleType]:
    """``(openrlhf.models.utils, openrlhf.models.loss)`` from the installed OpenRLHF."""
    pytest.importorskip("openrlhf")
    try:
        import openrlhf.models.loss as loss
        import openrlhf.models.utils as utils
    except ImportError:
        spec = importlib.util.find_spec("openrlhf")
        models_dir = Path(spec.origin).parent / "models"
        for name in [n for n in sys.modules if n == "openrlhf.models" or n.startswith("openrlhf.models.")]:
            del sys.modules[name]
        pkg = types.ModuleType("openrlhf.models")
        pkg.__path__ = [str(models_dir)]
        pkg.__package__ = "openrlhf.models"
        sys.modules["openrlhf.models"] = pkg
        try:
            utils = importlib.import_module("openrlhf.models.utils")
            loss = importlib.import_module("openrlhf.models.loss")
        except ImportError as e:
            pytest.skip(f"openrlhf.models.utils is not importable here: {e}", allow_module_level=True)
    return utils, loss


def load_openrlhf_returns() -> dict[str, Any]:
    """The installed ``get_advantages_and_returns`` / ``get_cumulative_returns`` as plain functions."""
    pytest.importorskip("openrlhf")
    try:
        from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker

        return {
            "get_advantages_and_returns": RemoteExperienceMaker.get_advantages_and_returns.__get__(object()),
            "get_cumulative_returns": RemoteExperienceMaker.get_cumulative_returns.__get__(object()),
        }
    except Exception:  # noqa: BLE001 - ray / vllm / flash-attn are not installable on a CPU machine
        pass
    spec = importlib.util.find_spec("openrlhf")
    src = (Path(spec.origin).parent / "trainer" / "ppo_utils" / "experience_maker.py").read_text()
    tree = ast.parse(src)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RemoteExperienceMaker")
    wanted = {"get_advantages_and_returns", "get_cumulative_returns"}
    funcs = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {f.name for f in funcs} == wanted, "the installed OpenRLHF moved its GAE; update the compat adapter"
    module = ast.Module(body=funcs, type_ignores=[])
    namespace: dict[str, Any] = {"torch": torch, "Tuple": tuple, "List": list}
    exec(compile(module, "openrlhf/trainer/ppo_utils/experience_maker.py", "exec"), namespace)  # noqa: S102
    dummy = object()
    return {name: namespace[name].__get__(dummy) for name in wanted}
