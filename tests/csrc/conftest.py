"""C++ CPU extension tests. The extension must build and load in CI: a missing module fails these tests with
its import error (it is never skipped). ``simd`` runs a test on both row-kernel paths (AVX2 and scalar)."""

from __future__ import annotations

import pytest

from fastppo import _native


@pytest.fixture(scope="session")
def cpp():
    """The launcher layer over fastppo._C_cpu (the objects autograd.py calls)."""
    launchers = _native.launchers("cpp")
    assert launchers is not None, f"fastppo._C_cpu did not load: {_native.import_error('cpp')}"
    return launchers


@pytest.fixture(params=["avx2", "scalar"])
def simd(request, cpp):
    """Run on the AVX2 kernels (when this CPU has them) and on the portable scalar ones."""
    want = request.param
    cpp.module.set_simd_enabled(want == "avx2")
    try:
        if want == "avx2" and cpp.module.simd_level() != "avx2":
            pytest.skip("this CPU has no AVX2+FMA+F16C; the scalar variant covers it")
        yield want
    finally:
        cpp.module.set_simd_enabled(True)
