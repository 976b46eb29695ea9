"""Ahead-of-time compilation of Triton kernel variants for a Hopper GPU (sm_90), which needs no GPU, and the check
that ptxas keeps each variant in registers. The row/GAE kernels' tests (test_compile.py) and the tiled LM head's
(test_linear.py) each list their variants as ``(kernel, signature, constants, num_warps)`` and call
``assert_compiles_for_hopper_without_spills`` with the name of that list's function.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, stack and local (spill) bytes of a cubin, read with the cuobjdump Triton ships."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", out)}


def _variants(name: str) -> list[tuple]:
    module, func = name.split(":")
    return getattr(importlib.import_module(module), func)()


def compile_for_hopper(variants: str) -> list[str]:
    """Compile every variant that ``variants`` ("module:function") lists for sm_90; one line per variant: name,
    constants, warps and resource usage. Must run in a process where Triton was imported without TRITON_INTERPRET
    (the interpreter replaces Triton's own library functions at import)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    target = GPUTarget("cuda", 90, 32)
    lines = []
    for fn, sig, const, warps in _variants(variants):
        src = ASTSource(fn=JITFunction(fn), signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const)
        kernel = triton.compile(src, target=target, options={"num_warps": warps})
        assert kernel.asm["cubin"], f"{fn.__name__} {const}: no cubin"
        usage = resource_usage(kernel.asm["cubin"])
        lines.append(f"{fn.__name__} {const} warps={warps} " + " ".join(f"{k}={v}" for k, v in usage.items()))
    return lines


def assert_compiles_for_hopper_without_spills(variants: str) -> None:
    """Every variant compiles for sm_90, and ptxas keeps it in registers: no stack frame and no local-memory spills
    (a spill on a kernel's hot loop would cost more bandwidth than the kernel saves). Compiled in a child process:
    this one runs Triton under the interpreter."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    code = f"from tests.kernels.aot import compile_for_hopper; print('\\n'.join(compile_for_hopper({variants!r})))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if "warps=" in line]
    assert len(lines) == len(_variants(variants)), proc.stdout
    for line in lines:
        assert " STACK=0" in line and " LOCAL=0" in line, f"spills or stack use: {line}"
        assert " REG=" in line, line
