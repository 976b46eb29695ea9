"""pytest-benchmark: ``logprobs`` at its quick shapes, every provider (``pytest benchmarks/ --benchmark-only``)."""

import pytest

from fastppo.benchmarks import bench_logprobs as mod
from fastppo.benchmarks import pytest_support as ps


@pytest.mark.parametrize("index", range(len(ps.case_ids(mod))), ids=ps.case_ids(mod))
@pytest.mark.parametrize("provider", ps.provider_names(mod))
def test_logprobs(benchmark, provider, index):
    ps.run(benchmark, mod, provider, index)
