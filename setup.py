"""Build script for fastppo's optional native extensions (csrc/).

The pure-Python package always installs. Two pybind11 modules are built when possible, neither links
libtorch (the kernels take raw pointers, sizes and strides from ``fastppo/_native_launchers.py``), so the
build needs no torch and the result works with any installed torch:

  fastppo._C_cpu   csrc/cpu/*.cpp + csrc/bindings_cpu.cpp: C++/OpenMP kernels (always attempted)
  fastppo._C_cuda  csrc/cuda/*.cu + csrc/bindings_cuda.cpp: CUDA kernels, when nvcc is found and the machine
                   looks like a CUDA one (torch.cuda available, or nvidia-smi lists a GPU); FASTPPO_BUILD_CUDA=1
                   forces it, =0 skips it; FASTPPO_CUDA_ARCHS="80;90" picks the GPU architectures.

Sources compile in parallel through a generated ninja file (``MAX_JOBS`` caps the jobs; without ninja the
plain setuptools compiler runs). ``FASTPPO_SKIP_EXT=1`` skips the native build. A failed extension prints
a warning and the install goes on without it; ``fastppo.backends()`` then says what is missing.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
# No -ffast-math / -ffinite-math-only: masked vocabulary entries are -inf and NaN logits must stay NaN.
# -ffp-contract=off: g++ would fuse the row kernels' x*(1/T) and "- max" into one FMA, whose unrounded product
# no longer matches the rounded row max (exp overflows at small temperatures); explicit FMA intrinsics remain.
CXX_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-fopenmp", "-fno-math-errno", "-ffp-contract=off",
             "-Wall", "-DNDEBUG"]
NVCC_FLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden", "-DNDEBUG"]


def _env_flag(name: str, default: str = "0") -> str:
    return os.environ.get(name, default).strip().lower()


def _skip_all() -> bool:
    return _env_flag("FASTPPO_SKIP_EXT") not in ("", "0", "false", "no")


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cuda_machine() -> bool:
    try:
        import torch  # only a hint: the isolated build env has no torch

        return bool(torch.version.cuda) and torch.cuda.is_available()
    except Exception:
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
        return out.returncode == 0 and "GPU" in out.stdout
    except Exception:
        return False


def _want_cuda() -> str | None:
    """The nvcc to build the CUDA extension with, or None to skip it."""
    choice = _env_flag("FASTPPO_BUILD_CUDA", "auto")
    if choice in ("0", "false", "no"):
        return None
    nvcc = _nvcc()
    if nvcc is None:
        return None
    return nvcc if choice in ("1", "true", "yes") or _cuda_machine() else None


def cuda_arch_flags() -> list[str]:
    """-gencode flags for FASTPPO_CUDA_ARCHS (default 80;90: A100, H100/H200) plus PTX of the newest."""
    archs = [a.strip().replace(".", "") for a in os.environ.get("FASTPPO_CUDA_ARCHS", "80;90").split(";") if a.strip()]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


def _extensions() -> list:
    if _skip_all():
        print("fastppo: FASTPPO_SKIP_EXT set: installing the pure-Python package without native extensions")
        return []
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        print("fastppo: WARNING: pybind11 is not installed; building without native extensions")
        return []
    rel = lambda p: str(p.relative_to(ROOT))  # noqa: E731  (setuptools wants relative source paths)
    exts = [
        Pybind11Extension(
            "fastppo._C_cpu",
            [rel(CSRC / "bindings_cpu.cpp"), *sorted(rel(p) for p in (CSRC / "cpu").glob("*.cpp"))],
            include_dirs=[str(CSRC)],
            extra_compile_args=CXX_FLAGS,
            extra_link_args=["-fopenmp"],
            cxx_std=17,
        )
    ]
    nvcc = _want_cuda()
    if nvcc is not None:
        exts.append(
            Pybind11Extension(
                "fastppo._C_cuda",
                [rel(CSRC / "bindings_cuda.cpp"), *sorted(rel(p) for p in (CSRC / "cuda").glob("*.cu"))],
                include_dirs=[str(CSRC)],
                extra_compile_args=[f for f in CXX_FLAGS if f != "-fopenmp"],
                cxx_std=17,
            )
        )
        exts[-1].nvcc = nvcc
    return exts


def _ninja_escape(path: str) -> str:
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _ninja_binary() -> str | None:
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja  # the PyPI package ships the binary

        cand = Path(ninja.BIN_DIR) / "ninja"
        return str(cand) if cand.exists() else None
    except Exception:
        return None


class NinjaBuildExt(build_ext):
    """build_ext that compiles each extension's sources through a generated build.ninja (parallel,
    incremental), handles .cu sources with nvcc, and turns a failed extension into a warning."""

    def run(self) -> None:
        self._failed: set[str] = set()
        super().run()

    def build_extension(self, ext) -> None:
        try:
            ninja = _ninja_binary()
            if ninja is not None:
                self._build_with_ninja(ext, ninja)
            elif any(s.endswith(".cu") for s in ext.sources):
                raise RuntimeError("the CUDA extension needs ninja (pip install ninja)")
            else:
                from pybind11.setup_helpers import ParallelCompile

                ParallelCompile("MAX_JOBS").install()
                super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - any failure leaves a working pure-Python install
            self._failed.add(ext.name)
            bar = "=" * 100
            print(f"\n{bar}\nfastppo: WARNING: building {ext.name} failed; installing without it "
                  f"(backend {'cpp' if ext.name.endswith('cpu') else 'cuda'} unavailable).\n{exc}\n{bar}\n",
                  file=sys.stderr)

    def copy_extensions_to_source(self) -> None:
        failed = getattr(self, "_failed", set())
        keep = self.extensions
        self.extensions = [e for e in keep if e.name not in failed]
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = keep

    def get_outputs(self) -> list[str]:
        failed = getattr(self, "_failed", set())
        return [self.get_ext_fullpath(e.name) for e in self.extensions if e.name not in failed]

    def _build_with_ninja(self, ext, ninja: str) -> None:
        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        bdir = (Path(self.build_temp) / ext.name).resolve()
        bdir.mkdir(parents=True, exist_ok=True)
        cxx = shlex.split(os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++")
        includes = [*ext.include_dirs, sysconfig.get_paths()["include"]]
        inc = [f"-I{d}" for d in includes]
        macros = [f"-D{k}" if v is None else f"-D{k}={v}" for k, v in ext.define_macros]
        cxxflags = [*inc, *macros, *ext.extra_compile_args]
        nvcc = getattr(ext, "nvcc", None)
        ldflags = list(ext.extra_link_args)
        lines = ["ninja_required_version = 1.3", f"cxx = {shlex.join(cxx)}", f"cxxflags = {shlex.join(cxxflags)}"]
        lines += [
            "rule cxx",
            "  command = $cxx -MMD -MF $out.d $cxxflags -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = CXX $in",
        ]
        if nvcc is not None:
            nvccflags = [*inc, *macros, *NVCC_FLAGS, *cuda_arch_flags(), f"-ccbin={cxx[0]}"]
            lines += [
                f"nvcc = {shlex.quote(nvcc)}",
                f"nvccflags = {shlex.join(nvccflags)}",
                "rule nvcc",
                "  command = $nvcc $nvccflags -c $in -o $out",
                "  description = NVCC $in",
            ]
            # nvcc links (it knows its own library directory, even behind a wrapper script); static cudart:
            # the module needs only the driver at run time, whatever CUDA runtime torch ships with
            linker = "$nvcc -shared --cudart=static"
        else:
            linker = "$cxx -shared"
        lines += ["rule link", f"  command = {linker} $in -o $out $ldflags", "  description = LINK $out"]
        objects = []
        for src in ext.sources:
            src_abs = (ROOT / src).resolve()
            obj = bdir / (src_abs.relative_to(ROOT).as_posix().replace("/", "_") + ".o")
            rule = "nvcc" if src.endswith(".cu") else "cxx"
            lines.append(f"build {_ninja_escape(str(obj))}: {rule} {_ninja_escape(str(src_abs))}")
            objects.append(_ninja_escape(str(obj)))
        lines.append(f"build {_ninja_escape(str(out_path))}: link {' '.join(objects)}")
        lines.append(f"  ldflags = {shlex.join(ldflags)}")
        lines.append(f"default {_ninja_escape(str(out_path))}")
        (bdir / "build.ninja").write_text("\n".join(lines) + "\n")
        cmd = [ninja, "-C", str(bdir)]
        jobs = os.environ.get("MAX_JOBS")
        if jobs and jobs.strip().isdigit() and int(jobs) > 0:
            cmd += ["-j", jobs.strip()]
        print(f"fastppo: building {ext.name} with ninja ({' '.join(cmd)})")
        subprocess.run(cmd, check=True)


setup(ext_modules=_extensions(), cmdclass={"build_ext": NinjaBuildExt})
