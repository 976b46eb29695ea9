"""The copy baseline moves exactly the case's min_bytes (half read, half written) and is never error-checked."""

from __future__ import annotations

import pytest
import torch

from fastppo.benchmarks import bench_gae, bench_logprobs, copy_baseline, runner, timing

CPU = torch.device("cpu")


def _gae_case(b: int, t: int) -> runner.Case:
    inputs = bench_gae.make_inputs(b, t, CPU)
    return runner.Case("gae", "gae", "fwd", CPU, torch.float32, {"N": b * t, "B": b, "T": t}, inputs,
                       bench_gae.min_bytes(b, t), bench_gae.make_check(inputs))


def test_copy_reads_and_writes_half_of_min_bytes_each():
    case = _gae_case(3, 41)  # 17 * 123 = 2091 bytes: odd, so the copy moves one byte less
    run = copy_baseline.copy_provider().setup(case)
    cells = dict(zip(run.__code__.co_freevars, (c.cell_contents for c in run.__closure__), strict=True))
    src, dst = cells["src"], cells["dst"]
    assert src.dtype == dst.dtype == torch.uint8 and src.numel() == dst.numel() == case.min_bytes // 2
    assert src.data_ptr() != dst.data_ptr()
    assert run() == {}
    assert torch.equal(dst, src) and int(src.min()) == 7  # the copy happened, from a filled (non-zero) buffer


def test_copy_row_is_timed_not_checked():
    case = _gae_case(5, 63)

    def boom(out):
        raise AssertionError("the copy baseline must not be checked against the reference")
    case.check = boom
    (row,) = runner.run_case(case, [copy_baseline.copy_provider()], timing.QUICK, log=lambda m: None)
    assert row.status == "ok" and row.group == "baseline" and row.provider == "copy"
    assert row.max_err is None and row.err_flag == ""
    assert row.gbps == pytest.approx(case.min_bytes / (row.median_ms * 1e-3) / 1e9)


@pytest.mark.parametrize("mod", [bench_logprobs, bench_gae])
def test_copy_is_a_provider_of_the_bandwidth_suites(mod):
    assert [p.name for p in mod.providers(CPU)].count("copy") == 1
