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


# What a non-finite row statistic can come from, per kind of input (the message names the caller's inputs).
ROW_SOURCES = {
    "logits": "the logits contain NaN or +inf, or a row where every logit is -inf",
    "hidden": "hidden, weight or bias contain NaN or inf, or a row's logits are all -inf",
}


def finite_rows(name: str, lse: Tensor, valid: Tensor | None = None, temperature: float = 1.0,
                source: str = "logits") -> None:
    """A non-finite per-row log-sum-exp (or max) means a NaN/+inf input or a row with no finite logit (or, at a small
    temperature, a logit / temperature beyond the float32 range). Rows where ``valid`` is 0 are not checked."""
    bad = ~torch.isfinite(lse)
    if valid is not None:
        bad = bad & (valid != 0).reshape(bad.shape)
    scaled = f", or logits / temperature (temperature={temperature:g}) beyond float32" if temperature < 1.0 else ""
    check_value(~bad.any(), f"{name}: non-finite result; {ROW_SOURCES[source]}{scaled}")


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


def support(top_k: object, top_p: object) -> tuple[int, float]:
    """``(top_k, top_p)`` of a truncated support: ``top_k`` an integer >= 0 (0: off), ``top_p`` in (0, 1] (1: off)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) and not (isinstance(top_k, float) and top_k.is_integer()):
        raise TypeError(f"top_k must be an integer >= 0 (0: off), got {top_k!r}")
    if int(top_k) < 0:
        raise ValueError(f"top_k must be >= 0 (0: off), got {top_k}")
    p = number("top_p", top_p)
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1: off), got {p}")
    return int(top_k), p


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


# ------------------------------------------------------------------------------------------- the PPO objective
def clips(clip_low: object, clip_high: object, dual_clip: object) -> tuple[float, float, float | None]:
    """``(clip_low, clip_high, dual_clip)`` checked; ``clip_high`` None means ``clip_low``."""
    low = number("clip_low", clip_low)
    high = low if clip_high is None else number("clip_high", clip_high)
    dual = number("dual_clip", dual_clip, optional=True)
    if not (0.0 <= low < 1.0) or high < 0.0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {low}, {high}")
    if dual is not None and dual <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (got {dual})")
    return low, high, dual


def _positive(name: str, value: object, *, optional: bool = False) -> float | None:
    x = number(name, value, optional=optional)
    if x is not None and not x > 0.0:
        raise ValueError(f"{name} must be > 0, got {x}")
    return x


def objective(obj: object) -> dict[str, object]:
    """Every field of a ``PPOObjective`` checked; returns the normalised values (floats; ``clip_high`` resolved)."""
    from fastppo.objective import CHOICES  # floor 0 both; imported here so this module needs no objective at import

    out: dict[str, object] = {}
    for name, allowed in CHOICES.items():
        value = getattr(obj, name)
        if value not in allowed:
            what = "KL kind (kl_kind)" if name == "kl_kind" else name
            shown = tuple(a for a in allowed if a is not None)
            raise ValueError(f"unknown {what} {value!r}; choose from {shown}" + (" or None" if None in allowed else ""))
        out[name] = value
    if obj.policy_loss == "ppo":
        low, high, dual = clips(obj.clip_low, obj.clip_high, obj.dual_clip)
    else:  # CISPO's clip range bounds a weight (clip_low >= 1: no lower bound); no dual clip there
        low = number("clip_low", obj.clip_low)
        high = low if obj.clip_high is None else number("clip_high", obj.clip_high)
        if low < 0.0 or high < 0.0:
            raise ValueError(f"need clip_low >= 0 and clip_high >= 0, got {low}, {high}")
        dual = number("dual_clip", obj.dual_clip, optional=True)
        if dual is not None:
            raise ValueError(f"dual_clip applies to policy_loss='ppo' only (got policy_loss={obj.policy_loss!r})")
    out.update(clip_low=low, clip_high=high, dual_clip=dual,
               sapo_tau_pos=_positive("sapo_tau_pos", obj.sapo_tau_pos),
               sapo_tau_neg=_positive("sapo_tau_neg", obj.sapo_tau_neg),
               kl_coef=number("kl_coef", obj.kl_coef), entropy_coef=number("entropy_coef", obj.entropy_coef),
               temperature=temperature(obj.temperature),
               loss_normalizer=_positive("loss_normalizer", obj.loss_normalizer, optional=True),
               rollout_is_min=_positive("rollout_is_min", obj.rollout_is_min, optional=True),
               rollout_is_max=_positive("rollout_is_max", obj.rollout_is_max, optional=True),
               off_policy_mask_threshold=number("off_policy_mask_threshold", obj.off_policy_mask_threshold,
                                                optional=True))
    for name in ("kl_ratio_weighted",):
        value = getattr(obj, name)
        if not isinstance(value, bool):
            if value not in (0, 1, 0.0, 1.0):
                raise TypeError(f"{name} must be a bool, got {value!r}")
            value = bool(value)
        out[name] = value
    mcl = obj.max_completion_length
    if mcl is not None:
        if isinstance(mcl, bool) or not float(mcl).is_integer() or mcl < 1:
            raise ValueError(f"max_completion_length must be a positive integer or None, got {mcl!r}")
        mcl = int(mcl)
    out["max_completion_length"] = mcl
    q = number("top_entropy_quantile", obj.top_entropy_quantile)
    if not 0.0 < q <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in (0, 1], got {q}")
    out["top_entropy_quantile"] = q
    out["top_k"], out["top_p"] = support(obj.top_k, obj.top_p)
    lo, hi = out["rollout_is_min"], out["rollout_is_max"]
    if obj.rollout_is_level is not None:
        if lo is None and hi is None:
            raise ValueError("rollout correction needs rollout_is_min and/or rollout_is_max (both None: no bound)")
        if lo is not None and hi is not None and lo >= hi:
            raise ValueError(f"need rollout_is_min < rollout_is_max, got {lo} and {hi}")
    return out


def aggregation(agg: str, shape: torch.Size) -> None:
    """The ``seq-*`` aggregations need per-token tensors ``[B, T]`` (the last dim is time)."""
    if agg != "token-mean" and len(shape) < 2:
        raise ValueError(f"agg={agg!r} needs per-token tensors [B, T], got shape {tuple(shape)}")


def half_to_float(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def loss_inputs(names: tuple[str, ...], tensors: tuple[object, ...], mask: object) -> tuple[list[Tensor], Tensor]:
    """Per-token loss inputs of one shape with their mask: float tensors (half precision promoted to float32), on one
    device, a non-empty batch with at least one valid token."""
    named = {name: float_tensor(name, t) for name, t in zip(names, tensors, strict=True)}
    out = list(named.values())
    first = out[0]
    same_shape(names[0], first, **named)
    mask = mask_tensor("mask", mask, first.shape)
    same_device(mask=mask, **named)
    if first.numel() == 0:
        raise ValueError("empty batch: the loss of no tokens is undefined")
    check_value(mask.bool().any(), "all-masked batch: the mask has no valid token, the loss would be 0/0")
    return [half_to_float(t) for t in out], mask


class PPOInputs:
    """The per-token inputs of a PPO loss, checked: ``old`` (None: on-policy), ``adv``, ``ref`` (None: no reference
    policy), ``rollout`` (None: no sampler log-probs), ``mask``, all of the entry point's token shape ``[...]``
    (``[B, T]`` for the ``seq-*`` aggregations and sequence-level settings)."""

    __slots__ = ("adv", "mask", "old", "ref", "rollout")

    def __init__(self, old: Tensor | None, adv: Tensor, ref: Tensor | None, rollout: Tensor | None,
                 mask: Tensor) -> None:
        self.old, self.adv, self.ref, self.rollout, self.mask = old, adv, ref, rollout, mask


def _optional_logprobs(name: str, t: object | None, lead: torch.Size, lead_name: str, like: Tensor) -> Tensor | None:
    if t is None:
        return None
    t = half_to_float(float_tensor(name, t))
    if t.shape != lead:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(lead)} ({lead_name})")
    same_device(advantages=like, **{name: t})
    return t


def ppo_inputs(op: str, lead: torch.Size, lead_name: str, device: torch.device, old_logprobs: object | None,
               advantages: object, mask: object, ref_logprobs: object | None, obj: object, *,
               rollout_logprobs: object | None = None, on_policy_ok: bool) -> PPOInputs:
    """Every check of a PPO loss's per-token inputs, the same for every entry point: shapes equal to the token shape
    ``lead`` of the logits / hidden states (``lead_name`` says which), one device, non-empty, a valid token, reference
    log-probs when ``kl_coef != 0``, rollout log-probs when rollout correction is on, the shape the aggregation and
    sequence-level settings need, and finite values at valid tokens (``old_logprobs``, ``advantages``, and the
    reference / rollout log-probs where the loss uses them: a NaN there would be NaN on one backend and a finite,
    wrong number on another). ``old_logprobs=None`` (on-policy) only where ``on_policy_ok``."""
    if old_logprobs is None and not on_policy_ok:
        raise TypeError(f"{op}: old_logprobs are required")
    names = ("advantages",) if old_logprobs is None else ("old_logprobs", "advantages")
    given = (advantages,) if old_logprobs is None else (old_logprobs, advantages)
    tensors, mask = loss_inputs(names, given, mask)
    for name, t in zip(names, tensors, strict=True):
        if t.shape != lead:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(lead)} ({lead_name})")
    for name, t in zip(names, tensors, strict=True):
        if t.device != device:
            raise ValueError(f"all tensors must be on one device; got {lead_name} on {device}, {name} on {t.device}")
    old, adv = (None, tensors[0]) if old_logprobs is None else tensors
    if ref_logprobs is None and obj.kl_coef != 0.0:
        raise ValueError("kl_coef != 0 needs ref_logprobs")
    ref = _optional_logprobs("ref_logprobs", ref_logprobs, lead, lead_name, adv)
    if rollout_logprobs is None and obj.rollout_is_level is not None:
        raise ValueError(f"rollout correction (rollout_is_level={obj.rollout_is_level!r}) needs rollout_logprobs")
    rollout = _optional_logprobs("rollout_logprobs", rollout_logprobs, lead, lead_name, adv)
    aggregation(obj.agg, lead)
    sequence_wise = [name for name, on in (("importance_sampling_level", obj.importance_sampling_level != "token"),
                                           ("rollout_is_level", obj.rollout_is_level == "sequence"),
                                           ("off_policy_mask_threshold", obj.off_policy_mask_threshold is not None))
                     if on]
    if sequence_wise and len(lead) < 2:
        raise ValueError(f"{sequence_wise[0]} works per sequence and needs per-token tensors [B, T], got shape "
                         f"{tuple(lead)}")
    for name, t in (("old_logprobs", old), ("advantages", adv)):
        if t is not None:
            finite_where_valid(name, t, mask)
    if ref is not None and obj.kl_coef != 0.0:
        # With kl_coef == 0 the reference log-probs only feed the KL statistic (an infinite KL is an honest one).
        finite_where_valid("ref_logprobs", ref, mask)
    if rollout is not None and (obj.rollout_is_level is not None or obj.off_policy_mask_threshold is not None):
        finite_where_valid("rollout_logprobs", rollout, mask)
    return PPOInputs(old, adv, ref, rollout, mask)
