"""How the suite measures time and memory.

Time
  GPU: ``triton.testing.do_bench`` (CUDA events around each call, L2 flushed between calls, median), falling
  back to our own CUDA-event loop when Triton is missing.
  CPU: ``time.perf_counter`` around each call after ``warmup`` calls; at least ``min_repeats`` calls and at
  least ``min_time_s`` of calls (capped at ``max_repeats``); the median is reported.

Peak extra memory
  GPU: ``torch.cuda.max_memory_allocated()`` during one call minus ``memory_allocated()`` before it (memory the
  call needs on top of its inputs; outputs still alive at the end count, as they would in a training step).
  CPU: ``tracemalloc`` cannot see torch's allocator, so we use the kernel's resident-set high-water mark.
  For the whole run glibc's mmap threshold is pinned at 32 MiB (``pin_cpu_allocator``): that is the value
  glibc's dynamic threshold settles at in a long-running process, so timings see the usual steady state. For
  the one probed call the threshold drops to 64 KiB and ``malloc_trim(0)`` hands free heap pages back, so
  every tensor above 64 KiB is a fresh mapping or freshly faulted heap page rather than resident memory being
  recycled; ``VmHWM`` is reset by writing ``5`` to ``/proc/self/clear_refs``, and the peak is ``VmHWM`` after
  the call minus ``VmRSS`` before it. Then the threshold goes back to 32 MiB. Where glibc or ``clear_refs`` is
  unavailable the figure is reported as ``None`` ("n/a"), never guessed.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TimingConfig:
    warmup: int = 2
    min_repeats: int = 5
    min_time_s: float = 0.5
    max_repeats: int = 200
    gpu_warmup_ms: float = 25.0
    gpu_rep_ms: float = 100.0


QUICK = TimingConfig(warmup=1, min_repeats=3, min_time_s=0.05, max_repeats=20, gpu_warmup_ms=10.0, gpu_rep_ms=30.0)
FULL = TimingConfig()


@dataclass(frozen=True)
class Timing:
    median_ms: float
    repeats: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, cfg: TimingConfig) -> Timing:
    """Median wall time of ``fn()`` in milliseconds (see the module docstring for the method per device)."""
    if device.type == "cuda":
        return _time_cuda(fn, device, cfg)
    for _ in range(cfg.warmup):
        fn()
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < cfg.max_repeats and (
        len(times) < cfg.min_repeats or time.perf_counter() - start_all < cfg.min_time_s
    ):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), len(times))


def _time_cuda(fn: Callable[[], object], device: torch.device, cfg: TimingConfig) -> Timing:
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        ms = do_bench(fn, warmup=cfg.gpu_warmup_ms, rep=cfg.gpu_rep_ms, return_mode="median")
        return Timing(float(ms), -1)  # do_bench picks the repeat count from rep_ms; it does not report it
    for _ in range(max(cfg.warmup, 3)):
        fn()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(max(cfg.min_repeats, 10)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return Timing(statistics.median(times), len(times))


# ------------------------------------------------------------------------------------------------- memory
def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise KeyError(key)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def cpu_peak_supported() -> bool:
    try:
        _proc_status_bytes("VmHWM")
    except (OSError, KeyError):
        return False
    return _reset_hwm()


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter; setting it also turns the dynamic threshold off
_STEADY_THRESHOLD = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
_PROBE_THRESHOLD = 64 * 1024


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt  # noqa: B018  (glibc only: musl/macOS lack mallopt/malloc_trim)
        libc.malloc_trim  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


def pin_cpu_allocator() -> bool:
    """Pin glibc's mmap threshold at its steady-state 32 MiB for the run (see the module docstring)."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, _STEADY_THRESHOLD))


def _cpu_peak(fn: Callable[[], object]) -> int | None:
    libc = _libc()
    if libc is None or not cpu_peak_supported():
        return None
    libc.mallopt(_M_MMAP_THRESHOLD, _PROBE_THRESHOLD)
    try:
        libc.malloc_trim(0)
        base = _proc_status_bytes("VmRSS")
        _reset_hwm()
        out = fn()
        peak = _proc_status_bytes("VmHWM") - base
        del out
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _STEADY_THRESHOLD)
    return max(int(peak), 0)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory ``fn()`` needs beyond what was allocated before it (bytes), or None when unmeasurable."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return max(int(peak), 0)
    return _cpu_peak(fn)
