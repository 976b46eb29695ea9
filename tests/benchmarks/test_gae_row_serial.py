"""The one-program-per-row GAE baseline agrees with the float64 reference (Triton interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
from fastppo.benchmarks import bench_gae, runner, timing
from fastppo.benchmarks.gae_row_serial import gae_row_serial
from fastppo.kernels._jit import interpreting

from fastppo import reference as ref

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or interpreting()),
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


def test_masked_positions_may_hold_garbage():
    rewards, values, mask = _inputs(3, 41, seed=5)
    dirty_r = rewards.masked_fill(~mask, float("nan"))
    dirty_v = values.masked_fill(~mask, float("inf"))
    adv, ret = gae_row_serial(dirty_r, dirty_v, mask)
    adv64, ret64 = ref.gae(rewards.double(), values.double(), mask)
    torch.testing.assert_close(adv.double(), adv64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double(), ret64, rtol=1e-5, atol=1e-5)


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
