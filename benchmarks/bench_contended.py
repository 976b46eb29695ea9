"""Benchmark: the C++ CPU ops on a loaded machine, next to eager PyTorch in the same conditions.

An OpenMP parallel region is only as fast as its slowest thread: with another process busy on every core, a
worker that the OS has descheduled holds the whole region (and its closing barrier) for up to a scheduler time
slice, milliseconds, around a kernel of a tenth of a millisecond. This suite times each case twice in one run,
quiet and then with ``os.cpu_count()`` busy processes (pure spin loops, each ending by itself after
``BUSY_LIMIT_S`` and killed as soon as the case is done), for the fastppo C++ backend and for eager PyTorch
(whose ops use the same OpenMP runtime: torch's libgomp, shared with the extension, see
``fastppo._native.openmp_runtimes``).

Rows: mode ``"<mode> contended"``, ``median_ms`` under load, ``extra = {"quiet_ms", "slowdown"}`` with
``slowdown = contended / quiet``. Targets ``contended-*`` (``targets.py``) compare the slowdowns.
Cases: GAE at ``[256, 1024]`` (0.1 ms quiet, 16 ms under load before small problems stayed on one thread) and
the logprobs+entropy forward at ``N=256, V=4096``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import torch

from . import bench_gae, bench_logprobs
from .runner import Case, Row, run_case
from .timing import FULL, QUICK

OP = "contended"
BUSY_LIMIT_S = 120.0  # a spinner never outlives this, even if the bench is killed before it can stop them
SUBJECT = "fastppo[cpp]"
BASELINE = "eager"
_SPIN = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"


@contextlib.contextmanager
def busy_cores(n: int | None = None, limit_s: float = BUSY_LIMIT_S) -> Iterator[list[subprocess.Popen]]:
    """``n`` (default: every core) processes spinning on the CPU until the block ends (or ``limit_s`` passes)."""
    if n is None:
        n = os.cpu_count() or 1
    procs = [subprocess.Popen([sys.executable, "-c", _SPIN, str(limit_s)]) for _ in range(n)]
    try:
        time.sleep(0.2)  # let them start spinning before anything is timed
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def shapes() -> dict[str, tuple[int, int]]:
    """The cases' shapes, the same with --quick (only the timing loops are shorter): milliseconds per call."""
    return {"gae": (256, 1024), "logprobs": (256, 4096)}


def _cases(device: torch.device) -> Iterator[tuple[Case, Callable]]:
    b, t = shapes()["gae"]
    inputs = bench_gae.make_inputs(b, t, device)
    yield (Case("contended", bench_gae.OP, "fwd", device, torch.float32, {"N": b * t, "B": b, "T": t}, inputs,
                bench_gae.min_bytes(b, t), bench_gae.make_check(inputs)), bench_gae.providers)
    n, v = shapes()["logprobs"]
    x = bench_logprobs.make_inputs(n, v, torch.float32, device)
    bb, tt = x["labels"].shape
    yield (Case("contended", bench_logprobs.OP, "fwd", device, torch.float32, {"N": n, "V": v, "B": bb, "T": tt},
                x, bench_logprobs.min_bytes(n, v, torch.float32, "fwd"), bench_logprobs.make_check(x, "fwd")),
           bench_logprobs.providers)


def run(device: torch.device, quick: bool, log: Callable[[str], None] = print) -> list[Row]:
    """Quiet and contended timings of the C++ backend and eager PyTorch; one row per (case, provider)."""
    if device.type != "cpu":
        log("[contended] skipped: the contended case measures the CPU ops (run with --device cpu)")
        return []
    timing = QUICK if quick else FULL
    rows: list[Row] = []
    for case, providers in _cases(device):
        provs = [p for p in providers(device) if p.name in (SUBJECT, BASELINE)]
        t0 = time.perf_counter()
        quiet = run_case(case, provs, timing, log=log)
        with busy_cores():
            loaded = run_case(case, provs, timing, log=log)
        for q, c in zip(quiet, loaded, strict=True):
            c.mode = f"{case.mode} contended"
            if q.median_ms and c.median_ms:
                c.extra = {"quiet_ms": q.median_ms, "slowdown": c.median_ms / q.median_ms}
                c.notes = f"quiet {q.median_ms:.4g} ms; x{c.extra['slowdown']:.2f} with every core busy"
            rows.append(c)
        summary = ", ".join(f"{r.provider} x{r.extra['slowdown']:.2f}" for r in loaded if "slowdown" in r.extra)
        log(f"[contended] {case.op} {case.shape} slowdown under {os.cpu_count()} busy processes: {summary} "
            f"({time.perf_counter() - t0:.1f}s)")
    return rows
