"""The GPU kit's offline path, dry-run on this CPU machine: wheels fetched by gpu_wheels.sh, installed by
gpu_run.sh with ``pip --no-index --no-deps``, then the bench phase with ``FASTPPO_BENCH_DEVICE=cpu``.

Needs a package index for the download (CI and the developers' machines reach one). The checkout is re-installed
editable into the running environment, as on the GPU machine (without compiling: ``FASTPPO_SKIP_EXT=1``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("wheels")
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    res = subprocess.run(["bash", str(KIT / "gpu_wheels.sh"), str(d)], capture_output=True, text=True,
                         env={**os.environ, "FASTPPO_GPU_PY": py}, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "total (" in res.stdout and "limit 64 MiB" in res.stdout
    return d


def test_wheel_list_is_pinned_and_fits_the_upload_limit(wheels):
    pinned = [ln.split("==")[0] for ln in (KIT / "gpu_wheels.txt").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert "trl" in pinned and "liger-kernel" in pinned
    names = {w.name.split("-")[0].replace("_", "-").lower() for w in wheels.glob("*.whl")}
    assert names == set(pinned)
    assert sum(w.stat().st_size for w in wheels.glob("*.whl")) < 64 * 2**20


def test_offline_install_and_bench_phases_dry_run(wheels, tmp_path):
    out, site = tmp_path / "out", tmp_path / "site"
    env = {**os.environ, "FASTPPO_BENCH_DEVICE": "cpu", "FASTPPO_GPU_WHEELS": str(wheels),
           "FASTPPO_GPU_SITE": str(site), "PYTHON": sys.executable, "FASTPPO_SKIP_EXT": "1",
           "FASTPPO_BENCH_ARGS": "--quick", "FASTPPO_BENCH_SUITES": "gae", "PIP_NO_INDEX": "1"}
    for phase in ("install", "bench"):
        res = subprocess.run(["bash", str(KIT / "gpu_run.sh"), str(out), phase], capture_output=True, text=True,
                             env=env, timeout=900, cwd=tmp_path)
        assert res.returncode == 0, f"{phase}:\n{res.stdout}\n{res.stderr}\n" + "\n".join(
            p.read_text()[-3000:] for p in out.glob("*.log"))
    install = (out / "install.log").read_text()
    assert "--no-index" not in install or "ERROR" not in install
    for mod in ("trl", "liger_kernel", "datasets"):
        code = f"import {mod}, sys; print({mod}.__file__)"
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(site)}, timeout=300)
        assert res.returncode == 0 and res.stdout.startswith(str(site)), res.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files  # what the device tool brings back from $OUT
    assert {"run.log", "install.log", "bench.log", "bench-results.tar"} <= set(files)
    with tarfile.open(out / "bench-results.tar") as tar:
        members = tar.getnames()
    assert any(f.startswith("./gae/") and f.endswith("-targets.csv") for f in members), members
    assert any(f.startswith("./gae/") and f.endswith(".json") for f in members), members
    run_log = (out / "run.log").read_text()
    assert "install:" in run_log and "bench:" in run_log and "rc=0" in run_log
    assert "torch" in run_log and "cpp" in run_log  # versions and `fastppo backends`
    assert "targets" in (out / "bench.log").read_text().lower()
