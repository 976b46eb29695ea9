"""Run one benchmark case against every provider and turn each into a result row.

Per provider: set up (a ``Missing`` becomes a ``missing: ...`` row), one checked call whose outputs are
compared with the case's float64 reference (``max_err``; not for ``checked=False`` reference points such as the
copy baseline, which compute nothing to compare), timing (``benchmarks.timing``), then one call under
the peak-memory probe. Errors inside a provider become ``error: ...`` rows; the suite goes on.
"""

from __future__ import annotations

import gc
import math
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .providers import Missing, Outputs, Provider, Skipped
from .timing import TimingConfig, peak_extra_bytes, time_call

EAGER = "eager"  # the provider every speed-up is measured against

# A provider's max error (relative, see ErrorMeter) is flagged WRONG when it exceeds
# max(ERR_SLACK * eager's error on the same case, ERR_FLOOR[dtype]): the floor admits fp32-accumulation noise,
# the slack admits a kernel as exact as eager PyTorch in that dtype (the house rule for low precision), and
# anything worse is visible in the table.
ERR_SLACK = 2.0
ERR_FLOOR = {torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 2e-3, torch.float64: 1e-9}


@dataclass
class Case:
    """One op at one shape, dtype and mode.

    ``inputs`` are built once and shared by all providers (read-only: providers that write into their input
    copy it in their setup). ``check(outputs) -> max abs error`` compares with the float64 reference.
    ``min_bytes`` is the traffic floor of the op (formula documented in the op's module). ``check`` returns the
    relative error of ``ErrorMeter``.
    """

    suite: str
    op: str
    mode: str  # "fwd" | "fwd+bwd"
    device: torch.device
    dtype: torch.dtype
    shape: dict[str, int]
    inputs: dict[str, Any]
    min_bytes: int
    check: Callable[[Outputs], float]


@dataclass
class Row:
    suite: str
    op: str
    mode: str
    provider: str
    group: str
    device: str
    dtype: str
    shape: str
    N: int | None = None
    V: int | None = None
    B: int | None = None
    T: int | None = None
    median_ms: float | None = None
    gbps: float | None = None
    min_bytes: int | None = None
    peak_extra_mib: float | None = None
    max_err: float | None = None
    err_flag: str = ""  # "ok" | "WRONG" | "" (not measured)
    speedup_vs_eager: float | None = None
    repeats: int | None = None
    status: str = "ok"  # "ok" | "missing: ..." | "skipped: ..." | "error: ..."
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def shape_str(shape: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _base_row(case: Case, prov: Provider) -> Row:
    return Row(
        suite=case.suite,
        op=case.op,
        mode=case.mode,
        provider=prov.name,
        group=prov.group,
        device=case.device.type,
        dtype=dtype_name(case.dtype),
        shape=shape_str(case.shape),
        N=case.shape.get("N"),
        V=case.shape.get("V"),
        B=case.shape.get("B"),
        T=case.shape.get("T"),
        min_bytes=case.min_bytes,
        notes=prov.notes,
    )


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300]


def run_case(
    case: Case, providers: list[Provider], timing: TimingConfig, log: Callable[[str], None] = print
) -> list[Row]:
    rows: list[Row] = []
    for prov in providers:
        row = _base_row(case, prov)
        rows.append(row)
        run = None
        try:
            run = prov.setup(case)
            out = run()  # first call: compiles/JITs, and its outputs are the ones checked
            if prov.checked:
                row.max_err = float(case.check(out))
            del out
            t = time_call(run, case.device, timing)
            row.median_ms, row.repeats = t.median_ms, t.repeats
            row.gbps = case.min_bytes / (t.median_ms * 1e-3) / 1e9 if t.median_ms > 0 else None
            peak = peak_extra_bytes(run, case.device)
            row.peak_extra_mib = None if peak is None else peak / 2**20
        except Missing as exc:
            row.status = f"missing: {exc}"
        except Skipped as exc:
            row.status = f"skipped: {exc}"
        except Exception as exc:
            row.status = f"error: {_short(exc)}"
            log(f"  {prov.name}: {row.status}\n{traceback.format_exc(limit=3)}")
        finally:
            del run
            gc.collect()
            if case.device.type == "cuda":
                torch.cuda.empty_cache()
    _flag_and_speedup(rows, case.dtype)
    return rows


def _flag_and_speedup(rows: list[Row], dtype: torch.dtype) -> None:
    eager = next((r for r in rows if r.provider == EAGER and r.status == "ok"), None)
    bound = ERR_FLOOR.get(dtype, 1e-4)
    if eager is not None and eager.max_err is not None and math.isfinite(eager.max_err):
        bound = max(bound, ERR_SLACK * eager.max_err)
    for r in rows:
        if r.status != "ok":
            continue
        if r.max_err is not None:
            r.err_flag = "ok" if (math.isfinite(r.max_err) and r.max_err <= bound) else "WRONG"
        if eager is not None and eager.median_ms and r.median_ms:
            r.speedup_vs_eager = eager.median_ms / r.median_ms


class ErrorMeter:
    """The ``max_err`` metric: per output, ``max |result - ref64| / max |ref64|`` (a scale-free error, so a wrong
    gradient of size 1e-6 is as visible as a wrong logprob of size 10); the case's error is the max over outputs.

    ``add`` may be called per chunk of an output; ``scale`` overrides the output's magnitude (scalar losses near
    zero are measured against the mean magnitude of their per-token terms). Any NaN makes the result NaN.
    """

    def __init__(self) -> None:
        self.abs: dict[str, float] = {}
        self.mag: dict[str, float] = {}
        self.nan = False

    def add(self, name: str, actual: torch.Tensor, expected: torch.Tensor, valid: torch.Tensor | None = None,
            scale: float | None = None) -> None:
        a = actual.detach().to(torch.float64)
        e = expected.detach().to(device=a.device, dtype=torch.float64)
        if a.shape != e.shape:
            raise ValueError(f"{name}: output shape {tuple(a.shape)} != reference shape {tuple(e.shape)}")
        if valid is not None:
            v = valid.to(device=a.device).bool()
            a, e = a[v], e[v]
        if a.numel() == 0:
            return
        if bool(torch.isnan(a).any()):
            self.nan = True
            return
        self.abs[name] = max(self.abs.get(name, 0.0), float((a - e).abs().max()))
        mag = float(scale) if scale is not None else float(e.abs().max())
        self.mag[name] = max(self.mag.get(name, 0.0), mag)

    def value(self) -> float:
        if self.nan:
            return float("nan")
        return max((self.abs[k] / max(self.mag[k], 1e-30) for k in self.abs), default=0.0)
