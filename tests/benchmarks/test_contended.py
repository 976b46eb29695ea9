"""The contended-CPU case of the bench: the busy processes are bounded and cleaned up, and the
``slowdown`` target compares the C++ op's slowdown with eager PyTorch's."""

from __future__ import annotations

import time

from fastppo.benchmarks import bench_contended, targets

CPU = {"device": "cpu", "device_name": "CPU: test"}


def test_busy_processes_stop_when_the_block_ends_and_by_themselves():
    with bench_contended.busy_cores(2) as procs:
        assert len(procs) == 2 and all(p.poll() is None for p in procs)  # spinning
    assert all(p.poll() is not None for p in procs)  # killed and reaped at the end of the block
    with bench_contended.busy_cores(1, limit_s=0.3) as procs:
        deadline = time.monotonic() + 30
        while procs[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert procs[0].returncode == 0  # it ended on its own time limit, not killed


def _rows(cpp_slowdown: float, eager_slowdown: float) -> list[dict]:
    rows = []
    for op, shape in (("gae", {"B": 256, "T": 1024}), ("logprobs", {"N": 256, "V": 4096})):
        for prov, sd in (("fastppo[cpp]", cpp_slowdown), ("eager", eager_slowdown)):
            rows.append({"op": op, "mode": "fwd contended", "dtype": "float32", "provider": prov, "status": "ok",
                         "err_flag": "ok", "median_ms": 2.0 * sd, "extra": {"quiet_ms": 2.0, "slowdown": sd},
                         **shape})
    return rows


def test_slowdown_target_pass_and_fail():
    keys = ("contended-gae", "contended-logprobs")
    ok = {c.target: c for c in targets.evaluate(_rows(2.0, 1.8), CPU) if c.target in keys}
    assert {c.status for c in ok.values()} == {"pass"} and set(ok) == set(keys)
    assert abs(ok["contended-gae"].measured - 2.0 / 1.8) < 1e-9
    assert "x2 slower under load / eager x1.8" in ok["contended-gae"].detail
    bad = [c for c in targets.evaluate(_rows(30.0, 2.0), CPU) if c.target in keys]
    assert {c.status for c in bad} == {"FAIL"} and bad[0].measured == 15.0
    missing = [c for c in targets.evaluate([dict(r, extra={}) for r in _rows(1, 1)], CPU) if c.target in keys]
    assert {c.status for c in missing} == {"not measured"}
    assert targets.fmt_target(bad[0]) == "slowdown <= 1.5x eager's"
    assert targets.fmt_measured(bad[0]) == "15.00 of eager's"
