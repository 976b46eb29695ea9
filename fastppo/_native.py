"""Loads the compiled csrc modules and keeps their import errors.

The native modules are plain pybind11 extensions (no libtorch linkage): ``fastppo._C_cpu`` holds the
C++/OpenMP kernels, ``fastppo._C_cuda`` the CUDA kernels. Both are optional; when one is missing the
error that stopped it is kept so that ``fastppo.backends()`` and an explicit ``backend=`` request can
say why. ``launchers(kind)`` wraps a loaded module in the Python launcher layer
(``fastppo._native_launchers``) that implements the contract of ``fastppo/autograd.py``.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

_MODULES = {"cpp": "fastppo._C_cpu", "cuda": "fastppo._C_cuda"}
_STATE: dict[str, tuple[ModuleType | None, str | None, object | None]] = {}


def _load(kind: str) -> tuple[ModuleType | None, str | None, object | None]:
    """``(module, import error, launchers)`` of ``kind``, loaded once. A plain dict (not functools caching) so
    that ``torch.compile`` traces the dispatch through it as constant lookups."""
    state = _STATE.get(kind)
    if state is not None:
        return state
    name = _MODULES[kind]
    try:
        from fastppo._native_launchers import NativeLaunchers

        mod = importlib.import_module(name)
        state = (mod, None, NativeLaunchers(kind, mod))  # a module of another build's layout counts as missing
    except Exception as exc:  # ImportError, or an OSError from a missing shared library
        state = (None, f"{type(exc).__name__}: {exc}", None)
    _STATE[kind] = state
    return state


def module(kind: str) -> ModuleType | None:
    """The compiled module for ``kind`` ('cpp' or 'cuda'), or None when it is not built/loadable."""
    return _load(kind)[0]


def launchers(kind: str) -> object | None:
    """The contract launchers (``fastppo._native_launchers.NativeLaunchers``) of ``kind``, or None when the
    compiled module is not loaded."""
    return _load(kind)[2]


def import_error(kind: str) -> str | None:
    """Why the compiled module for ``kind`` could not be loaded (None when it loaded)."""
    return _load(kind)[1]


def openmp_runtimes() -> list[str]:
    """Paths of the OpenMP runtimes mapped into this process (Linux; ``[]`` where ``/proc`` is absent).

    ``fastppo._C_cpu`` asks for ``libgomp.so.1`` by soname, and torch's wheel ships its own libgomp under that
    soname. torch is imported first (``fastppo._dispatch`` imports it before loading the module), so the dynamic
    linker resolves the extension's dependency to the copy torch already loaded: one OpenMP runtime, one thread
    pool per calling thread, shared by torch's ops and fastppo's kernels (the kernels also take torch's thread
    count, ``torch.get_num_threads()``). A wheel that renamed its libgomp (``libgomp-<hash>.so.1``) would give two
    runtimes; this function lets a test (and ``fastppo backends``) see it.
    """
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    names = ("libgomp", "libiomp", "libomp")
    paths = {line.split()[-1] for line in lines if "/" in line}
    return sorted({os.path.realpath(p) for p in paths if any(n in p.rsplit("/", 1)[-1] for n in names)})


# Load at import, outside any traced region (importing inside torch.compile's tracing is not supported).
for _kind in _MODULES:
    _load(_kind)
