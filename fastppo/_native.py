"""Loads the compiled csrc modules and keeps their import errors.

The native modules are plain pybind11 extensions (no libtorch linkage): ``fastppo._C_cpu`` holds the
C++/OpenMP kernels, ``fastppo._C_cuda`` the CUDA kernels. Both are optional; when one is missing the
error that stopped it is kept so that ``fastppo.backends()`` and an explicit ``backend=`` request can
say why. ``launchers(kind)`` wraps a loaded module in the Python launcher layer
(``fastppo._native_launchers``) that implements the contract of ``fastppo/autograd.py``.
"""

from __future__ import annotations

import importlib
from functools import cache
from types import ModuleType

_MODULES = {"cpp": "fastppo._C_cpu", "cuda": "fastppo._C_cuda"}


@cache
def _load(kind: str) -> tuple[ModuleType | None, str | None]:
    name = _MODULES[kind]
    try:
        mod = importlib.import_module(name)
        _launchers_for(kind, mod)  # a module of another build's layout counts as not loaded
        return mod, None
    except Exception as exc:  # ImportError, or an OSError from a missing shared library
        return None, f"{type(exc).__name__}: {exc}"


@cache
def _launchers_for(kind: str, mod: ModuleType):
    from fastppo._native_launchers import NativeLaunchers

    return NativeLaunchers(kind, mod)


def module(kind: str) -> ModuleType | None:
    """The compiled module for ``kind`` ('cpp' or 'cuda'), or None when it is not built/loadable."""
    return _load(kind)[0]


def launchers(kind: str):
    """The contract launchers (``fastppo._native_launchers.NativeLaunchers``) of ``kind``, or None when the
    compiled module is not loaded."""
    mod = module(kind)
    return None if mod is None else _launchers_for(kind, mod)


def import_error(kind: str) -> str | None:
    """Why the compiled module for ``kind`` could not be loaded (None when it loaded)."""
    return _load(kind)[1]
