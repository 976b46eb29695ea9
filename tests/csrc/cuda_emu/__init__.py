"""The CUDA kernels of ``csrc/cuda`` built for the CPU SIMT emulator (``simt.h``), for tests without a GPU.

``build(out_dir)`` turns each ``.cu`` file into C++ (the only CUDA syntax in them is the ``kernel<<<grid,
block, shared, stream>>>(args)`` launch, rewritten into a call of ``fastppo_emu::launch``), compiles it with the
emulated CUDA headers of this folder, the emulator and the unchanged pybind11 binding ``csrc/bindings_cuda.cpp``
into a ``_C_cuda`` module, and imports it. ``EmulatedCudaLaunchers`` is the production launcher layer
(``fastppo._native_launchers.NativeLaunchers``) over that module, taking CPU tensors, so that tests drive the
kernels exactly as ``backend="cuda"`` does on a GPU: same launchers, same binding, same kernel source.

It proves the kernels' arithmetic, indexing, masking, strides, reductions and barrier structure, not their
speed, and not what the emulator cannot see (see simt.h): those need a GPU run (``pytest -m gpu``).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sysconfig
from pathlib import Path
from types import ModuleType

from torch import Tensor

from fastppo._native_launchers import NativeLaunchers

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[2] / "csrc"


def _matching(src: str, i: int, open_ch: str, close_ch: str, step: int) -> int:
    """Index of the bracket matching ``src[i]`` scanning in direction ``step`` (+1 or -1)."""
    depth = 0
    while True:
        c = src[i]
        if c == open_ch:
            depth += 1
        elif c == close_ch:
            depth -= 1
            if depth == 0:
                return i
        i += step


def rewrite_launches(src: str) -> str:
    """``name<T><<<cfg>>>(args);`` -> ``::fastppo_emu::launch([&]() { name<T>(args); }, cfg);``."""
    out, pos = [], 0
    while (start := src.find("<<<", pos)) >= 0:
        end = src.find(">>>", start)
        name_end = start
        if src[name_end - 1] == ">":  # template arguments of the kernel
            name_end = _matching(src, name_end - 1, ">", "<", -1)
        name_start = name_end
        while name_start > 0 and (src[name_start - 1].isalnum() or src[name_start - 1] in "_:"):
            name_start -= 1
        kernel = src[name_start:start]
        paren = end + 3
        if src[paren] != "(":
            raise ValueError(f"unexpected launch syntax near {src[name_start:paren + 20]!r}")
        close = _matching(src, paren, "(", ")", +1)
        out.append(src[pos:name_start])
        out.append(f"::fastppo_emu::launch([&]() {{ {kernel}({src[paren + 1:close]}); }}, {src[start + 3:end]})")
        pos = close + 1
    out.append(src[pos:])
    return "".join(out)


def build(out_dir: Path) -> ModuleType:
    """Compile csrc/cuda + the emulator + csrc/bindings_cuda.cpp into ``out_dir/_C_cuda*.so`` and import it."""
    import pybind11

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++/g++) on PATH")
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = [CSRC / "bindings_cuda.cpp", HERE / "simt.cpp"]
    for cu in sorted((CSRC / "cuda").glob("*.cu")):
        dst = out_dir / (cu.stem + "_emu.cpp")
        dst.write_text(f'#line 1 "{cu}"\n' + rewrite_launches(cu.read_text()))
        sources.append(dst)
    so = out_dir / ("_C_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
    # -O1: fast to build, and no -ffast-math (the kernels' -inf/NaN handling is part of what is tested);
    # `#pragma unroll` is nvcc's.
    cmd = [cxx, "-std=c++17", "-O1", "-g0", "-fPIC", "-shared", "-fvisibility=hidden", "-Wall", "-Werror",
           "-Wno-unknown-pragmas", f"-I{HERE}", f"-I{CSRC / 'cuda'}", f"-I{CSRC}", f"-I{pybind11.get_include()}",
           f"-I{sysconfig.get_paths()['include']}", *map(str, sources), "-o", str(so)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"building the emulated CUDA module failed:\n{' '.join(cmd)}\n{res.stderr[-6000:]}")
    spec = importlib.util.spec_from_file_location("_C_cuda", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class EmulatedCudaLaunchers(NativeLaunchers):
    """``NativeLaunchers("cuda", module)`` over CPU tensors: device index 0 and a null stream."""

    def __init__(self, mod: ModuleType) -> None:
        super().__init__("cuda", mod)
        self.device_type = "cpu"

    def _tail(self, t: Tensor) -> tuple[int, ...]:
        return (0, 0)
