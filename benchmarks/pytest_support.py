"""Glue for ``pytest benchmarks/ --benchmark-only``: each op's quick cases x providers as pytest-benchmark tests.

The ``test_bench_<op>.py`` files only parametrize; this module builds the case, sets the provider up (a peer
that cannot run here is skipped with its reason, shown by ``pytest -rs``), checks the result against the
float64 reference once, then hands the zero-argument call to the ``benchmark`` fixture.
"""

from __future__ import annotations

import math
from functools import cache
from types import ModuleType

import pytest
import torch

from .providers import Missing, Skipped
from .runner import ERR_FLOOR, ERR_SLACK, Case


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@cache
def _cases(mod: ModuleType) -> list[Case]:
    return list(mod.cases(device(), True))


def case_ids(mod: ModuleType) -> list[str]:
    return [f"{c.mode}-{str(c.dtype).replace('torch.', '')}-" + "-".join(f"{k}{v}" for k, v in c.shape.items())
            for c in _cases(mod)]


def provider_names(mod: ModuleType) -> list[str]:
    return [p.name for p in mod.providers(device())]


@cache
def _eager_err(mod: ModuleType, index: int) -> float:
    case = _cases(mod)[index]
    prov = next(p for p in mod.providers(case.device) if p.name == "eager")
    return float(case.check(prov.setup(case)()))


def run(benchmark, mod: ModuleType, provider: str, index: int) -> None:
    case = _cases(mod)[index]
    prov = next(p for p in mod.providers(case.device) if p.name == provider)
    try:
        fn = prov.setup(case)
    except (Missing, Skipped) as exc:
        pytest.skip(f"{provider}: {exc}")
    err = float(case.check(fn())) if prov.checked else None
    if err is not None:
        bound = max(ERR_FLOOR[case.dtype], ERR_SLACK * _eager_err(mod, index))
        assert math.isfinite(err) and err <= bound, f"{provider} error {err:.3e} exceeds {bound:.3e}"
    if case.device.type == "cuda":
        def call():
            fn()
            torch.cuda.synchronize()
        benchmark(call)
    else:
        benchmark(fn)
    benchmark.extra_info.update({"op": case.op, "mode": case.mode, "shape": case.shape, "max_err": err,
                                 "min_bytes": case.min_bytes})
