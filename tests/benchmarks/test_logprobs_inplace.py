"""The logprobs suite's GPU grid holds the GPU logprobs targets' shape, and its in-place rows compute the right
thing in place."""

from __future__ import annotations

import math
import sys

import pytest
import torch

import fastppo
from fastppo.benchmarks import bench_logprobs, runner, timing
from fastppo.benchmarks.providers import Provider

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def test_gpu_grid_has_the_targets_shape_and_no_oversized_fp32():
    full = bench_logprobs.grid(CUDA, quick=False)
    assert (16384, 151936, torch.bfloat16) in full
    assert all(n * v <= bench_logprobs.GPU_FP32_MAX_LOGITS for n, v, dt in full if dt == torch.float32)
    assert any(dt == torch.float32 for _, _, dt in full)  # fp32 still measured on GPU, at the smaller vocabulary
    cpu = bench_logprobs.grid(CPU, quick=False)  # CPU: the plain product, nothing dropped
    assert len(cpu) == len(bench_logprobs.shapes(CPU, False)) * len(bench_logprobs.dtypes(False))


def _case(n: int, v: int, mode: str) -> runner.Case:
    inputs = bench_logprobs.make_inputs(n, v, torch.float32, CPU, seed=3)
    b, t = inputs["labels"].shape
    return runner.Case("ops", "logprobs", mode, CPU, torch.float32, {"N": n, "V": v, "B": b, "T": t}, inputs,
                       bench_logprobs.min_bytes(n, v, torch.float32, mode), bench_logprobs.make_check(inputs, mode))


def _kernel_backends() -> list[str]:
    usable = [b for b, info in fastppo.backends().items() if info.available and b in ("cpp", "triton")]
    return usable or pytest.skip("no kernel backend usable on CPU (neither the C++ extension nor the interpreter)")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_inplace_row_matches_reference_and_keeps_case_logits(backend):
    if backend not in _kernel_backends():
        pytest.skip(f"{backend} not usable here")
    case = _case(41, 257, "fwd+bwd")  # odd N, V; the Triton backend runs under TRITON_INTERPRET=1 (conftest)
    before = case.inputs["logits"].clone()
    run = bench_logprobs._fastppo_inplace(backend, None).setup(case)
    out = run()
    assert case.check(out) < 1e-5
    assert out["grad"].data_ptr() != case.inputs["logits"].data_ptr()  # the provider's own buffer, not the case's
    out2 = run()  # later calls read the previous dlogits: still finite outputs
    assert all(bool(torch.isfinite(t).all()) for t in out2.values())
    assert torch.equal(case.inputs["logits"], before)


def test_inplace_row_skips_forward_only_cases():
    (row,) = runner.run_case(_case(41, 257, "fwd"), [bench_logprobs._fastppo_inplace("cpp", None)], timing.QUICK,
                             log=lambda m: None)
    assert row.status.startswith("skipped: inplace_backward changes the backward only")
    assert row.provider == "fastppo[cpp]-inplace"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU memory probe reads /proc (Linux)")
def test_inplace_row_adds_no_logits_sized_buffer():
    if "cpp" not in _kernel_backends():
        pytest.skip("the C++ extension is not built")
    timing.pin_cpu_allocator()
    n, v = 512, 4099  # 8.4 MB of fp32 logits: far above the probe's 64 KiB mmap threshold
    case = _case(n, v, "fwd+bwd")
    provs = [Provider("out-of-place", "fastppo", bench_logprobs._fastppo("cpp", None).setup),
             bench_logprobs._fastppo_inplace("cpp", None)]
    rows = runner.run_case(case, provs, timing.QUICK, log=lambda m: None)
    logits_mib = n * v * 4 / 2**20
    assert [r.status for r in rows] == ["ok", "ok"] and [r.err_flag for r in rows] == ["ok", "ok"]
    out_of_place, inplace = (r.peak_extra_mib for r in rows)
    assert out_of_place >= 0.95 * logits_mib, (out_of_place, logits_mib)  # the fresh dlogits buffer
    assert inplace < 0.25 * logits_mib, (inplace, logits_mib)
    assert math.isfinite(rows[1].max_err)
