"""The private torch APIs fastppo relies on, each named here so that a torch release that drops or changes one
fails this file with the API's name, instead of a fullgraph compile or the GAE fast path breaking without a reason.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastppo import _dispatch, autograd


def test_assume_constant_result_still_sets_the_marker_dispatch_sets_by_hand():
    """_dispatch.resolve carries ``_dynamo_marked_constant`` (what torch.compiler.assume_constant_result sets)
    without importing torch._dynamo at fastppo import."""

    def probe() -> int:
        return 0

    marked = torch.compiler.assume_constant_result(probe)
    assert getattr(marked, "_dynamo_marked_constant", None) is True, (
        "torch.compiler.assume_constant_result no longer sets fn._dynamo_marked_constant; "
        "update fastppo/_dispatch.py's marker on resolve()"
    )
    assert getattr(_dispatch.resolve, "_dynamo_marked_constant", None) is True


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_len_torch_dispatch_stack_sees_dispatch_modes():
    """autograd.direct_call_ok asks torch._C._len_torch_dispatch_stack whether a dispatch mode is active."""
    assert autograd._dispatch_stack_len is not None, (
        "torch._C._len_torch_dispatch_stack is gone: fastppo.autograd.direct_call_ok now always takes the custom op; "
        "find its replacement"
    )
    x = torch.zeros(2, 3)
    assert autograd._dispatch_stack_len() == 0 and autograd.direct_call_ok(x)
    with _Passthrough():
        assert autograd._dispatch_stack_len() > 0, "torch._C._len_torch_dispatch_stack no longer counts modes"
        assert not autograd.direct_call_ok(x)


def test_assert_async_exists():
    """fastppo/_validate.py checks values on the device with torch._assert_async (no host sync)."""
    assert callable(getattr(torch, "_assert_async", None)), "torch._assert_async is gone: see fastppo/_validate.py"
    torch._assert_async(torch.tensor(True))
