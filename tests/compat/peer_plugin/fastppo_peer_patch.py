"""pytest plugin for running a peer framework's own tests with ``fastppo.compat.patch(peer)`` applied.

Loaded with ``-p fastppo_peer_patch`` in a separate pytest process (the peers ship their tests as a top-level
``tests`` package, which would clash with fastppo's). ``FASTPPO_PEER`` names the framework.

Some peer tests (OpenRLHF's) load the framework's source files by path under private module names, so no
``patch`` can reach the functions they call. For those, ``FASTPPO_PEER_BY_PATH=1`` points every module loaded
from the framework's files under another name, and every test module's global bound to one of its functions, at
fastppo's adapter of the same name -- the same swap ``patch`` does, reached by file instead of module name.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

import fastppo.compat as compat

patch_mod = sys.modules["fastppo.compat.patch"]  # the module (``fastppo.compat.patch`` is also the function)

_REPORT: dict[str, Any] = {}


def pytest_configure(config: pytest.Config) -> None:
    peer = os.environ["FASTPPO_PEER"]
    _REPORT["replaced"] = compat.patch(peer)


def _adapters_by_original_file(peer: str) -> list[tuple[str, str, Any]]:
    """(defining file, attr, replacement) for every target of ``peer`` whose module is importable."""
    import importlib

    out = []
    for t in compat.FRAMEWORKS[peer].targets:
        try:
            module = importlib.import_module(t.module)
        except Exception:  # noqa: BLE001 - an optional target module that cannot load here
            continue
        out.append((str(Path(module.__file__).resolve()), t.attr, patch_mod._resolve(t.replacement)))
    return out


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    peer = os.environ["FASTPPO_PEER"]
    if os.environ.get("FASTPPO_PEER_BY_PATH") != "1":
        return
    targets = _adapters_by_original_file(peer)
    swapped = []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if module is None or path is None or name.split(".")[0] == peer:
            continue
        resolved = str(Path(path).resolve())
        for file, attr, repl in targets:
            if resolved == file and "." not in attr and hasattr(module, attr):
                original = getattr(module, attr)
                setattr(module, attr, repl)
                swapped.append(f"{name}.{attr}")
                # the test modules bind the path-loaded function by name at import time
                for other in list(sys.modules.values()):
                    ns = getattr(other, "__dict__", None)
                    if ns is None or getattr(other, "__file__", None) is None:
                        continue
                    for k, v in list(ns.items()):
                        if v is original:
                            setattr(other, k, repl)
                            swapped.append(f"{other.__name__}.{k}")
    _REPORT["by_path"] = swapped


def pytest_unconfigure(config: pytest.Config) -> None:
    out = os.environ.get("FASTPPO_PEER_REPORT")
    if out:
        Path(out).write_text(json.dumps({"replaced": _REPORT.get("replaced", []),
                                         "by_path": sorted(set(_REPORT.get("by_path", [])))}))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminalreporter.write_line(f"fastppo_peer_patch: patched {_REPORT.get('replaced')}")
    if "by_path" in _REPORT:
        terminalreporter.write_line(f"fastppo_peer_patch: by path {sorted(set(_REPORT['by_path']))}")
