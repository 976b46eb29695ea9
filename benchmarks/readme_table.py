"""Print the README's benchmark results section (markdown) from the suite's JSON result files.

    python -m fastppo.benchmarks.readme_table [RESULT.json ...]

Without arguments it takes the newest full (non ``--quick``) JSON in ``benchmarks/results/``, or the newest
quick one when there is no full run. The section names the device, CPU, versions and date of the run.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from .result_files import load_json

# The committed runs of the checkout (read only: `fastppo bench` writes there only when told `--out`).
RESULTS = Path(__file__).resolve().parent / "results"
_ORDER = ("logprobs", "ppo_loss", "kl", "value_loss", "gae", "ppo_step", "trl-patched")


def newest_result(directory: Path = RESULTS) -> Path:
    files = sorted(directory.glob("bench-*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no bench-*.json in {directory}; run `fastppo bench` first")
    full = [p for p in files if not load_json(p)[0].get("quick")]
    return (full or files)[-1]


def _num(v) -> float | None:
    return v if isinstance(v, (int, float)) else None


def _ms(v: float) -> str:
    return f"{v:.3g} ms" if v < 1000 else f"{v / 1000:.3g} s"


def _mib(v: float) -> str:
    return f"{v:.1f} MiB" if v < 10 else f"{v:.0f} MiB"


def _provider_order(names: set[str]) -> list[str]:
    first = [n for n in ("eager", "torch.compile") if n in names]
    fast = sorted(n for n in names if n.startswith("fastppo"))
    rest = sorted(names - set(first) - set(fast))
    return first + fast + rest


def _shape_key(r: dict) -> tuple:
    return (r.get("N") or 0, r.get("V") or 0, r.get("B") or 0, r.get("T") or 0)


def _short_shape(r: dict) -> str:
    if r.get("V"):
        return f"N={r['N']} V={r['V']}"
    return f"B×T={r['B']}×{r['T']}"


def op_section(rows: list[dict]) -> list[str]:
    op, mode, dtype = rows[0]["op"], rows[0]["mode"], rows[0]["dtype"]
    ok = [r for r in rows if r["status"] == "ok" and _num(r.get("median_ms"))]
    provs = _provider_order({r["provider"] for r in ok})
    out = [f"**{op} {mode}, {dtype}** — median time (speed-up vs eager PyTorch)", ""]
    if not provs:
        out.append("_no provider ran_")
    else:
        out.append("| shape | " + " | ".join(provs) + " |")
        out.append("|---" * (len(provs) + 1) + "|")
        by_shape: dict[str, dict[str, dict]] = defaultdict(dict)
        keys: dict[str, tuple] = {}
        for r in ok:
            s = _short_shape(r)
            by_shape[s][r["provider"]] = r
            keys[s] = _shape_key(r)
        for s in sorted(by_shape, key=keys.get):
            cells = []
            for p in provs:
                r = by_shape[s].get(p)
                if r is None:
                    cells.append("–")
                    continue
                cell = _ms(r["median_ms"])
                sp = _num(r.get("speedup_vs_eager"))
                if sp is not None and p != "eager":
                    cell += f" ({sp:.2f}×)"
                if r.get("err_flag") == "WRONG":
                    cell += f" **wrong: err {r['max_err']}**"
                cells.append(cell)
            out.append(f"| {s} | " + " | ".join(cells) + " |")
        largest = max(ok, key=_shape_key)
        big = [r for r in ok if _short_shape(r) == _short_shape(largest)]
        mem = [f"{r['provider']} {_mib(r['peak_extra_mib'])}" for r in big if _num(r.get("peak_extra_mib")) is not None]
        if mem:
            out += ["", f"Peak extra memory at {_short_shape(largest)}: " + ", ".join(mem) + "."]
        errs = [f"{r['provider']} {r['max_err']:.1e}" for r in big if _num(r.get("max_err")) is not None]
        if errs:
            out.append(f"Relative error vs float64 at {_short_shape(largest)}: " + ", ".join(errs) + ".")
    not_run = {}
    for r in rows:
        if r["status"] != "ok" and r["provider"] not in not_run:
            not_run[r["provider"]] = r["status"]
    if not_run:
        out += ["", "Not run here: " + "; ".join(f"{p} ({why})" for p, why in not_run.items()) + "."]
    return out + [""]


def e2e_section(rows: list[dict]) -> list[str]:
    """One table per e2e mode (the toy smoke row; the realistic GRPO case, one line per provider and case)."""
    what = "PPO step end to end"
    if rows[0]["op"] == "trl-patched":
        what = "TRL's GRPOTrainer plain, with Liger, with `fastppo.compat.patch(\"trl\")`"
    out = [f"**{what}** ({rows[0]['mode']}, fp32)", "",
           "| case | provider | median step | response tokens/s | generation / experience / update | peak RSS | "
           "forward floor (gen / exp) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"| {r['shape']} | {r['provider']} | {r['status']} | | | | |")
            continue
        ex = r.get("extra") or {}
        tok = ex.get("tokens_per_s") or ex.get("tokens_per_s_upper_bound")
        tok_s = f"{tok:.0f}" if tok else "–"
        if "tokens_per_s_upper_bound" in ex:
            tok_s = f"≤ {tok_s}"
        split = ex.get("time_split_s")
        split_s = " / ".join(f"{_ms(1e3 * v)}" for v in split.values()) if split else "not reported"
        rss = f"{ex['peak_rss_mib'] / 1024:.2f} GiB" if ex.get("peak_rss_mib") else "–"
        floor = ex.get("floor_s")
        floor_s = " / ".join(f"{_ms(1e3 * v)}" for v in floor.values()) if floor else "–"
        out.append(f"| {r['shape']} | {r['provider']} | {_ms(r['median_ms'])} | {tok_s} | {split_s} | {rss} | "
                   f"{floor_s} |")
    return out + [""]


def render(meta: dict, rows: list[dict]) -> str:
    v = meta.get("versions", {})
    peers = ", ".join(f"{k} {val}" for k, val in v.items() if val and k not in ("torch", "triton", "fastppo"))
    lines = [
        f"### Benchmark results: {meta['device_name']}",
        "",
        f"Measured {meta['date_utc'][:10]} with `fastppo bench {' '.join(meta.get('argv') or [])}`"
        f"{' (quick: smoke-test shapes, short timing loops)' if meta.get('quick') else ''}; "
        f"torch {v.get('torch')}, triton {v.get('triton')}; peers: {peers or 'none installed'}. "
        f"CPU: {meta['cpu_model']}, {meta['cpu_cores']} cores.",
        "Times are medians (CUDA events on GPU, wall clock on CPU). Errors are relative to a float64 reference: "
        "max |result − ref| / max |ref| per output (values and gradients), the max over outputs. Providers that "
        "could not run here are listed with the reason.",
        "",
    ]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["op"], r["mode"], r["dtype"])].append(r)
    order = {name: i for i, name in enumerate(_ORDER)}
    for key in sorted(groups, key=lambda k: (order.get(k[0], 99), k[1], k[2])):
        lines += e2e_section(groups[key]) if key[0] in ("ppo_step", "trl-patched") else op_section(groups[key])
    return "\n".join(lines)


def targets_section(checks: list[dict]) -> list[str]:
    """The run's target checks (``targets.py``, stored under ``"targets"`` in the JSON) as a markdown table: one
    line per target and status (providers with the same outcome share it), reasons for "not measured" below."""
    from .targets import Check, fmt_measured, fmt_target

    if not checks:
        return []
    lines = ["**Targets** (checked against this run by `benchmarks/targets.py`)", "",
             "| target | case | provider | measured | target value | status |", "|---|---|---|---|---|---|"]
    merged: dict[tuple, list[str]] = {}
    reasons: list[str] = []
    for d in checks:
        c = Check.from_dict(d)
        shown = fmt_measured(c) if c.status != "not measured" else "-"
        merged.setdefault((c.claim, c.case, shown, fmt_target(c), c.status), []).append(c.provider)
        if c.status == "not measured" and c.detail not in reasons:
            reasons.append(c.detail)
    for (claim, case, shown, target, status), providers in merged.items():
        lines.append(f"| {claim} | {case} | {', '.join(providers)} | {shown} | {target} | {status} |")
    lines += ["", *(f"Why not measured: {r}." for r in reasons)] if reasons else []
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    paths = [Path(a) for a in args] or [newest_result()]
    for p in paths:
        meta, rows = load_json(p)
        print(render(meta, rows))
        print("\n".join(["", *targets_section(json.loads(p.read_text()).get("targets", []))]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
