"""fastppo's performance targets, checked against the rows of a benchmark run.

    python -m fastppo.benchmarks.targets RESULT.json [...]     # re-check a stored run
    python -m fastppo.benchmarks.targets --write RESULT.json   # ... and store the checks in its JSON / -targets.csv

Each ``Target`` names a case (op, mode, dtype, shape), the fastppo providers it is about (``subjects``), a
metric and a threshold. Its ``key`` says what it measures (``<op>-<device>-vs-<baseline>``, ``...-copy-bandwidth``,
``...-peak``, ``e2e-...``); runs stored before the keys took that form keep their old keys (and an ``issue`` field)
in their stored checks, and re-checking a stored run evaluates its rows again, under the current keys.

``evaluate`` turns every (target, subject) into a ``Check`` whose status is

  ``pass`` / ``FAIL``   measured in this run on a device the target is stated for;
  ``other device``      measured, but on a device other than the one the target names (value shown, no verdict);
  ``not measured``      the run has no usable row (other device type, shape not run, provider missing or
                        erroring, memory not measurable); the detail says which. No number is ever filled in.

A subject whose result is flagged WRONG (``max_err`` column) fails every target: a fast wrong answer is no pass.

Metrics (all from the same case's rows, so they compare equal work):
  ``speedup``        baseline median time / subject median time  (>= threshold)
  ``copy_fraction``  subject GB/s / ``copy`` GB/s = copy time / subject time (>= threshold): the fraction of the
                     device's measured copy bandwidth (``copy_baseline``); "within 2x of a copy" is >= 0.5
  ``throughput``     subject response tokens/s / baseline's (``extra.tokens_per_s``, e2e rows) (>= threshold)
  ``rss_ratio``      subject peak RSS / baseline's (``extra.peak_rss_mib``, e2e rows; each in its own process)
                     (<= threshold)
  ``peak_ratio``     subject peak extra memory / baseline peak extra memory (<= threshold)
  ``slowdown``       (subject contended / quiet median) / (baseline contended / quiet median) (<= threshold):
                     how much more the subject slows down on a loaded machine than the baseline (``bench_contended``)
  ``peak``           the subject's peak extra memory (``timing``), <= ``logits_buffers`` buffers of the case's
                     logits (``N*V*element size``) plus ``PER_TOKEN_SLACK`` bytes per token (the ``[N]`` outputs
                     and saved row statistics, which are not logits-sized) plus ``ALLOCATOR_SLACK`` (the CUDA
                     caching allocator may hand out up to 1 MiB more than asked for a large block)
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .bench_linear import VARIANTS as LM_HEAD_VARIANTS
from .result_files import clean_dicts, load_json, write_dicts_csv

PER_TOKEN_SLACK = 64  # bytes per token: up to sixteen fp32 [N] vectors
ALLOCATOR_SLACK = 2 * 2**20
_ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
_GPUS = ("H100", "H200")


@dataclass(frozen=True)
class Target:
    key: str
    claim: str  # what the target promises, in words
    device: str  # "cuda" | "cpu": the device type the target is stated for
    op: str
    mode: str
    dtype: str
    shape: dict[str, int]  # matched against the rows' N / V / B / T
    subjects: tuple[str, ...]
    metric: str  # "speedup" | "copy_fraction" | "peak" | "peak_ratio"
    threshold: float
    baseline: str | None = None  # speedup: the provider compared with; copy_fraction: "copy"
    gpus: tuple[str, ...] = ()  # device-name substrings the target is stated for (empty: any device of the type)


@dataclass
class Check:
    target: str
    claim: str
    provider: str
    baseline: str
    metric: str
    measured: float | None
    threshold: float
    status: str  # "pass" | "FAIL" | "other device" | "not measured"
    detail: str
    case: str = field(default="")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Check:
        """A stored check (a run's JSON ``"targets"``); fields that older runs stored and checks no longer have
        (``issue``) are left out."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


_GPU_LOGPROBS = dict(op="logprobs", mode="fwd+bwd", dtype="bfloat16", shape={"N": 16384, "V": 151936})
_KERNELS = ("fastppo[triton]", "fastppo[cuda]")
_GAE_GPU = dict(device="cuda", op="gae", mode="fwd", dtype="float32", shape={"B": 4, "T": 16384}, gpus=_GPUS)

TARGETS: tuple[Target, ...] = (
    Target("logprobs-copy-bandwidth", ">= 85% of the device's measured copy bandwidth", "cuda", **_GPU_LOGPROBS,
           subjects=_KERNELS, metric="copy_fraction", threshold=0.85, baseline="copy", gpus=_GPUS),
    *(Target(f"logprobs-gpu-vs-{peer}", f">= 10x faster than {what}", "cuda", **_GPU_LOGPROBS, subjects=_KERNELS,
             metric="speedup", threshold=10.0, baseline=peer, gpus=_GPUS)
      for peer, what in (("eager", "eager PyTorch"), ("trl", "TRL's functions"), ("verl", "verl's functions"))),
    Target("ppo-loss-gpu-vs-liger", ">= 1.3x faster than Liger's GrpoLossFunction on the same loss", "cuda",
           op="ppo_loss", mode="fwd+bwd", dtype="bfloat16", shape={"N": 16384, "V": 151936}, subjects=_KERNELS,
           metric="speedup", threshold=1.3, baseline="liger", gpus=_GPUS),
    Target("logprobs-gpu-peak", "peak extra memory <= one logits-sized buffer", "cuda", **_GPU_LOGPROBS,
           subjects=_KERNELS, metric="peak", threshold=1, gpus=_GPUS),
    Target("logprobs-gpu-peak-inplace", "zero extra logits-sized buffers with inplace_backward=True", "cuda",
           **_GPU_LOGPROBS, subjects=tuple(f"{s}-inplace" for s in _KERNELS), metric="peak", threshold=0, gpus=_GPUS),
    Target("gae-copy-bandwidth", "Triton GAE within 2x of a plain device copy (>= 0.5 of copy bandwidth)", **_GAE_GPU,
           subjects=("fastppo[triton]",), metric="copy_fraction", threshold=0.5, baseline="copy"),
    Target("gae-gpu-vs-row-serial", "Triton GAE >= 5x a one-thread-per-row kernel", **_GAE_GPU,
           subjects=("fastppo[triton]",), metric="speedup", threshold=5.0, baseline="row-serial"),
    *(Target(f"{op.replace('_', '-')}-cpu-vs-{base}", f"C++ CPU {what} >= {thr:g}x {who}", "cpu", op=op, mode="fwd+bwd",
             dtype="float32", shape={"N": 2048, "V": 32000}, subjects=("fastppo[cpp]",), metric="speedup",
             threshold=thr, baseline=base)
      for op, what in (("logprobs", "logprobs+entropy"), ("ppo_loss", "fused PPO loss"))
      for base, thr, who in (("trl", 10.0, "eager PyTorch as TRL computes it"),
                             ("torch.compile", 4.0, "torch.compile of the same"))),
    # the fused LM head (op "linear": ppo_loss_from_hidden with entropy, fwd+bwd of hidden and weight).
    *(Target(f"lm-head-cpu-{key}", claim, "cpu", op="linear", mode="fwd+bwd", dtype="float32",
             shape={"N": 1024, "V": 151936}, subjects=("fastppo[cpp]",), metric=metric, threshold=thr, baseline=base)
      for key, claim, metric, thr, base in (
          ("peak-vs-eager", "peak extra memory <= 1/4 of eager's", "peak_ratio", 0.25, "eager"),
          ("peak-vs-liger", "peak extra memory <= Liger's chunked fused-linear loss", "peak_ratio", 1.0,
           "liger-fused-linear"),
          ("time-vs-eager", "time <= 0.8x eager's (speed-up >= 1.25)", "speedup", 1.25, "eager"),
          ("time-vs-floor", "time <= 1.25x the three matmuls alone (speed-up vs floor >= 0.8)", "speedup", 0.8,
           "matmul-floor"))),
    *(Target(f"lm-head-gpu-{key}", claim, "cuda", op="linear", mode="fwd+bwd", dtype="bfloat16",
             shape={"N": 16384, "V": 151936}, subjects=("fastppo[triton]", "fastppo[triton-tiled]"), metric=metric,
             threshold=thr, baseline=base, gpus=_GPUS)
      for key, claim, metric, thr, base in (
          ("time-vs-liger", "time <= Liger's fused linear loss", "speedup", 1.0, "liger-fused-linear"),
          ("time-vs-floor", "time <= 1.3x the matmuls alone (speed-up vs floor >= 1/1.3)", "speedup", 1 / 1.3,
           "matmul-floor"),
          ("peak-vs-liger", "peak extra memory <= Liger's", "peak_ratio", 1.0, "liger-fused-linear"))),
    # the objective variants of the fused LM head: each no slower than today's PPO loss (1.1x token-separable, 1.3x
    # with a sequence statistic first), the same memory (1.1x), and faster than Liger's fused loss of that loss_type
    *(Target(f"lm-head-{dev_key}-{name}-{key}", claim, dev, op="linear", mode="fwd+bwd", dtype=dtype, shape=shape,
             subjects=(f"fastppo {name}",), metric=metric, threshold=thr, baseline=base, gpus=gpus)
      for dev, dev_key, dtype, shape, ppo, gpus in (
          ("cpu", "cpu", "float32", {"N": 1024, "V": 151936}, "fastppo[cpp]", ()),
          ("cuda", "gpu", "bfloat16", {"N": 16384, "V": 151936}, "fastppo[triton]", _GPUS))
      for name, (_, liger, one_pass) in LM_HEAD_VARIANTS.items()
      for key, claim, metric, thr, base in (
          ("time-vs-ppo", f"time <= {1.1 if one_pass else 1.3}x today's PPO loss ({ppo})", "speedup",
           1 / (1.1 if one_pass else 1.3), ppo),
          ("peak-vs-ppo", f"peak extra memory <= 1.1x today's PPO loss ({ppo})", "peak_ratio", 1.1, ppo),
          *((("time-vs-liger", "time <= Liger's fused loss with the same loss_type", "speedup", 1.0,
              f"liger-fused-linear {name}"),) if liger is not None else ()))),
    *(Target(f"contended-{op}", "with a busy process on every core, the C++ op slows down no more than eager "
             "PyTorch in the same conditions (x1.5 slack: both are ratios of medians on a loaded machine)", "cpu",
             op=op, mode="fwd contended", dtype="float32", shape=shape, subjects=("fastppo[cpp]",), metric="slowdown",
             threshold=1.5, baseline="eager")
      for op, shape in (("gae", {"B": 256, "T": 1024}), ("logprobs", {"N": 256, "V": 4096}))),
    Target("gae-cpu-vs-loop", "C++ CPU GAE >= 100x the Python loop", "cpu", op="gae", mode="fwd", dtype="float32",
           shape={"B": 256, "T": 1024}, subjects=("fastppo[cpp]",), metric="speedup", threshold=100.0,
           baseline="eager"),
    # end to end (bench_e2e's realistic GRPO case: 32 sequences of <= 64 tokens on a 4-layer Qwen2)
    *(Target(f"e2e-V{v}-tokens", f"engine >= {thr:g}x TRL GRPOTrainer's response tokens/s at V={v}", "cpu",
             op="ppo_step", mode="grpo-step", dtype="float32", shape={"V": v, "B": 32, "T": 64},
             subjects=("fastppo-engine",), metric="throughput", threshold=thr, baseline="trl-GRPOTrainer")
      for v, thr in ((151936, 2.0), (32000, 1.5))),
    Target("e2e-V151936-rss", "engine peak RSS <= 0.6x TRL GRPOTrainer's at V=151936", "cpu",
           op="ppo_step", mode="grpo-step", dtype="float32", shape={"V": 151936, "B": 32, "T": 64},
           subjects=("fastppo-engine",), metric="rss_ratio", threshold=0.6, baseline="trl-GRPOTrainer"),
    # the same case on TRL's own GRPOTrainer with fastppo.compat.patch("trl") against it unpatched (bench_e2e's
    # trl-patched rows); a step 1 whose loss or gradient norm differs from the unpatched one is WRONG and fails
    *(Target(f"e2e-trl-patched-V151936-{key}", claim, "cpu", op="trl-patched", mode="grpo-step", dtype="float32",
             shape={"V": 151936, "B": 32, "T": 64}, subjects=("trl-GRPOTrainer+fastppo.patch",), metric=metric,
             threshold=thr, baseline="trl-GRPOTrainer")
      for key, claim, metric, thr in (
          ("rss", "TRL GRPOTrainer patched by fastppo: peak RSS <= 0.6x unpatched at V=151936", "rss_ratio", 0.6),
          ("step-time", "TRL GRPOTrainer patched by fastppo: step time <= 0.85x unpatched at V=151936 (speed-up >= "
           "1/0.85)", "speedup", 1 / 0.85))),
)


# --------------------------------------------------------------------------------------------- evaluation
def _case_str(t: Target) -> str:
    return f"{t.op} {t.mode} {t.dtype} " + " ".join(f"{k}={v}" for k, v in t.shape.items())


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _matches(row: dict, t: Target) -> bool:
    return (row.get("op") == t.op and row.get("mode") == t.mode and row.get("dtype") == t.dtype
            and all(row.get(k) == v for k, v in t.shape.items()))


def case_is_targeted(op: str, mode: str, dtype: str, shape: dict[str, int], device_type: str,
                     targets: tuple[Target, ...] = TARGETS) -> bool:
    """Whether a case (op, mode, dtype name, shape) is one that some target for ``device_type`` reads."""
    row = {"op": op, "mode": mode, "dtype": dtype, **shape}
    return any(t.device == device_type and _matches(row, t) for t in targets)


def targeted_ops(device_type: str, targets: tuple[Target, ...] = TARGETS) -> set[str]:
    return {t.op for t in targets if t.device == device_type}


def peak_allowance_bytes(t: Target) -> float:
    n = t.shape["N"]
    return t.threshold * n * t.shape["V"] * _ELEMENT_BYTES[t.dtype] + PER_TOKEN_SLACK * n + ALLOCATOR_SLACK


def _usable(row: dict | None, who: str) -> str | None:
    """Why ``row`` cannot be used (None when it can)."""
    if row is None:
        return f"no {who} row in this run"
    if row.get("status") != "ok":
        return f"{who}: {row.get('status')}"
    return None


def _measure(t: Target, subj: dict, base: dict | None) -> tuple[float | None, str]:
    """``(value, how it was computed)``; value None with the reason when the rows hold no number for it."""
    if t.metric == "speedup":
        s, b = _num(subj.get("median_ms")), _num(base.get("median_ms"))
        if not s or not b:
            return None, "no median time"
        return b / s, f"{t.baseline} {b:.4g} ms / {subj['provider']} {s:.4g} ms"
    if t.metric == "copy_fraction":
        s, b = _num(subj.get("gbps")), _num(base.get("gbps"))
        if not s or not b:
            return None, "no GB/s"
        return s / b, f"{subj['provider']} {s:.4g} GB/s / copy {b:.4g} GB/s"
    if t.metric in ("throughput", "rss_ratio"):
        key = "tokens_per_s" if t.metric == "throughput" else "peak_rss_mib"
        s, b = _num((subj.get("extra") or {}).get(key)), _num((base.get("extra") or {}).get(key))
        if not s or not b:
            return None, f"no {key}"
        return s / b, f"{subj['provider']} {s:.4g} / {t.baseline} {b:.4g} {key}"
    if t.metric == "peak_ratio":
        s, b = _num(subj.get("peak_extra_mib")), _num(base.get("peak_extra_mib"))
        if s is None or not b:
            return None, "peak memory not measured"
        return s / b, f"{subj['provider']} {s:.1f} MiB / {t.baseline} {b:.1f} MiB"
    if t.metric == "slowdown":
        s, b = (_num((r.get("extra") or {}).get("slowdown")) for r in (subj, base))
        if not s or not b:
            return None, "no quiet/contended timing pair"
        return s / b, f"{subj['provider']} x{s:.3g} slower under load / {t.baseline} x{b:.3g}"
    if t.metric == "peak":
        mib = _num(subj.get("peak_extra_mib"))
        if mib is None:
            return None, "peak memory not measurable on this machine"
        logits_mib = t.shape["N"] * t.shape["V"] * _ELEMENT_BYTES[t.dtype] / 2**20
        return mib, f"{mib:.1f} MiB = {mib / logits_mib:.3f} logits buffers of {logits_mib:.1f} MiB"
    raise ValueError(f"unknown metric {t.metric!r}")


def _passes(t: Target, value: float) -> bool:
    if t.metric == "peak_ratio":
        return value <= t.threshold
    if t.metric == "peak":
        return value * 2**20 <= peak_allowance_bytes(t)
    if t.metric in ("rss_ratio", "slowdown"):
        return value <= t.threshold
    return value >= t.threshold


def evaluate(rows: list[dict], meta: dict, targets: tuple[Target, ...] = TARGETS) -> list[Check]:
    """One ``Check`` per (target, subject) from a run's rows (``Row.as_dict()`` or the JSON's rows)."""
    device = meta.get("device", "")
    name = meta.get("device_name", device)
    checks: list[Check] = []
    for t in targets:
        case_rows = {r["provider"]: r for r in rows if _matches(r, t)}
        for subject in t.subjects:
            c = Check(t.key, t.claim, subject, t.baseline or "", t.metric, None, _threshold(t),
                      "not measured", "", _case_str(t))
            checks.append(c)
            if device != t.device:
                where = "/".join(t.gpus) if t.gpus else t.device
                c.detail = f"not measured on this device ({name}); the target is for {where}"
                continue
            if not case_rows:
                c.detail = f"no {_case_str(t)} rows in this run"
                continue
            why = _usable(case_rows.get(subject), subject)
            base = case_rows.get(t.baseline) if t.baseline else None
            if why is None and t.baseline:
                why = _usable(base, f"baseline {t.baseline}")
            if why is not None:
                c.detail = why
                continue
            value, how = _measure(t, case_rows[subject], base)
            if value is None:
                c.detail = how
                continue
            c.measured = value
            c.detail = how
            if case_rows[subject].get("err_flag") == "WRONG":
                c.status = "FAIL"
                c.detail = f"result WRONG (max_err {case_rows[subject].get('max_err')}); {how}"
            elif t.gpus and not any(g.lower() in name.lower() for g in t.gpus):
                c.status = "other device"
                c.detail = f"{how}; measured on {name}, the target is stated for {'/'.join(t.gpus)}"
            else:
                c.status = "pass" if _passes(t, value) else "FAIL"
    return checks


def _threshold(t: Target) -> float:
    return peak_allowance_bytes(t) / 2**20 if t.metric == "peak" else t.threshold


# ------------------------------------------------------------------------------------------------- output
def fmt_measured(c: Check) -> str:
    if c.measured is None:
        return "-"
    if c.metric == "speedup":
        return f"{c.measured:.2f}x"
    if c.metric == "copy_fraction":
        return f"{c.measured:.3f} of copy"
    if c.metric in ("throughput", "rss_ratio"):
        return f"{c.measured:.2f}x"
    if c.metric == "peak_ratio":
        return f"{c.measured:.3f}x peak"
    if c.metric == "slowdown":
        return f"{c.measured:.2f} of eager's"
    return f"{c.measured:.1f} MiB"


def fmt_target(c: Check) -> str:
    if c.metric == "speedup":
        return f">= {c.threshold:g}x vs {c.baseline}"
    if c.metric == "copy_fraction":
        return f">= {c.threshold:g} of copy"
    if c.metric == "throughput":
        return f">= {c.threshold:g}x {c.baseline} tokens/s"
    if c.metric == "rss_ratio":
        return f"<= {c.threshold:g}x {c.baseline} peak RSS"
    if c.metric == "peak_ratio":
        return f"<= {c.threshold:g}x {c.baseline}'s peak"
    if c.metric == "slowdown":
        return f"slowdown <= {c.threshold:g}x {c.baseline}'s"
    return f"<= {c.threshold:.1f} MiB"


def print_checks(checks: list[Check], console: Any = None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=200)
    table = Table(title="Performance targets (cases and claims: the -targets.csv / JSON)",
                  header_style="bold", title_justify="left")
    for col in ("target", "provider", "measured", "target value", "status"):
        table.add_column(col, no_wrap=True, justify="right" if col == "measured" else "left")
    table.add_column("detail", overflow="fold", min_width=40)
    colour = {"pass": "green", "FAIL": "red", "other device": "yellow", "not measured": "dim"}
    for c in checks:
        st = f"[{colour[c.status]}]{c.status}[/{colour[c.status]}]"
        table.add_row(c.target, escape(c.provider), fmt_measured(c), escape(fmt_target(c)), st, escape(c.detail))
    console.print(table)
    counts = {s: sum(c.status == s for c in checks) for s in colour}
    console.print("targets: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))


CSV_FIELDS = ["target", "claim", "case", "provider", "baseline", "metric", "measured", "threshold", "status",
              "detail"]


def write_csv(checks: list[Check], path: Path) -> None:
    write_dicts_csv([c.as_dict() for c in checks], CSV_FIELDS, path)


def main(argv: list[str] | None = None) -> int:
    import json

    args = sys.argv[1:] if argv is None else argv
    write = "--write" in args
    args = [a for a in args if a != "--write"]
    if not args:
        print("usage: python -m fastppo.benchmarks.targets [--write] RESULT.json [...]", file=sys.stderr)
        return 2
    for p in map(Path, args):
        meta, rows = load_json(p)
        print(f"{p}: {meta.get('device_name')} ({meta.get('date_utc', '')[:10]})")
        checks = evaluate(rows, meta)
        print_checks(checks)
        if write:  # the run's rows are unchanged; only its checks follow the current target list
            data = json.loads(p.read_text())
            data["targets"] = clean_dicts([c.as_dict() for c in checks])
            p.write_text(json.dumps(data, indent=1, default=str))
            write_csv(checks, p.with_name(p.name.removesuffix(".json") + "-targets.csv"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
