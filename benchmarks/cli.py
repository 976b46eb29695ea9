"""``fastppo bench [ops|gae|linear|e2e|contended|all] [--quick] [--out DIR] [--only OP,...] [--device cpu|cuda]``.

Runs the suites, prints a rich table and the performance targets (``targets.py``: pass / FAIL / not measured), writes
CSV + JSON + PNG plots into ``--out`` (default ``./fastppo-bench/<UTC timestamp>/`` in the working directory: the
installed package is never written to; committed results are written with an explicit
``--out benchmarks/results``). ``--quick`` runs one small shape per op with short timing loops
(the CI smoke run: under 2 minutes on a 2-core machine).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import torch

from . import bench_gae, bench_kl, bench_linear, bench_logprobs, bench_ppo_loss, bench_value_loss, report, targets
from .runner import Row, dtype_name, run_case
from .timing import FULL, QUICK, pin_cpu_allocator

SUITES = {
    "ops": (bench_logprobs, bench_ppo_loss, bench_kl, bench_value_loss),
    "gae": (bench_gae,),
    "linear": (bench_linear,),  # the fused LM head: from hidden states + lm_head weight
    "e2e": (),  # bench_e2e has its own loop (whole PPO steps, not cases x providers)
    "contended": (),  # bench_contended times its cases twice, quiet and with every core busy
}


DEFAULT_OUT_HELP = "./fastppo-bench/<UTC timestamp>/"


def default_out() -> Path:
    """A fresh ``./fastppo-bench/<UTC timestamp>/`` under the working directory, one per run."""
    return Path.cwd() / "fastppo-bench" / dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastppo bench",
        description="Throughput, memory and accuracy of fastppo's ops and PPO step next to eager PyTorch, "
        "torch.compile and the peers (TRL, verl, OpenRLHF, Liger, flash-attn). Writes CSV, JSON and PNG plots.",
    )
    p.add_argument("suite", nargs="?", default="all", choices=(*SUITES, "all"),
                   help="ops: logprobs, ppo_loss, kl, value_loss; gae; linear: the fused LM head (PPO loss from "
                   "hidden states); e2e: a whole PPO step; contended: the C++ ops with every core busy, next to "
                   "eager PyTorch; all (default)")
    p.add_argument("--quick", action="store_true", help="one small shape per op, short timing (CI smoke run)")
    p.add_argument("--out", type=Path, default=None, help=f"output directory (default {DEFAULT_OUT_HELP})")
    p.add_argument("--only", default="", help="comma-separated op names to keep, e.g. logprobs,gae")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--no-table", action="store_true", help="do not print the table")
    p.add_argument("--targets", action="store_true",
                   help="run only the cases that the performance targets for this device read (the GPU kit's run)")
    return p


def run_suites(suites: list[str], device: torch.device, quick: bool, only: set[str],
               log=print, targets_only: bool = False) -> list[Row]:
    """Every case of ``suites`` (``only``: these ops; ``targets_only``: the cases some target reads)."""
    timing = QUICK if quick else FULL
    rows: list[Row] = []
    wanted = targets.targeted_ops(device.type) if targets_only else None
    for suite in suites:
        for mod in SUITES[suite]:
            if (only and mod.OP not in only) or (wanted is not None and mod.OP not in wanted):
                continue
            for case in mod.cases(device, quick, suite=suite):
                if targets_only and not targets.case_is_targeted(case.op, case.mode, dtype_name(case.dtype),
                                                                 case.shape, device.type):
                    continue
                t0 = time.perf_counter()
                case_rows = run_case(case, mod.providers(device), timing, log=log)
                rows += case_rows
                ran = sum(r.status == "ok" for r in case_rows)
                log(f"[{suite}] {case.op} {case.mode} {dtype_name(case.dtype)} {case.shape}: "
                    f"{ran}/{len(case_rows)} providers ran ({time.perf_counter() - t0:.1f}s)")
        if suite == "e2e":
            from . import bench_e2e

            ops = {op for op in bench_e2e.OPS if (not only or op in only) and (wanted is None or op in wanted)}
            if ops:
                rows += bench_e2e.run(device, quick, log=log, ops=ops)
        if suite == "contended" and (not only or "contended" in only):
            from . import bench_contended

            rows += bench_contended.run(device, quick, log=log)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("fastppo bench: --device cuda but no CUDA device is available", file=sys.stderr)
            return 2
    if device.type == "cpu":
        pin_cpu_allocator()
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    t0 = time.perf_counter()
    rows = run_suites(suites, device, args.quick, only, log=lambda m: print(m, file=sys.stderr, flush=True),
                      targets_only=args.targets)
    elapsed = time.perf_counter() - t0
    argv_used = list(sys.argv[1:] if argv is None else argv)
    meta = report.metadata(device, suites, args.quick, {"elapsed_s": round(elapsed, 1), "argv": argv_used})
    checks = targets.evaluate([r.as_dict() for r in rows], meta)
    paths = report.write_all(rows, meta, args.out or default_out(), report.file_stem(device, suites), checks)
    if not args.no_table:
        report.print_table(rows)
    targets.print_checks(checks)
    print(f"{len(rows)} rows in {elapsed:.0f}s on {meta['device_name']}")
    for kind, path in paths.items():
        print(f"  {kind:10s} {path}")
    wrong = [r for r in rows if r.err_flag == "WRONG"]
    if wrong:
        print(f"WARNING: {len(wrong)} provider result(s) exceed the error bound (max_err column): "
              + ", ".join(sorted({f'{r.op}/{r.provider}' for r in wrong})))
    return 0
