"""The one dtype tolerance table of the test suite, and the comparison helpers built on it.

Values are compared with ``|actual - expected| <= atol + rtol * |expected|`` against a float64 reference.
Low-precision inputs (bf16/fp16) are held to a relative rule instead: the kernel's max error against the
float64 reference (evaluated on the same rounded inputs) must not exceed eager PyTorch's own error in that
dtype.
"""

from __future__ import annotations

import torch

# (atol, rtol) per input dtype and quantity. "value": logprobs/entropy/losses; "grad": dlogits and other grads.
TOL: dict[torch.dtype, dict[str, tuple[float, float]]] = {
    torch.float64: {"value": (1e-10, 1e-10), "grad": (1e-12, 1e-10)},
    torch.float32: {"value": (1e-5, 1e-5), "grad": (1e-6, 1e-4)},
    torch.bfloat16: {"value": (2e-2, 2e-2), "grad": (2e-3, 2e-2)},
    torch.float16: {"value": (5e-3, 5e-3), "grad": (5e-4, 5e-3)},
}


def tol(dtype: torch.dtype, kind: str = "value") -> tuple[float, float]:
    return TOL[dtype][kind]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, kind: str = "value") -> None:
    """Compare against a float64 reference with the table's tolerance for inputs of ``dtype``; NaN never passes."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert not torch.isnan(a).any(), "NaN in result"
    atol, rtol = tol(dtype, kind)
    # -inf == -inf counts as equal (masked vocabulary entries); any other non-finite mismatch fails.
    same_inf = torch.isinf(a) & torch.isinf(e) & (torch.sign(a) == torch.sign(e))
    err = torch.where(same_inf, torch.zeros_like(a), (a - e).abs())
    bound = atol + rtol * torch.where(same_inf, torch.zeros_like(e), e.abs())
    bad = ~(err <= bound)
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{int(bad.sum())}/{a.numel()} elements off ({kind}, {dtype}); max err {float(err.max()):.3e}; first at "
            f"flat index {i}: got {float(a.flatten()[i])!r}, expected {float(e.flatten()[i])!r}"
        )


def assert_no_worse_than_torch(
    actual: torch.Tensor, expected64: torch.Tensor, torch_lowp: torch.Tensor, slack: float = 1.0
) -> None:
    """Low-precision rule: max|actual - ref64| <= slack * max|torch_lowp - ref64| (+ a float32-ulp floor)."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected64.detach().to(torch.float64).cpu()
    t = torch_lowp.detach().to(torch.float64).cpu()
    assert not torch.isnan(a).any(), "NaN in result"
    finite = torch.isfinite(e)
    err = (a - e)[finite].abs().max()
    torch_err = (t - e)[finite].abs().max()
    floor = 1e-6 * float(e[finite].abs().max().clamp_min(1.0))
    assert err <= slack * torch_err + floor, f"error {float(err):.3e} exceeds PyTorch-lowp error {float(torch_err):.3e}"
