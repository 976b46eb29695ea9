"""How the suite measures time and memory.

Time
  GPU: ``triton.testing.do_bench`` (CUDA events around each call, L2 flushed between calls, median), falling
  back to our own CUDA-event loop when Triton is missing.
  CPU: ``time.perf_counter`` around each call after ``warmup`` calls; at least ``min_repeats`` calls and at
  least ``min_time_s`` of calls (capped at ``max_repeats``); the median is reported.

Peak extra memory
  GPU: ``torch.cuda.max_memory_allocated()`` during one call minus ``memory_allocated()`` before it (memory the
  call needs on top of its inputs; outputs still alive at the end count, as they would in a training step).
  CPU: ``tracemalloc`` cannot see torch's allocator, so we use the kernel's resident-set high-water mark in a
  forked child. The child (which inherits the warmed-up provider and its inputs copy-on-write) pins glibc's
  mmap threshold to 64 KiB and calls ``malloc_trim(0)``, so every tensor above that is a fresh mapping or a
  freshly faulted heap page rather than recycled memory that is already resident; it resets ``VmHWM`` by
  writing ``5`` to ``/proc/self/clear_refs``, makes one call, and reports ``VmHWM`` minus ``VmRSS`` before the
  call, minus the fixed cost of any torch call in such a child (measured once on a 16-element op). The child
  runs single-threaded (GNU OpenMP's thread pool does not survive fork); peak memory does not depend on the
  thread count for these ops. The parent's allocator and timings are untouched. Where fork or ``clear_refs``
  is unavailable the figure is reported as ``None`` ("n/a"), never guessed.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import select
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


def _pin_mmap_threshold() -> None:
    libc = ctypes.CDLL(None)
    m_mmap_threshold = -3  # glibc's M_MMAP_THRESHOLD; setting it also turns off the dynamic threshold
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    # Free chunks left in the heap by earlier calls would be reused without new page faults (invisible to
    # VmHWM): hand their pages back first so that whatever the measured call touches is counted.
    libc.malloc_trim(0)


def _cpu_peak_forked(fn: Callable[[], object], timeout_s: float) -> int | None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: measure one call, report through the pipe, never return into the parent's code
        code = 1
        try:
            os.close(r)
            torch.set_num_threads(1)
            _pin_mmap_threshold()
            base = _proc_status_bytes("VmRSS")
            if _reset_hwm():
                out = fn()
                peak = _proc_status_bytes("VmHWM") - base
                del out
                os.write(w, str(peak).encode())
                code = 0
        except BaseException:
            pass
        finally:
            os._exit(code)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], timeout_s)
        data = os.read(r, 64) if ready else b""
    finally:
        os.close(r)
        if not data:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        os.waitpid(pid, 0)
    return int(data) if data else None


def peak_extra_bytes(fn: Callable[[], object], device: torch.device, timeout_s: float = 300.0) -> int | None:
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
    if not hasattr(os, "fork") or not cpu_peak_supported():
        return None
    peak = _cpu_peak_forked(fn, timeout_s)
    return None if peak is None else max(peak - _cpu_fixed_cost(), 0)


@functools.cache
def _cpu_fixed_cost() -> int:
    """What the child's first torch call costs whatever it does (dispatcher state, heap pages trimmed away and
    faulted back by small allocations; ~4.5 MiB here): measured once on a 16-element op and subtracted."""
    return _cpu_peak_forked(lambda: torch.empty(16).fill_(1.0), 60.0) or 0
