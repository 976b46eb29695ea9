"""Turn result rows into files and a table: CSV, JSON (rows + machine/versions metadata), PNG plots, rich table.

File names: ``<stem>.csv``, ``<stem>.json``, ``<stem>-targets.csv`` (the performance targets, ``targets.py``; also
under ``"targets"`` in the JSON), ``<stem>-time_vs_V.png``, ``<stem>-speedup.png``, ``<stem>-peak_vs_N.png``
(runs with the fused LM head) with ``stem = bench-<suites>-<device>-<UTC timestamp>``, so runs on different
machines and days never collide.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from .providers import PEER_DISTS, version_of
from .result_files import clean_dicts, write_dicts_csv
from .runner import Row
from .targets import write_csv as write_checks_csv

CSV_FIELDS = [
    "suite", "op", "mode", "provider", "group", "device", "dtype", "shape", "N", "V", "B", "T", "median_ms", "gbps",
    "min_bytes", "peak_extra_mib", "max_err", "err_flag", "speedup_vs_eager", "repeats", "status", "notes",
]


# ------------------------------------------------------------------------------------------------ metadata
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{cpu_model()}-{os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48]


def metadata(device: torch.device, suites: list[str], quick: bool, extra: dict[str, Any] | None = None) -> dict:
    import fastppo

    meta = {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {d: version_of(d) for d in PEER_DISTS},
        "torch_cuda": torch.version.cuda,
        "fastppo_backends": {k: {"available": v.available, "reason": v.reason} for k, v in fastppo.backends().items()},
        "suites": suites,
        "quick": quick,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    meta.update(extra or {})
    return meta


# ------------------------------------------------------------------------------------------------- files
def file_stem(device: torch.device, suites: list[str]) -> str:
    ts = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"bench-{'+'.join(suites)}-{device_slug(device)}-{ts}"


def write_csv(rows: list[Row], path: Path) -> None:
    write_dicts_csv([r.as_dict() for r in rows], CSV_FIELDS, path)


def write_json(rows: list[Row], meta: dict, path: Path, targets: list[dict] | None = None) -> None:
    data: dict[str, Any] = {"meta": meta, "rows": clean_dicts([r.as_dict() for r in rows])}
    if targets is not None:
        data["targets"] = clean_dicts(targets)
    path.write_text(json.dumps(data, indent=1, default=str))


# ------------------------------------------------------------------------------------------------- plots
def _ok(r: dict) -> bool:
    return r.get("status") == "ok" and isinstance(r.get("median_ms"), (int, float))


def plot_time_vs_v(rows: list[dict], path: Path, title: str) -> bool:
    """One panel per (op, mode, dtype) over the vocabulary ops at their largest N: median ms vs V, per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # rows over [N, V] logits only: whole-step rows (e2e) name a vocabulary but have no N
    vocab = [r for r in rows if _ok(r) and r.get("V") and r.get("N") is not None]
    if not vocab:
        return False
    palette = {p: k for k, p in enumerate(_plot_order({r["provider"] for r in rows if _ok(r)}))}
    panels: dict[tuple, list[dict]] = defaultdict(list)
    for r in vocab:
        panels[(r["op"], r["mode"], r["dtype"])].append(r)
    keys = sorted(panels)
    ncol = min(2, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.5 * ncol, 4.2 * nrow), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        sub = panels[key]
        n_max = max(r["N"] for r in sub)
        by_prov: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for r in sub:
            if r["N"] == n_max:
                by_prov[r["provider"]].append((r["V"], r["median_ms"]))
        for prov, pts in sorted(by_prov.items()):
            pts.sort()
            style = "-o" if prov.startswith("fastppo") else "--s" if prov in ("eager", "torch.compile") else ":^"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=prov, markersize=4,
                    color=_color(prov, palette[prov]))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel("median time (ms, log)")
        ax.set_title(f"{key[0]} {key[1]} {key[2]}, N={n_max}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_order(names: set[str]) -> list[str]:
    return sorted(names, key=lambda p: (not p.startswith("fastppo"), p))


def _color(provider: str, k: int) -> Any:
    fixed = {"eager": "0.55", "torch.compile": "0.25"}
    if provider in fixed:
        return fixed[provider]
    import matplotlib

    no_grey = (0, 1, 2, 3, 4, 5, 6, 8, 9)  # tab10's 7 is grey, which eager and torch.compile already use
    return matplotlib.colormaps["tab10"](no_grey[k % len(no_grey)])


def plot_speedup(rows: list[dict], path: Path, title: str) -> bool:
    """Speed-up over eager PyTorch per provider, one bar group per (op, mode, dtype) at its largest shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if _ok(r) and isinstance(r.get("speedup_vs_eager"), (int, float))]
    if not ok:
        return False
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in ok:
        groups[(r["op"], r["mode"], r["dtype"])].append(r)
    labels, series = [], defaultdict(dict)
    for key in sorted(groups):
        sub = groups[key]
        biggest = max(sub, key=lambda r: (r.get("N") or 0) * (r.get("V") or 1))
        shape = biggest["shape"]
        short = f"N={biggest['N']} V={biggest['V']}" if biggest.get("V") else f"{biggest['B']}x{biggest['T']}"
        labels.append(f"{key[0]} {key[1]}\n{key[2]}\n{short}")
        for r in sub:
            if r["shape"] == shape:
                series[r["provider"]][len(labels) - 1] = r["speedup_vs_eager"]
    provs = _plot_order(set(series))
    palette = {p: k for k, p in enumerate(_plot_order({r["provider"] for r in rows if _ok(r)}))}
    width = 0.8 / max(len(provs), 1)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.9 * len(labels)), 5.0))
    for k, prov in enumerate(provs):
        xs = [i + k * width for i in series[prov]]
        ax.bar(xs, list(series[prov].values()), width=width, label=prov, color=_color(prov, palette[prov]),
               hatch="//" if prov.startswith("fastppo") else None, edgecolor="white", linewidth=0.3)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("speed-up vs eager PyTorch (log; >1 is faster)")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, fontsize=7)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_peak_vs_n(rows: list[dict], path: Path, title: str) -> bool:
    """The fused LM head (op ``linear``): peak extra memory against N per provider, one panel per (dtype, H, V)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lin = [r for r in rows if r.get("op") == "linear" and r.get("status") == "ok"
           and isinstance(r.get("peak_extra_mib"), (int, float))]
    if not lin:
        return False
    palette = {p: k for k, p in enumerate(_plot_order({r["provider"] for r in lin}))}
    panels: dict[tuple, list[dict]] = defaultdict(list)
    for r in lin:
        hv = " ".join(part for part in str(r.get("shape", "")).split() if part.startswith(("H=", "V=")))
        panels[(r["dtype"], hv)].append(r)
    keys = sorted(panels)
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.4), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        by_prov: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for r in panels[key]:
            by_prov[r["provider"]].append((r["N"], r["peak_extra_mib"]))
        for prov, pts in sorted(by_prov.items()):
            pts.sort()
            style = "-o" if prov.startswith("fastppo") else "--s" if prov in ("eager", "torch.compile") else ":^"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=prov, markersize=4,
                    color=_color(prov, palette[prov]))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens N")
        ax.set_ylabel("peak extra memory (MiB), fwd+bwd")
        ax.set_title(f"fused LM head (PPO loss from hidden) {key[0]} {key[1]}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -------------------------------------------------------------------------------------------------- table
def _fmt(v: Any, spec: str) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec)


def _short_shape(r: Row) -> str:
    if r.V:
        return f"N={r.N} V={r.V}"
    return f"{r.B}x{r.T}" if r.B and r.T else r.shape


def print_table(rows: list[Row], console: Any = None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=200)  # piped/CI logs: wide enough that rows stay on one line
    table = Table(show_lines=False, header_style="bold")
    for col in ("op", "mode", "dtype", "shape", "provider", "ms", "GB/s", "peak MiB", "max err", "vs eager"):
        numeric = col in ("ms", "GB/s", "peak MiB", "vs eager")
        table.add_column(col, no_wrap=True, justify="right" if numeric else "left")
    table.add_column("status / notes", overflow="ellipsis", no_wrap=True, max_width=60)
    for r in rows:
        if r.status == "ok":
            err = _fmt(r.max_err, ".1e")
            err = f"[red]{err} WRONG[/red]" if r.err_flag == "WRONG" else err
            sp = _fmt(r.speedup_vs_eager, ".2f")
            status = escape(r.notes) if r.op == "ppo_step" else "ok"
        else:
            err = sp = "-"
            st = escape(r.status)
            status = f"[red]{st}[/red]" if r.status.startswith("error") else f"[dim]{st}[/dim]"
        table.add_row(r.op, r.mode, r.dtype, _short_shape(r), escape(r.provider), _fmt(r.median_ms, ".3f"),
                      _fmt(r.gbps, ".2f"), _fmt(r.peak_extra_mib, ".1f"), err, sp, status)
    console.print(table)


def write_all(rows: list[Row], meta: dict, out_dir: Path, stem: str, checks: list | None = None) -> dict[str, Path]:
    """Write every file of a run; ``checks`` are ``targets.Check`` objects (JSON ``"targets"`` + a CSV)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / f"{stem}.csv", "json": out_dir / f"{stem}.json"}
    write_csv(rows, paths["csv"])
    write_json(rows, meta, paths["json"], None if checks is None else [c.as_dict() for c in checks])
    if checks is not None:
        paths["targets"] = out_dir / f"{stem}-targets.csv"
        write_checks_csv(checks, paths["targets"])
    dicts = [r.as_dict() for r in rows]
    title = f"fastppo bench on {meta['device_name']} ({meta['date_utc'][:10]})"
    p = out_dir / f"{stem}-time_vs_V.png"
    if plot_time_vs_v(dicts, p, title):
        paths["time_vs_V"] = p
    p = out_dir / f"{stem}-speedup.png"
    if plot_speedup(dicts, p, title):
        paths["speedup"] = p
    p = out_dir / f"{stem}-peak_vs_N.png"
    if plot_peak_vs_n(dicts, p, title):
        paths["peak_vs_N"] = p
    return paths
