"""Loads the compiled csrc modules and keeps their import errors.

The native modules are plain pybind11 extensions (no libtorch linkage): ``fastppo._C_cpu`` holds the
C++/OpenMP kernels, ``fastppo._C_cuda`` the CUDA kernels. Both are optional; when one is missing the
error that stopped it is kept so that ``fastppo.backends()`` and an explicit ``backend=`` request can
say why.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from types import ModuleType

_MODULES = {"cpp": "fastppo._C_cpu", "cuda": "fastppo._C_cuda"}


@lru_cache(maxsize=None)
def _load(kind: str) -> tuple[ModuleType | None, str | None]:
    name = _MODULES[kind]
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # ImportError, or an OSError from a missing shared library
        return None, f"{type(exc).__name__}: {exc}"


def module(kind: str) -> ModuleType | None:
    """The compiled module for ``kind`` ('cpp' or 'cuda'), or None when it is not built/loadable."""
    return _load(kind)[0]


def import_error(kind: str) -> str | None:
    """Why the compiled module for ``kind`` could not be loaded (None when it loaded)."""
    return _load(kind)[1]
