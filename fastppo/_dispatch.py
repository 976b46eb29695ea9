"""Which backends are usable here, and which one a call runs on.

Backends:
  torch    the plain-PyTorch reference (fastppo.reference); always there.
  triton   Triton kernels (fastppo.kernels) on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1.
  cpp      the C++/OpenMP extension (fastppo._C_cpu) on CPU tensors.
  cuda     the CUDA extension (fastppo._C_cuda) on CUDA tensors.

``auto`` (the default, or ``FASTPPO_BACKEND``) picks the fastest available backend for the tensor's device
that implements the op family, falling back quietly to ``torch``. An explicitly named backend that is not
usable raises ``BackendUnavailableError`` carrying the original reason and an install hint.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from functools import cache
from types import ModuleType

import torch

from fastppo import _launchers, _native
from fastppo._contract import triton_interpret

BACKENDS = ("torch", "triton", "cpp", "cuda")
_CHOICES = ("auto", *BACKENDS)

# The launchers each op family needs (derived from the typed protocols of fastppo/_launchers.py).
FAMILY_LAUNCHERS = _launchers.FAMILY_LAUNCHERS

_INSTALL_HINT = {
    "triton": "install Triton (`pip install triton`) on a machine with a CUDA GPU, or set TRITON_INTERPRET=1 "
    "to run the Triton kernels on CPU (slow; for tests)",
    "cpp": "rebuild the C++ extension: `pip install -e . --no-build-isolation` (needs a C++17 compiler; see the "
    "build log for the error; FASTPPO_SKIP_EXT=1 skips it on purpose)",
    "cuda": "rebuild the CUDA extension with nvcc and a CUDA-enabled PyTorch on a GPU machine: "
    "`pip install -e . --no-build-isolation`",
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here."""


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: str  # why it is missing, or what it runs on


@cache
def _triton_import() -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module("fastppo.kernels.launchers"), None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _probe(name: str) -> BackendInfo:
    if name == "torch":
        return BackendInfo("torch", True, "plain PyTorch reference (any device)")
    if name == "triton":
        mod, err = _triton_import()
        if mod is None:
            return BackendInfo("triton", False, err or "fastppo.kernels.launchers failed to import")
        if triton_interpret():
            return BackendInfo("triton", True, "Triton interpreter on CPU (TRITON_INTERPRET=1)")
        if not torch.cuda.is_available():  # asked only here and for cuda, not on every cpp dispatch
            return BackendInfo("triton", False, "no CUDA device (set TRITON_INTERPRET=1 to interpret on CPU)")
        return BackendInfo("triton", True, f"Triton on {torch.cuda.get_device_name()}")
    if name == "cpp":
        mod = _native.module("cpp")
        if mod is None:
            return BackendInfo("cpp", False, _native.import_error("cpp") or "not built")
        return BackendInfo("cpp", True, "C++/OpenMP extension fastppo._C_cpu")
    if name == "cuda":
        mod = _native.module("cuda")
        if mod is None:
            return BackendInfo("cuda", False, _native.import_error("cuda") or "not built")
        if not torch.cuda.is_available():
            return BackendInfo("cuda", False, "extension built but no CUDA device")
        return BackendInfo("cuda", True, "CUDA extension fastppo._C_cuda")
    raise ValueError(f"unknown backend {name!r}; choose from {_CHOICES}")


def _probe_interpreter() -> BackendInfo:
    """The Triton interpreter (Triton kernels on CPU tensors, for tests): a mode of the triton backend."""
    mod, err = _triton_import()
    if mod is None:
        return BackendInfo("triton-interpret", False, err or "fastppo.kernels.launchers failed to import")
    if triton_interpret():
        return BackendInfo("triton-interpret", True, "active: TRITON_INTERPRET=1, backend='triton' runs on CPU")
    return BackendInfo("triton-interpret", False, "TRITON_INTERPRET is not set (set it to 1 before the first launch)")


def backends() -> dict[str, BackendInfo]:
    """Every backend (and the Triton interpreter mode) with whether it is usable here and why (not)."""
    info = {name: _probe(name) for name in BACKENDS}
    info["triton-interpret"] = _probe_interpreter()
    return {k: info[k] for k in ("torch", "triton", "triton-interpret", "cpp", "cuda")}


def launcher_module(backend: str) -> object | None:
    """The object holding the launchers of ``backend``: the ``fastppo.kernels.launchers`` module, for cpp/cuda the
    Python launcher layer over the compiled module (``_native.launchers``), for torch the reference's
    (``fastppo._torch_launchers``); None when the backend is not loaded."""
    if backend == "triton":
        return _triton_import()[0]
    if backend in ("cpp", "cuda"):
        return _native.launchers(backend)
    if backend == "torch":
        from fastppo._torch_launchers import LAUNCHERS  # the reference's row math (imports the reference: lazily)

        return LAUNCHERS
    return None


def implements(backend: str, family: str) -> bool:
    if backend == "torch":
        return True
    mod = launcher_module(backend)
    return mod is not None and all(hasattr(mod, fn) for fn in FAMILY_LAUNCHERS.get(family, ("<none>",)))


def _device_ok(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return True
    if backend == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpret())
    if backend == "cpp":
        return device.type == "cpu"
    if backend == "cuda":
        return device.type == "cuda"
    return False


def requested_backend(backend: str | None) -> str:
    name = backend if backend is not None else os.environ.get("FASTPPO_BACKEND", "auto")
    name = name.strip().lower() or "auto"
    if name not in _CHOICES:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(_CHOICES)}")
    return name


def resolve(backend: str | None, device: torch.device, family: str | None) -> str:
    """The backend a call on ``device`` runs on.

    ``family`` is the kernel family of the op (see FAMILY_LAUNCHERS), or None for ops that run in PyTorch on
    every backend (elementwise work over ``[N]`` vectors, where a kernel buys nothing).
    """
    name = requested_backend(backend)
    if name == "auto":
        if family is None:
            return "torch"
        order = ("triton", "cuda") if device.type == "cuda" else ("cpp",)
        for cand in order:
            if _probe(cand).available and implements(cand, family):
                return cand
        return "torch"
    info = _probe(name)
    if not info.available:
        raise BackendUnavailableError(f"backend {name!r} is not available: {info.reason}. Hint: {_INSTALL_HINT[name]}")
    if not _device_ok(name, device):
        raise BackendUnavailableError(f"backend {name!r} cannot run on {device.type} tensors")
    if family is not None and not implements(name, family):
        raise BackendUnavailableError(f"backend {name!r} does not implement the {family!r} kernels in this build")
    return name if family is not None else "torch"


# The backend choice is host-side configuration: under torch.compile it is evaluated once at trace time and
# baked into the graph as a constant (tracing into it would reach importlib and break fullgraph=True). This is
# what torch.compiler.assume_constant_result(resolve) does, without importing torch._dynamo (seconds) with
# fastppo; tests/ops/test_torch_private_apis.py checks that the public function still sets this very marker.
resolve._dynamo_marked_constant = True  # type: ignore[attr-defined]
