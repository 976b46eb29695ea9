"""C++ CPU extension tests. The extension must build and load in CI: a missing module fails these tests with
its import error (it is never skipped). ``simd`` runs a test on every row-kernel path the CPU has (AVX-512, AVX2,
scalar)."""

from __future__ import annotations

import pytest

from fastppo import _native


@pytest.fixture(scope="session")
def cpp():
    """The launcher layer over fastppo._C_cpu (the objects autograd.py calls)."""
    launchers = _native.launchers("cpp")
    assert launchers is not None, f"fastppo._C_cpu did not load: {_native.import_error('cpp')}"
    return launchers


@pytest.fixture(params=["avx512", "avx2", "scalar"])
def simd(request, cpp):
    """Run on each row-kernel instruction set this CPU has (AVX-512F, AVX2+FMA+F16C, portable scalar)."""
    want = request.param
    try:
        if cpp.module.set_simd_level(want) != want:
            pytest.skip(f"this CPU has no {want}; the lower levels cover it")
        yield want
    finally:
        cpp.module.set_simd_level("avx512")  # back to the best the CPU supports
