"""Performance targets (benchmarks/targets.py): pass, FAIL, other device and not-measured cases on synthetic rows, and
end to end on a real quick CPU run (rows -> checks -> printed, JSON, CSV)."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from fastppo.benchmarks import bench_gae, bench_logprobs, cli, targets
from fastppo.benchmarks.targets import TARGETS, evaluate

H100 = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3"}
LOGITS_MIB = 16384 * 151936 * 2 / 2**20  # the GPU logprobs targets' bf16 logits


def _row(provider: str, op: str = "logprobs", mode: str = "fwd+bwd", dtype: str = "bfloat16", status: str = "ok",
         err_flag: str = "ok", **kw) -> dict:
    shape = {"N": 16384, "V": 151936} if op in ("logprobs", "ppo_loss") else {"B": 4, "T": 16384}
    shape.update({k: kw.pop(k) for k in ("N", "V", "B", "T") if k in kw})
    return {"op": op, "mode": mode, "dtype": dtype, "provider": provider, "status": status, "err_flag": err_flag,
            "median_ms": kw.get("ms"), "gbps": kw.get("gbps"), "peak_extra_mib": kw.get("peak"),
            "max_err": 1e-6, **shape}


def _gpu_rows() -> list[dict]:
    return [
        _row("copy", ms=10.0, gbps=3000.0, err_flag=""),
        _row("fastppo[triton]", ms=11.0, gbps=2700.0, peak=LOGITS_MIB + 0.5),  # 0.9 of copy; one buffer
        _row("fastppo[cuda]", ms=15.0, gbps=2000.0, peak=2 * LOGITS_MIB),  # 0.667 of copy; two buffers
        _row("fastppo[triton]-inplace", ms=11.0, gbps=2700.0, peak=0.4),
        _row("fastppo[cuda]-inplace", status="missing: backend unavailable: no _C_cuda"),
        _row("eager", ms=200.0), _row("trl", ms=120.0), _row("verl", ms=160.0),
        _row("fastppo[triton]", op="ppo_loss", ms=12.0), _row("fastppo[cuda]", op="ppo_loss", ms=12.0),
        _row("liger", op="ppo_loss", status="missing: cannot import liger_kernel.ops.grpo_loss (ImportError: x)"),
        _row("copy", op="gae", mode="fwd", dtype="float32", ms=0.004, gbps=280.0, err_flag=""),
        _row("fastppo[triton]", op="gae", mode="fwd", dtype="float32", ms=0.010, gbps=112.0),
        _row("row-serial", op="gae", mode="fwd", dtype="float32", ms=0.5, gbps=2.2),
    ]


def _by(checks: list[targets.Check]) -> dict[tuple[str, str], targets.Check]:
    return {(c.target, c.provider): c for c in checks}


def test_one_check_per_target_and_subject():
    checks = evaluate([], H100)
    assert len(checks) == sum(len(t.subjects) for t in TARGETS)
    assert len(set(_by(checks))) == len(checks)
    keys = [t.key for t in TARGETS]
    assert len(set(keys)) == len(keys)
    assert not [k for k in keys if k[0].isdigit()], "a target's key says what it measures, not where it came from"


def _e2e_row(provider: str, v: int, tok_s: float, rss_mib: float, status: str = "ok") -> dict:
    return {"op": "ppo_step", "mode": "grpo-step", "dtype": "float32", "provider": provider, "status": status,
            "err_flag": "", "median_ms": 1000.0, "V": v, "B": 32, "T": 64,
            "extra": {"tokens_per_s": tok_s, "peak_rss_mib": rss_mib}}


def test_e2e_targets_read_tokens_per_s_and_peak_rss_ratios():
    rows = [_e2e_row("fastppo-engine", 151936, 210.0, 2900.0), _e2e_row("trl-GRPOTrainer", 151936, 100.0, 5000.0),
            _e2e_row("fastppo-engine", 32000, 600.0, 1500.0), _e2e_row("trl-GRPOTrainer", 32000, 420.0, 2000.0)]
    c = _by(evaluate(rows, {"device": "cpu", "device_name": "CPU: test"}))
    tok, rss, tok32 = (c[k, "fastppo-engine"] for k in ("e2e-V151936-tokens", "e2e-V151936-rss",
                                                          "e2e-V32000-tokens"))
    assert (tok.status, tok.measured) == ("pass", pytest.approx(2.1))
    assert (rss.status, rss.measured) == ("pass", pytest.approx(0.58))
    assert (tok32.status, tok32.measured) == ("FAIL", pytest.approx(600 / 420))
    rows[1] = _e2e_row("trl-GRPOTrainer", 151936, 100.0, 5000.0, status="error: x")
    assert _by(evaluate(rows, {"device": "cpu", "device_name": "CPU: test"}))[
        "e2e-V151936-tokens", "fastppo-engine"].status == "not measured"


def _patched_row(provider: str, ms: float, rss_mib: float, err_flag: str = "") -> dict:
    return {**_e2e_row(provider, 151936, 100.0, rss_mib), "op": "trl-patched", "median_ms": ms, "err_flag": err_flag}


def test_trl_patched_targets_read_step_time_and_peak_rss_against_unpatched_trl():
    cpu = {"device": "cpu", "device_name": "CPU: test"}
    patched = "trl-GRPOTrainer+fastppo.patch"
    rows = [_patched_row("trl-GRPOTrainer", 30000.0, 4000.0),
            _patched_row("trl-GRPOTrainer+liger", 0.0, 0.0) | {"status": "missing: CUDA only"},
            _patched_row(patched, 24000.0, 2000.0, "ok")]
    c = _by(evaluate(rows, cpu))
    rss, step = (c[k, patched] for k in ("e2e-trl-patched-V151936-rss", "e2e-trl-patched-V151936-step-time"))
    assert (rss.status, rss.measured) == ("pass", pytest.approx(0.5))
    assert (step.status, step.measured) == ("pass", pytest.approx(1.25))  # 0.8x unpatched's step time
    rows[2] = _patched_row(patched, 27000.0, 2700.0, "ok")  # 0.9x the step time, 0.675x the peak RSS
    assert {ch.status for ch in evaluate(rows, cpu) if ch.target.startswith("e2e-trl-patched")} == {"FAIL"}
    # a step 1 that differs from unpatched TRL's is WRONG, however fast
    rows[2] = _patched_row(patched, 10000.0, 1000.0, "WRONG")
    assert {ch.status for ch in evaluate(rows, cpu) if ch.target.startswith("e2e-trl-patched")} == {"FAIL"}


def test_gpu_targets_pass_and_fail_on_h100_rows():
    c = _by(evaluate(_gpu_rows(), H100))
    bw_t, bw_c = c["logprobs-copy-bandwidth", "fastppo[triton]"], c["logprobs-copy-bandwidth", "fastppo[cuda]"]
    assert (bw_t.status, bw_c.status) == ("pass", "FAIL")
    assert bw_t.measured == pytest.approx(0.9) and bw_c.measured == pytest.approx(2 / 3)
    assert c["logprobs-gpu-vs-eager", "fastppo[triton]"].measured == pytest.approx(200 / 11)
    assert c["logprobs-gpu-vs-eager", "fastppo[triton]"].status == "pass"
    assert c["logprobs-gpu-vs-trl", "fastppo[triton]"].status == "pass"  # 120 / 11 = 10.9
    assert c["logprobs-gpu-vs-trl", "fastppo[cuda]"].status == "FAIL"  # 120 / 15 = 8
    assert c["logprobs-gpu-vs-verl", "fastppo[cuda]"].status == "pass"  # 160 / 15 = 10.7
    assert c["logprobs-gpu-peak", "fastppo[triton]"].status == "pass"
    assert c["logprobs-gpu-peak", "fastppo[cuda]"].status == "FAIL"
    assert c["logprobs-gpu-peak-inplace", "fastppo[triton]-inplace"].status == "pass"
    assert c["gae-copy-bandwidth", "fastppo[triton]"].status == "FAIL"  # 0.4 of copy: more than 2x slower
    assert c["gae-copy-bandwidth", "fastppo[triton]"].measured == pytest.approx(0.4)
    assert c["gae-gpu-vs-row-serial", "fastppo[triton]"].status == "pass"
    assert c["gae-gpu-vs-row-serial", "fastppo[triton]"].measured == pytest.approx(50.0)


def test_missing_rows_are_not_measured_with_the_reason():
    c = _by(evaluate(_gpu_rows(), H100))
    inpl = c["logprobs-gpu-peak-inplace", "fastppo[cuda]-inplace"]
    assert inpl.status == "not measured" and inpl.measured is None and "no _C_cuda" in inpl.detail
    liger = c["ppo-loss-gpu-vs-liger", "fastppo[triton]"]
    assert liger.status == "not measured" and liger.detail.startswith("baseline liger: missing: cannot import")
    cpu_loop = c["gae-cpu-vs-loop", "fastppo[cpp]"]  # a CPU target on a GPU run
    assert cpu_loop.status == "not measured" and "not measured on this device" in cpu_loop.detail
    no_gae = _by(evaluate([r for r in _gpu_rows() if r["op"] != "gae"], H100))["gae-copy-bandwidth", "fastppo[triton]"]
    assert no_gae.status == "not measured" and no_gae.detail == "no gae fwd float32 B=4 T=16384 rows in this run"
    other_shape = [dict(r, N=8192) for r in _gpu_rows()]  # same op, another shape: not the target's case
    assert _by(evaluate(other_shape, H100))["logprobs-gpu-vs-eager", "fastppo[triton]"].status == "not measured"
    no_peak = [dict(r, peak_extra_mib=None) for r in _gpu_rows()]
    c2 = _by(evaluate(no_peak, H100))["logprobs-gpu-peak", "fastppo[triton]"]
    assert c2.status == "not measured" and "not measurable" in c2.detail


def test_wrong_result_fails_however_fast():
    rows = [dict(r, err_flag="WRONG") if r["provider"] == "fastppo[triton]" and r["op"] == "logprobs" else r
            for r in _gpu_rows()]
    c = _by(evaluate(rows, H100))["logprobs-gpu-vs-eager", "fastppo[triton]"]
    assert c.status == "FAIL" and c.measured == pytest.approx(200 / 11) and "WRONG" in c.detail


def test_other_gpu_reports_the_value_without_verdict():
    checks = evaluate(_gpu_rows(), {"device": "cuda", "device_name": "NVIDIA A100-SXM4-80GB"})
    c = _by(checks)["logprobs-copy-bandwidth", "fastppo[triton]"]
    assert c.status == "other device" and c.measured == pytest.approx(0.9) and "A100" in c.detail
    assert {x.status for x in checks} <= {"other device", "not measured"}
    assert _by(evaluate(_gpu_rows(), {"device": "cuda", "device_name": "NVIDIA H200"}))[
        "logprobs-copy-bandwidth", "fastppo[triton]"].status == "pass"


@pytest.mark.parametrize(("cpp_ms", "status"), [(0.1, "pass"), (0.2, "FAIL")])
def test_cpu_gae_target(cpp_ms, status):
    rows = [_row("eager", op="gae", mode="fwd", dtype="float32", B=256, T=1024, ms=15.0),
            _row("fastppo[cpp]", op="gae", mode="fwd", dtype="float32", B=256, T=1024, ms=cpp_ms)]
    checks = evaluate(rows, {"device": "cpu", "device_name": "CPU: test"})
    c = _by(checks)["gae-cpu-vs-loop", "fastppo[cpp]"]
    assert c.status == status and c.measured == pytest.approx(15.0 / cpp_ms)
    gpu = [x for x in checks if next(t for t in TARGETS if t.key == x.target).device == "cuda"]
    assert gpu and all(x.status == "not measured" and "not measured on this device" in x.detail for x in gpu)


def test_peak_allowance_is_buffers_plus_per_token_slack():
    t = next(t for t in TARGETS if t.key == "logprobs-gpu-peak")
    n, v = 16384, 151936
    assert targets.peak_allowance_bytes(t) == n * v * 2 + targets.PER_TOKEN_SLACK * n + targets.ALLOCATOR_SLACK
    t0 = next(t for t in TARGETS if t.key == "logprobs-gpu-peak-inplace")
    assert targets.peak_allowance_bytes(t0) == targets.PER_TOKEN_SLACK * n + targets.ALLOCATOR_SLACK


# ------------------------------------------------------------------------------------------------ end to end
def test_quick_cpu_run_checks_targets_end_to_end(monkeypatch, tmp_path, capsys):
    """A real run: logprobs at a tiny odd shape, GAE at the CPU target's shape (256 x 1024)."""
    monkeypatch.setattr(bench_logprobs, "shapes", lambda device, quick: [(41, 257)])
    monkeypatch.setattr(bench_logprobs, "compiled", lambda fn: fn)
    monkeypatch.setattr(bench_gae, "shapes", lambda device, quick: [(256, 1024)])
    assert cli.main(["all", "--quick", "--only", "logprobs,gae", "--out", str(tmp_path), "--no-table"]) == 0
    out = capsys.readouterr().out
    assert "Performance targets" in out and "targets: " in out

    (json_path,) = tmp_path.glob("bench-*.json")
    (csv_path,) = tmp_path.glob("bench-*-targets.csv")
    data = json.loads(json_path.read_text())
    meta, rows, stored = data["meta"], data["rows"], data["targets"]
    assert len(stored) == sum(len(t.subjects) for t in TARGETS)
    with open(csv_path, newline="") as f:
        assert [r["target"] for r in csv.DictReader(f)] == [c["target"] for c in stored]
    by = {(c["target"], c["provider"]): c for c in stored}
    for c in stored:  # no GPU here: every GPU target says so, with no number
        if c["target"] != "gae-cpu-vs-loop":  # (the C++-vs-TRL/compile CPU targets: no N=2048 V=32000 rows here)
            assert c["status"] == "not measured" and c["measured"] is None, c

    # the CPU target at its real shape, from this run's rows
    gae = {r["provider"]: r for r in rows if r["op"] == "gae"}
    loop = by["gae-cpu-vs-loop", "fastppo[cpp]"]
    if gae["fastppo[cpp]"]["status"] == "ok":
        assert loop["measured"] == pytest.approx(gae["eager"]["median_ms"] / gae["fastppo[cpp]"]["median_ms"])
        assert loop["status"] == ("pass" if loop["measured"] >= 100 else "FAIL")
    else:
        assert loop["status"] == "not measured" and "fastppo[cpp]" in loop["detail"]

    # every metric on real rows: the GPU targets moved to this run's device, dtype and shapes
    here = {"op": "logprobs", "dtype": "float32", "shape": {"N": 41, "V": 257}}
    moved = tuple(dataclasses.replace(t, device="cpu", gpus=(), subjects=("fastppo[cpp]", "fastppo[cpp]-inplace"),
                                      **(here if t.op == "logprobs" else {"shape": {"B": 256, "T": 1024}}))
                  for t in TARGETS if t.op in ("logprobs", "gae") and t.baseline != "row-serial"
                  and t.metric != "slowdown")  # (the contended case: tests/benchmarks/test_contended.py)
    lp = {r["provider"]: r for r in rows if r["op"] == "logprobs" and r["mode"] == "fwd+bwd"}
    checks = evaluate(rows, meta, moved)
    if lp["fastppo[cpp]"]["status"] == "ok":  # the C++ extension is built: every metric gets a verdict
        assert {c.metric for c in checks if c.status in ("pass", "FAIL")} == {"speedup", "copy_fraction", "peak"}
    for c in checks:
        subj = (lp if c.case.startswith("logprobs") else gae).get(c.provider)
        if subj is None or subj["status"] != "ok":
            assert c.status == "not measured" and c.provider in c.detail
            continue
        assert c.status in ("pass", "FAIL"), c
        base = (lp if c.case.startswith("logprobs") else gae).get(c.baseline)
        if c.metric == "speedup":
            assert c.measured == pytest.approx(base["median_ms"] / subj["median_ms"])
        elif c.metric == "copy_fraction":
            assert c.measured == pytest.approx(subj["gbps"] / base["gbps"])
            assert c.measured == pytest.approx(base["median_ms"] / subj["median_ms"])  # same bytes: a time ratio
        else:
            assert c.measured == subj["peak_extra_mib"]
        assert (c.status == "pass") == (c.measured <= c.threshold if c.metric == "peak" else
                                        c.measured >= c.threshold)


def test_targets_cli_rechecks_a_stored_run(tmp_path, capsys):
    from fastppo.benchmarks import report, runner

    rows = [runner.Row("gae", "gae", "fwd", p, "x", "cpu", "float32", "B=256 T=1024", B=256, T=1024, median_ms=ms)
            for p, ms in (("eager", 15.0), ("fastppo[cpp]", 0.1))]
    report.write_json(rows, {"device": "cpu", "device_name": "CPU: t", "date_utc": "2026-01-01"}, tmp_path / "r.json")
    assert targets.main([str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "gae-cpu-vs-loop" in out and "150.00x" in out and "1 pass" in out


@pytest.mark.parametrize(("op", "cpp_ms", "status"), [("logprobs", 30.0, "pass"), ("ppo_loss", 120.0, "FAIL")])
def test_cpu_csrc_targets_against_trl_and_compile(op, cpp_ms, status):
    """C++ fwd+bwd at N=2048, V=32000 fp32 >= 10x TRL's eager functions and >= 4x torch.compile."""
    shape = dict(op=op, mode="fwd+bwd", dtype="float32", N=2048, V=32000)
    rows = [_row("trl", **shape, ms=1000.0), _row("torch.compile", **shape, ms=300.0),
            _row("fastppo[cpp]", **shape, ms=cpp_ms)]
    c = _by(evaluate(rows, {"device": "cpu", "device_name": "CPU: test"}))
    key = op.replace("_", "-")
    vs_trl, vs_compile = c[f"{key}-cpu-vs-trl", "fastppo[cpp]"], c[f"{key}-cpu-vs-torch.compile", "fastppo[cpp]"]
    assert vs_trl.measured == pytest.approx(1000.0 / cpp_ms) and vs_compile.measured == pytest.approx(300.0 / cpp_ms)
    assert vs_trl.status == status and vs_compile.status == ("pass" if 300.0 / cpp_ms >= 4 else "FAIL")


def test_committed_runs_render_and_recheck_under_the_current_keys():
    """The runs under benchmarks/results keep the checks they were stored with (older keys, an ``issue`` field):
    the README's targets table still renders them, and re-checking one evaluates its rows under the current keys."""
    from fastppo.benchmarks import readme_table
    from fastppo.benchmarks.result_files import load_json

    runs = sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "results").glob("bench-*.json"))
    assert runs
    for path in runs:
        stored = json.loads(path.read_text()).get("targets", [])
        assert readme_table.targets_section(stored) or not stored, path.name
        meta, rows = load_json(path)
        assert {c.target for c in evaluate(rows, meta)} == {t.key for t in TARGETS}, path.name


def test_targets_cli_write_updates_the_stored_checks(tmp_path, capsys):
    from fastppo.benchmarks import report, runner

    rows = [runner.Row("gae", "gae", "fwd", p, "x", "cpu", "float32", "B=256 T=1024", B=256, T=1024, median_ms=ms)
            for p, ms in (("eager", 15.0), ("fastppo[cpp]", 0.2))]
    path = tmp_path / "bench-x.json"
    report.write_json(rows, {"device": "cpu", "device_name": "CPU: t", "date_utc": "2026-01-01"}, path, targets=[])
    assert targets.main(["--write", str(path)]) == 0
    stored = {(c["target"], c["provider"]): c for c in json.loads(path.read_text())["targets"]}
    assert len(stored) == sum(len(t.subjects) for t in TARGETS)
    assert stored["gae-cpu-vs-loop", "fastppo[cpp]"]["status"] == "FAIL"  # 75x
    with open(tmp_path / "bench-x-targets.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(stored)


def test_targets_option_runs_exactly_the_targeted_cases(monkeypatch):
    from fastppo.benchmarks import bench_gae, bench_logprobs, cli

    # one targeted CPU shape (the CPU GAE target's case) next to one that no target reads
    monkeypatch.setattr(bench_gae, "shapes", lambda device, quick: [(3, 41), (256, 1024)])
    rows = cli.run_suites(["gae"], torch.device("cpu"), True, set(), log=lambda m: None, targets_only=True)
    assert rows and {(r.B, r.T) for r in rows} == {(256, 1024)}
    assert all(targets.case_is_targeted(r.op, r.mode, r.dtype, {"B": r.B, "T": r.T}, "cpu") for r in rows)
    assert not targets.case_is_targeted("logprobs", "fwd", "float32", {"N": 41, "V": 257}, "cpu")
    assert bench_logprobs.OP in targets.targeted_ops("cuda")


def test_fused_lm_head_cpu_targets():
    cpu = {"device": "cpu", "device_name": "CPU: test"}
    lin = dict(op="linear", dtype="float32", N=1024, V=151936)
    rows = [_row("eager", ms=3500.0, peak=2400.0, **lin), _row("matmul-floor", ms=2000.0, peak=900.0, err_flag="",
                                                                **lin),
            _row("liger-fused-linear", ms=41000.0, peak=332.0, **lin),
            _row("fastppo[cpp]", ms=2400.0, peak=330.0, **lin)]
    c = _by(evaluate(rows, cpu))
    assert c["lm-head-cpu-peak-vs-eager", "fastppo[cpp]"].measured == pytest.approx(330 / 2400)
    assert c["lm-head-cpu-peak-vs-eager", "fastppo[cpp]"].status == "pass"
    assert c["lm-head-cpu-peak-vs-liger", "fastppo[cpp]"].status == "pass"
    assert c["lm-head-cpu-time-vs-eager", "fastppo[cpp]"].status == "pass"  # 3500 / 2400 = 1.46 >= 1.25
    assert c["lm-head-cpu-time-vs-floor", "fastppo[cpp]"].status == "pass"  # 2000 / 2400 = 0.83 >= 0.8
    rows[-1] = _row("fastppo[cpp]", ms=2600.0, peak=340.0, **lin)
    c = _by(evaluate(rows, cpu))
    assert c["lm-head-cpu-peak-vs-liger", "fastppo[cpp]"].status == "FAIL"
    assert c["lm-head-cpu-time-vs-floor", "fastppo[cpp]"].status == "FAIL"  # 2000 / 2600 = 0.77
    assert c["lm-head-gpu-peak-vs-liger", "fastppo[triton]"].status == "not measured"
