"""The one-program-per-row GAE baseline agrees with the float64 reference (Triton interpreter on CPU) and
compiles for Hopper (sm_90) with Triton's real compiler, which needs no GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastppo import reference as ref
from fastppo.benchmarks import bench_gae, runner, timing
from fastppo.benchmarks.gae_row_serial import gae_row_serial
from fastppo.kernels._jit import interpreting

runs = pytest.mark.skipif(not (torch.cuda.is_available() or interpreting()),
                          reason="needs a GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it without one)")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(b: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(b, t, generator=g)
    values = torch.randn(b, t, generator=g)
    mask = torch.rand(b, t, generator=g) < 0.7  # holes anywhere, including at both ends
    mask[0] = True  # one full row
    mask[-1] = False  # one empty row
    return rewards.to(DEV), values.to(DEV), mask.to(DEV)


@runs
@pytest.mark.parametrize(("b", "t", "gamma", "lam"), [(1, 1, 1.0, 0.95), (3, 37, 1.0, 0.95), (5, 129, 0.99, 0.9)])
@pytest.mark.parametrize("bootstrap", [False, True])
def test_matches_reference_with_holes(b, t, gamma, lam, bootstrap):
    rewards, values, mask = _inputs(b, t, seed=b * 1000 + t)
    boot = torch.randn(b, generator=torch.Generator().manual_seed(7)).to(DEV) if bootstrap else None
    adv, ret = gae_row_serial(rewards, values, mask, gamma=gamma, lam=lam, bootstrap_value=boot)
    adv64, ret64 = ref.gae(rewards.double(), values.double(), mask, gamma=gamma, lam=lam,
                           bootstrap_value=None if boot is None else boot.double())
    torch.testing.assert_close(adv.double(), adv64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double(), ret64, rtol=1e-5, atol=1e-5)
    assert bool((adv[~mask] == 0).all()) and bool((ret[~mask] == 0).all())


@runs
def test_masked_positions_may_hold_garbage():
    rewards, values, mask = _inputs(3, 41, seed=5)
    dirty_r = rewards.masked_fill(~mask, float("nan"))
    dirty_v = values.masked_fill(~mask, float("inf"))
    adv, ret = gae_row_serial(dirty_r, dirty_v, mask)
    adv64, ret64 = ref.gae(rewards.double(), values.double(), mask)
    torch.testing.assert_close(adv.double(), adv64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double(), ret64, rtol=1e-5, atol=1e-5)


@runs
def test_provider_row():
    inputs = bench_gae.make_inputs(3, 41, DEV)
    case = runner.Case("gae", "gae", "fwd", DEV, torch.float32, {"N": 123, "B": 3, "T": 41}, inputs,
                       bench_gae.min_bytes(3, 41), bench_gae.make_check(inputs))
    prov = next(p for p in bench_gae.providers(DEV) if p.name == "row-serial")
    (row,) = runner.run_case(case, [prov], timing.QUICK, log=lambda m: None)
    if DEV.type == "cpu":  # the interpreter is a debugging mode: never timed, as fastppo[triton] on CPU
        assert row.status.startswith("missing: ") and "TRITON_INTERPRET" in row.status
        adv, ret = bench_gae._row_serial_fn(inputs)()  # the same call the provider times on a GPU
        out = {"adv": adv, "ret": ret}
        assert case.check(out) < 1e-5
    else:
        assert row.status == "ok" and row.err_flag == "ok", row


_AOT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource
from triton.runtime.jit import JITFunction
from fastppo.benchmarks.gae_row_serial import _row_serial_kernel
sig = {"r_ptr": "*fp32", "v_ptr": "*fp32", "m_ptr": "*u8", "boot_ptr": "*fp32", "adv_ptr": "*fp32",
       "ret_ptr": "*fp32", "T": "i32", "gamma": "fp32", "gl": "fp32", "HAS_BOOT": "constexpr"}
for has_boot in (False, True):
    src = ASTSource(fn=JITFunction(_row_serial_kernel), signature=sig, constexprs={"HAS_BOOT": has_boot})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
    print("compiled", has_boot, len(k.asm["cubin"]), k.asm["ttgir"].count("scf.for"))
"""


def test_compiles_for_hopper_as_a_serial_loop():
    """The interpreter accepts what the compiler may not (e.g. a loop-carried value changing type): compile both
    variants for sm_90 in a process without TRITON_INTERPRET, and check the T loop stayed one serial loop."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-c", _AOT], cwd=Path(__file__).resolve().parents[2], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line.split() for line in proc.stdout.splitlines() if line.startswith("compiled")]
    assert [(w[1], int(w[2]) > 0, w[3]) for w in lines] == [("False", True, "1"), ("True", True, "1")], proc.stdout
