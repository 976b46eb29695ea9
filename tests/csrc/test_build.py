"""The native extensions as built artefacts: the CPU module loads and reports itself, and every CUDA source
compiles with nvcc for sm_80 and sm_90 (run on CPU CI too, so the CUDA code cannot rot unseen)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import fastppo
from fastppo import _dispatch, _native

ROOT = Path(__file__).resolve().parents[2]
CU_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc")


def test_cpu_extension_loads_and_reports():
    info = fastppo.backends()["cpp"]
    assert info.available, info.reason
    assert "fastppo._C_cpu" in info.reason
    mod = _native.module("cpp")
    assert mod.simd_level() in ("avx512", "avx2", "scalar")
    assert mod.NUM_TERMS == len(fastppo._contract.PPO_TERMS)
    launchers = _dispatch.launcher_module("cpp")
    for fn in ("logprobs_forward", "logprobs_backward", "ppo_loss_forward", "gae_forward"):
        assert callable(getattr(launchers, fn))


def test_best_simd_level_for_this_cpu():
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    has_avx2 = all(f" {f}" in flags for f in ("avx2", "fma", "f16c"))
    expected = "avx512" if has_avx2 and " avx512f" in flags else ("avx2" if has_avx2 else "scalar")
    assert _native.module("cpp").simd_level() == expected
    with pytest.raises(ValueError, match="simd level"):
        _native.module("cpp").set_simd_level("sse9")


def test_missing_extension_reports_its_import_error(monkeypatch):
    monkeypatch.setitem(_native._STATE, "cpp", (None, "ImportError: no module named fastppo._C_cpu", None))
    info = fastppo.backends()["cpp"]
    assert not info.available and "ImportError" in info.reason
    assert _dispatch.launcher_module("cpp") is None
    with pytest.raises(fastppo.BackendUnavailableError, match="ImportError"):
        _dispatch.resolve("cpp", __import__("torch").device("cpu"), "logprobs")


@pytest.fixture(scope="module")
def cuda_objects(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every .cu compiled once with nvcc -c for sm_80 and sm_90 (warnings are errors)."""
    out = tmp_path_factory.mktemp("cuda_objects")
    built = {}
    for src in CU_SOURCES:
        obj = out / (src.stem + ".o")
        cmd = [NVCC, "-c", "-std=c++17", "-O3", f"-I{ROOT / 'csrc'}", "-Werror", "all-warnings", "-Xptxas", "-v",
               "-Xcompiler",
               "-Wall", "-Xcompiler", "-fPIC", "-gencode=arch=compute_80,code=sm_80",
               "-gencode=arch=compute_90,code=sm_90", str(src), "-o", str(obj)]
        built[src.name] = (subprocess.run(cmd, capture_output=True, text=True, timeout=300), obj)
    return built


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")
@pytest.mark.parametrize("src", CU_SOURCES, ids=lambda p: p.name)
def test_cuda_sources_compile_for_sm80_and_sm90_without_spills(src, cuda_objects):
    """Compiles, and ptxas (-v) reports every kernel of both targets with no stack frame and no spills."""
    res, obj = cuda_objects[src.name]
    assert res.returncode == 0, f"{' '.join(res.args)}\n{res.stdout}\n{res.stderr}"
    assert obj.stat().st_size > 0
    log = res.stdout + res.stderr
    entries = [line for line in log.splitlines() if "Compiling entry function" in line]
    frames = [line.strip() for line in log.splitlines() if "bytes stack frame" in line]
    assert entries and len(frames) == len(entries), log[-4000:]
    assert {"sm_80", "sm_90"} <= {line.rsplit("'", 2)[-2] for line in entries}
    for entry, frame in zip(entries, frames, strict=True):
        assert frame == "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads", f"{entry}: {frame}"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")
def test_cuda_extension_links_and_imports(cuda_objects, tmp_path):
    """The binding and the kernels agree on every launcher signature: link as setup.py does, then import (the
    module loads without a GPU; static cudart needs the driver only at the first launch)."""
    pybind11 = pytest.importorskip("pybind11")
    for res, _ in cuda_objects.values():
        assert res.returncode == 0, res.stderr
    cxx = shutil.which("c++") or shutil.which("g++")
    binding = tmp_path / "bindings_cuda.o"
    cmd = [cxx, "-std=c++17", "-O1", "-fPIC", "-fvisibility=hidden", "-c", f"-I{ROOT / 'csrc'}",
           f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
           str(ROOT / "csrc" / "bindings_cuda.cpp"), "-o", str(binding)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    so = tmp_path / ("_C_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = [NVCC, "-shared", "--cudart=static", str(binding), *(str(o) for _, o in cuda_objects.values()),
           "-o", str(so)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    probe = ("import importlib.util as u, sys; "
             "spec = u.spec_from_file_location('_C_cuda', sys.argv[1]); mod = u.module_from_spec(spec); "
             "spec.loader.exec_module(mod); "
             "assert all(hasattr(mod, f) for f in ('logprobs_forward', 'logprobs_backward', 'ppo_loss_forward', "
             "'gae_forward')); print(mod.NUM_TERMS)")
    res = subprocess.run([sys.executable, "-c", probe, str(so)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(len(fastppo._contract.PPO_TERMS))


def test_cuda_sources_exist():
    assert {p.name for p in CU_SOURCES} >= {"logprobs.cu", "gae.cu"}


def test_cuda_binding_compiles_without_cuda_or_torch_headers(tmp_path):
    """bindings_cuda.cpp sees only csrc/cuda/kernels.h: a plain C++ compiler builds it."""
    pybind11 = pytest.importorskip("pybind11")
    cxx = shutil.which("c++") or shutil.which("g++")
    assert cxx is not None, "no C++ compiler"
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-Wall", f"-I{ROOT / 'csrc'}", f"-I{pybind11.get_include()}",
           f"-I{sysconfig.get_paths()['include']}", str(ROOT / "csrc" / "bindings_cuda.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    for src in [*(ROOT / "csrc").rglob("*.cu"), *(ROOT / "csrc").rglob("*.h"), *(ROOT / "csrc").rglob("*.cuh"),
                *(ROOT / "csrc").rglob("*.cpp")]:
        text = src.read_text()
        assert "<torch/" not in text and "ATen" not in text, f"{src} includes torch headers"


def test_no_fast_math_in_build_flags():
    """-ffast-math would let the compiler assume no inf/NaN: masked -inf logits and NaN detection need them."""
    text = (ROOT / "setup.py").read_text()
    flags_line = next(line for line in text.splitlines() if line.startswith("CXX_FLAGS"))
    assert "fast-math" not in flags_line and "finite-math" not in flags_line
    assert "-fopenmp" in flags_line
