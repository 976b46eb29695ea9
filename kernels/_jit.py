"""Launch helpers. Late ``@triton.jit``: a kernel is wrapped when first launched, not when its module is imported.

Triton decides at decoration time whether a kernel is compiled or interpreted (``TRITON_INTERPRET=1``). Test
suites and users import ``fastppo`` (and so, lazily, ``fastppo.kernels``) in any order relative to setting that
variable; wrapping at launch makes the choice follow the environment at the time of the call.

Why plain ``@triton.jit`` kernels have not replaced this wrapper: a ``@triton.jit`` helper is bound to the mode of
its own decoration, and an interpreted kernel cannot call a compiled-mode helper (Triton raises "Cannot call
@triton.jit'd outside of the scope of a kernel"), nor a compiled kernel a plain Python helper. With plain decorators
every kernel and helper would follow the environment at import, which breaks processes that import fastppo before
setting the variable (tests/kernels/test_logprobs.py::test_kernels_follow_triton_interpret_at_launch_time). So the
kernels stay single functions: the online-softmax merge of kernels/gae.py and the PPO epilogue of
kernels/logprobs.py are written inline. A shared helper would need a late helper that this wrapper rebinds into
each kernel's globals per mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from fastppo._contract import triton_interpret as interpreting


class LateKernel:
    """``kernel[grid](*args, **constexprs)`` like a ``@triton.jit`` function, wrapped at first launch."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._wrapped: dict[bool, Any] = {}

    def jit(self, interpret: bool | None = None) -> Any:
        mode = interpreting() if interpret is None else interpret
        if mode not in self._wrapped:
            # Both wrappers are built directly: triton.jit would consult the variable again.
            self._wrapped[mode] = InterpretedFunction(self.fn) if mode else JITFunction(self.fn)
        return self._wrapped[mode]

    def __getitem__(self, grid: Any) -> Any:
        return self.jit()[grid]


def late_jit(fn: Callable[..., Any]) -> LateKernel:
    return LateKernel(fn)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class on_device:
    """Launch on the tensor's GPU rather than the current one; a no-op on CPU (interpreter)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.ctx = torch.cuda.device(t.device) if t.device.type == "cuda" else None

    def __enter__(self) -> None:
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
