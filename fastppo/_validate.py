"""Input validation shared by the public ops.

Structural checks (shapes, dtypes, devices) are free and always on. Value checks (labels in range, NaN/Inf,
all-masked batches) need the data: on CPU they raise ``ValueError`` at once; on CUDA they become
device-side asserts (``torch._assert_async``) so the hot path never synchronises with the host; under
``torch.compile`` likewise. A failed device-side assert ends the process's CUDA context (the message is printed by
the device), so ``FASTPPO_CHECKS=sync`` raises the ``ValueError`` on CUDA too, at the cost of one host sync per
check (for debugging, and the GPU test suite); ``FASTPPO_CHECKS=0`` turns value checks off.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def value_check_mode() -> str:
    """``FASTPPO_CHECKS``: ``"on"`` (default: raise on CPU, device-side assert elsewhere), ``"sync"`` (raise on
    every device) or ``"off"``."""
    raw = os.environ.get("FASTPPO_CHECKS", "1").strip().lower()
    if raw in ("0", "false", "off", ""):
        return "off"
    return "sync" if raw == "sync" else "on"


def value_checks_enabled() -> bool:
    return value_check_mode() != "off"


def check_value(ok: Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` unless the 0-d bool tensor ``ok`` is true (a device-side assert on CUDA unless
    ``FASTPPO_CHECKS=sync``)."""
    mode = value_check_mode()
    if mode == "off":
        return
    if torch.compiler.is_compiling() or (ok.device.type != "cpu" and mode != "sync"):
        torch._assert_async(ok, message)
        return
    if not bool(ok):
        raise ValueError(message)


def float_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (fp32/bf16/fp16/fp64), got {t.dtype}")
    return t


def same_device(**tensors: Tensor | None) -> torch.device:
    devs = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devs.values()))
    for name, d in devs.items():
        if d != first:
            listing = ", ".join(f"{k} on {v}" for k, v in devs.items())
            raise ValueError(f"all tensors must be on one device; got {listing} ({name} differs)")
    return first


def same_shape(ref_name: str, ref: Tensor, **tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}")


def mask_tensor(name: str, mask: object, shape: torch.Size) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must be bool, integer or floating, got {mask.dtype}")
    return mask


def logits_and_labels(logits: object, labels: object | None) -> tuple[Tensor, Tensor | None]:
    logits = float_tensor("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if labels is None:
        return logits, None
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dtype.is_complex:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but logits {tuple(logits.shape)} needs labels of shape "
            f"{tuple(logits.shape[:-1])}"
        )
    same_device(logits=logits, labels=labels)
    if labels.numel() > 0:
        v = logits.shape[-1]
        check_value(((labels >= 0) & (labels < v)).all(), f"labels out of range: every label must be in [0, {v})")
    return logits, labels


def finite_rows(name: str, lse: Tensor, valid: Tensor | None = None, temperature: float = 1.0) -> None:
    """A non-finite per-row log-sum-exp (or max) means a NaN/+inf logit or a row with no finite logit (or, at
    a small temperature, a logit / temperature beyond the float32 range)."""
    bad = ~torch.isfinite(lse)
    if valid is not None:
        bad = bad & valid.bool()
    scaled = f", or logits / temperature (temperature={temperature:g}) beyond float32" if temperature < 1.0 else ""
    check_value(
        ~bad.any(),
        f"{name}: non-finite result; the logits contain NaN or +inf, or a row where every logit is -inf{scaled}",
    )


# The kernels scale by 1/temperature in float32: below this, 1/temperature overflows to inf.
MIN_TEMPERATURE = 1.0 / float(torch.finfo(torch.float32).max)


def temperature(t: float) -> float:
    t = number("temperature", t)
    if not (t > 0.0) or t == float("inf"):
        raise ValueError(f"temperature must be a finite positive number, got {t}")
    if t < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature={t} is too small: 1/temperature overflows float32 (need >= {MIN_TEMPERATURE:.3g})"
        )
    return t


def number(name: str, value: object, *, optional: bool = False) -> float | None:
    """``float(value)``, refusing NaN and +-inf with a message that names the argument (``None`` passes when
    ``optional``). One check for every hyperparameter: a NaN coefficient or clip range would otherwise turn
    into NaN on one backend and act as "off" on another (comparisons with NaN are false)."""
    if value is None and optional:
        return None
    if isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Python number, got a tensor")
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if x != x or x in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be a finite number, got {x}")
    return x


def finite_where_valid(name: str, t: Tensor, mask: Tensor) -> None:
    """``t`` must be finite where ``mask != 0`` (masked positions may hold anything, padding often does)."""
    if t.numel() == 0:
        return
    check_value(
        (torch.isfinite(t) | (mask == 0)).all(),
        f"{name} has a non-finite value (NaN or inf) at a valid (mask != 0) position",
    )


def no_overlap(name: str, t: Tensor) -> None:
    """Refuse a tensor whose elements share memory (a stride-0 / ``expand()`` dimension): an in-place
    backward would write several gradients into one element and keep only the last."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape, strict=True) if sz > 1)
    extent = 1  # elements spanned by the faster-varying dimensions: the next stride must step past them
    for st, sz in dims:
        if st < extent:
            raise ValueError(
                f"inplace_backward=True needs {name} whose elements do not overlap in memory, got shape "
                f"{tuple(t.shape)} with strides {t.stride()} (e.g. from expand()); pass {name}.contiguous() or "
                "use inplace_backward=False"
            )
        extent = st * (sz - 1) + extent
