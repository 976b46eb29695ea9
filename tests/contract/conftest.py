"""The backends the contract suite runs every case on, as one ``backend`` fixture.

torch (the reference), triton (the interpreter on CPU, the compiler on a GPU), cpp at each SIMD level this CPU has,
cuda executed by the SIMT emulator on CPU, and cuda on a GPU. Each yields a ``Backend``: the ``backend=`` name the
public ops take, the device of its tensors and the launcher object behind that name (for torch: the reference's
row math, which the fused LM head's chunks call).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from fastppo import _dispatch, _native

GPU = torch.cuda.is_available()
_cpu_only = pytest.mark.skipif(GPU, reason="the GPU run covers this backend on the device")

BACKEND_PARAMS = [
    pytest.param("torch", id="torch"),
    pytest.param("triton-interpret", id="triton-interpret", marks=_cpu_only),
    pytest.param("cpp-avx512", id="cpp-avx512"),
    pytest.param("cpp-avx2", id="cpp-avx2"),
    pytest.param("cpp-scalar", id="cpp-scalar"),
    pytest.param("cuda-emulated", id="cuda-emulated"),
    pytest.param("triton", id="triton-gpu", marks=pytest.mark.gpu),
    pytest.param("cuda", id="cuda-gpu", marks=pytest.mark.gpu),
]


@dataclass(frozen=True)
class Backend:
    id: str
    name: str  # the public ops' backend= value
    device: torch.device
    launchers: object  # what the autograd glue calls (the torch backend's: the reference's row math)

    @property
    def kernel(self) -> bool:
        """A compiled or Triton backend (the torch backend's ops go through the reference, not its launchers)."""
        return self.name != "torch"


def _emulated_cuda(request, monkeypatch) -> object:
    """``backend="cuda"`` on CPU tensors, running csrc/cuda in the SIMT emulator through the real launchers."""
    from tests.csrc import cuda_emu

    cu = cuda_emu.EmulatedCudaLaunchers(request.getfixturevalue("emu_cuda_module"))
    probe, device_ok = _dispatch._probe, _dispatch._device_ok
    monkeypatch.setitem(_native._STATE, "cuda", (cu.module, None, cu))
    monkeypatch.setattr(_dispatch, "_probe", lambda name: (_dispatch.BackendInfo("cuda", True, "emulated")
                                                           if name == "cuda" else probe(name)))
    monkeypatch.setattr(_dispatch, "_device_ok", lambda name, dev: name == "cuda" or device_ok(name, dev))
    return cu


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request, monkeypatch):
    kind = request.param
    cpu = torch.device("cpu")
    if kind == "torch":
        yield Backend(kind, "torch", torch.device("cuda") if GPU else cpu, _dispatch.launcher_module("torch"))
    elif kind in ("triton-interpret", "triton"):
        yield Backend(kind, "triton", torch.device("cuda") if kind == "triton" else cpu,
                      _dispatch.launcher_module("triton"))
    elif kind.startswith("cpp-"):
        cpp = _native.launchers("cpp")
        assert cpp is not None, f"fastppo._C_cpu did not load: {_native.import_error('cpp')}"
        level = kind.removeprefix("cpp-")
        try:
            if cpp.module.set_simd_level(level) != level:
                pytest.skip(f"this CPU has no {level}; the lower levels cover it")
            yield Backend(kind, "cpp", cpu, cpp)
        finally:
            cpp.module.set_simd_level("avx512")  # back to the best the CPU supports
    elif kind == "cuda-emulated":
        yield Backend(kind, "cuda", cpu, _emulated_cuda(request, monkeypatch))
    else:
        yield Backend(kind, "cuda", torch.device("cuda"), _native.launchers("cuda"))
