"""CPU threading: the C++ extension shares torch's OpenMP runtime, takes torch's thread count, and runs
small problems on the calling thread (an OpenMP region on a loaded machine waits for descheduled workers)."""

from __future__ import annotations

import sys

import pytest
import torch

import fastppo
from fastppo import _native


@pytest.fixture
def cpp():
    launchers = _native.launchers("cpp")
    assert launchers is not None, f"fastppo._C_cpu did not load: {_native.import_error('cpp')}"
    return launchers


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps (Linux)")
def test_one_openmp_runtime_shared_with_torch(cpp):
    x = torch.randn(64, 4096)
    fastppo.token_logprobs(x, torch.zeros(64, dtype=torch.long), backend="cpp")
    runtimes = _native.openmp_runtimes()
    assert len(runtimes) == 1, runtimes


def test_small_problems_stay_on_the_calling_thread(cpp):
    m = cpp.module
    big = m.PARALLEL_MIN_WORK
    assert big >= 1 << 20
    assert m.team_size(256 * 1024, 8) == 1  # GAE at [256, 1024], the contended bench's case
    assert m.team_size(256 * 4096, 8) == 1
    assert m.team_size(big - 1, 8) == 1
    assert m.team_size(big, 8) == 8 and m.team_size(2048 * 32000, 2) == 2
    assert m.team_size(2048 * 32000, 1) == 1 and m.team_size(2048 * 32000, 0) == 1


def test_kernels_take_torch_thread_count(cpp):
    before = torch.get_num_threads()
    x = torch.randn(2, 3, 5)
    try:
        torch.set_num_threads(1)
        assert cpp._tail(x) == (1,)
        torch.set_num_threads(2)
        assert cpp._tail(x) == (2,)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
def test_results_do_not_depend_on_the_thread_count(cpp, threads):
    # above PARALLEL_MIN_WORK the rows are split over threads; every row is still computed by one thread alone
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 160, 4096, generator=g)
    labels = torch.randint(0, 4096, (4, 160), generator=g)
    r, v = torch.randn(8, 300000, generator=g), torch.randn(8, 300000, generator=g)
    mask = torch.rand(8, 300000, generator=g) > 0.1
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        lp, h = fastppo.logprobs_and_entropy(x, labels, backend="cpp")
        adv, _ = fastppo.gae(r, v, mask, backend="cpp")
        torch.set_num_threads(1)
        lp1, h1 = fastppo.logprobs_and_entropy(x, labels, backend="cpp")
        adv1, _ = fastppo.gae(r, v, mask, backend="cpp")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(lp, lp1) and torch.equal(h, h1) and torch.equal(adv, adv1)
