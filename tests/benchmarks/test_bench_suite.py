"""The benchmark suite on CPU at its smallest config: files written and well-formed, every provider accounted
for, wrong providers flagged by the error column, and the memory probe measuring what it claims.

Shapes are shrunk (odd sizes, N=41, V=257) and ``torch.compile`` is replaced by the plain function so the whole
file runs in seconds; CI's ``fastppo bench all --quick`` run covers the real compile path.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from fastppo.benchmarks import (
    bench_contended,
    bench_e2e,
    bench_gae,
    bench_kl,
    bench_linear,
    bench_logprobs,
    bench_ppo_loss,
    bench_value_loss,
    cli,
    readme_table,
    report,
    runner,
    timing,
)
from fastppo.benchmarks.providers import Missing, Provider, peer_attr

CPU = torch.device("cpu")
OP_MODULES = (bench_logprobs, bench_ppo_loss, bench_kl, bench_value_loss, bench_gae, bench_linear)


@pytest.fixture
def tiny(monkeypatch):
    """Odd tiny shapes for every op and no torch.compile (seconds instead of minutes)."""
    monkeypatch.setattr(bench_logprobs, "shapes", lambda device, quick: [(41, 257)])
    monkeypatch.setattr(bench_ppo_loss, "shapes", lambda device, quick: [(41, 257)])
    monkeypatch.setattr(bench_kl, "shapes", lambda device, quick: [(3, 37)])
    monkeypatch.setattr(bench_value_loss, "shapes", lambda device, quick: [(3, 37)])
    monkeypatch.setattr(bench_gae, "shapes", lambda device, quick: [(3, 41)])
    monkeypatch.setattr(bench_contended, "shapes", lambda: {"gae": (3, 41), "logprobs": (41, 257)})
    monkeypatch.setattr(bench_linear, "shapes", lambda device, quick: [(41, 13, 257)])
    monkeypatch.setattr(bench_linear, "LIGER_COMPILED", False)
    for mod in (bench_logprobs, bench_ppo_loss, bench_kl, bench_value_loss, bench_linear):
        monkeypatch.setattr(mod, "compiled", lambda fn: fn)
    try:  # Cut-Cross-Entropy's CPU implementation is torch.compile'd at import: use the function it wraps
        import cut_cross_entropy.torch_compile as cce

        fn = cce.torch_compile_linear_cross_entropy_apply
        monkeypatch.setattr(cce, "torch_compile_linear_cross_entropy_apply",
                            getattr(fn, "_torchdynamo_orig_callable", fn))
    except ImportError:
        pass
    monkeypatch.setattr(bench_e2e, "MEMORY_VOCAB", 3001)
    monkeypatch.setattr(bench_e2e, "memory_settings", lambda quick: {"batch": 2, "prompt": 3, "resp_len": 5,
                                                                      "hidden": 16})
    # the realistic GRPO case has its own test below (two trainer processes); here only the toy smoke row
    monkeypatch.setattr(bench_e2e, "settings", lambda quick: {
        "realistic": [], "toy": {"batch": 4, "resp_len": 4, "warmup_steps": 1, "steps": 2}})


# ------------------------------------------------------------------------------------------------- CLI + files
def test_cli_writes_well_formed_csv_json_plots(tiny, tmp_path, capsys):
    assert cli.main(["all", "--quick", "--out", str(tmp_path), "--no-table"]) == 0
    out = capsys.readouterr().out
    csvs = [p for p in tmp_path.glob("bench-*.csv") if not p.name.endswith("-targets.csv")]
    jsons = list(tmp_path.glob("bench-*.json"))
    assert len(list(tmp_path.glob("bench-*-targets.csv"))) == 1 and "Performance targets" in out
    pngs = sorted(p.name.rsplit("-", 1)[-1] for p in tmp_path.glob("bench-*.png"))
    assert len(csvs) == 1 and len(jsons) == 1, list(tmp_path.iterdir())
    assert pngs == ["peak_vs_N.png", "speedup.png", "time_vs_V.png"]
    for png in tmp_path.glob("*.png"):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert str(csvs[0]) in out and str(jsons[0]) in out

    with open(csvs[0], newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == report.CSV_FIELDS
        csv_rows = list(reader)
    data = json.loads(jsons[0].read_text())
    meta, rows = data["meta"], data["rows"]
    assert len(rows) == len(csv_rows) > 0
    for key in ("date_utc", "device_name", "cpu_model", "cpu_cores", "versions", "fastppo_backends", "quick"):
        assert key in meta, key
    assert meta["device"] == "cpu" and meta["quick"] is True
    assert meta["versions"]["torch"] == importlib.metadata.version("torch")
    assert meta["device_name"].startswith("CPU: ")

    # every provider of every case has a row: ran, or missing/skipped/error with a reason
    for mod in OP_MODULES:
        expected = {p.name for p in mod.providers(CPU)}
        got = {r["provider"] for r in rows if r["op"] == mod.OP}
        assert got == expected, (mod.OP, expected ^ got)
    assert {r["provider"] for r in rows if r["op"] == "ppo_step"} == {"fastppo-engine"}
    contended = {(r["op"], r["provider"]): r for r in rows if r["mode"] == "fwd contended"}
    assert set(contended) == {(op, p) for op in ("gae", "logprobs") for p in ("eager", "fastppo[cpp]")}
    assert all(r["extra"]["slowdown"] > 0 and r["extra"]["quiet_ms"] > 0 for r in contended.values())
    for r in rows:
        st = r["status"]
        assert st == "ok" or (st.split(":")[0] in ("missing", "skipped", "error") and len(st) > 10), r
        if st != "ok":
            continue
        assert isinstance(r["median_ms"], float) and r["median_ms"] > 0, r
        if r["provider"] in ("copy", "matmul-floor"):  # yardsticks: they compute nothing to check
            assert r["max_err"] is None and r["err_flag"] == "" and r["gbps"] > 0, r
            continue
        if r["op"] not in ("ppo_step", "engine_memory"):
            assert r["gbps"] > 0 and r["min_bytes"] > 0, r
            assert r["err_flag"] == "ok", r  # every provider that runs here (backends, peers) matches float64
            assert math.isfinite(r["max_err"]) and r["max_err"] < 1e-2, r
    ran = {(r["op"], r["provider"]) for r in rows if r["status"] == "ok"}
    for op in ("logprobs", "ppo_loss", "kl", "value_loss", "gae", "linear"):
        assert (op, "eager") in ran and (op, "fastppo[torch]") in ran, op
    assert not [(r["provider"], r["status"]) for r in rows if r["status"].startswith("error")]

    md = readme_table.render(meta, rows)
    assert meta["device_name"] in md
    assert "| shape | eager |" in md and "**PPO step end to end**" in md
    assert "Not run here:" in md  # missing providers are named, not dropped


def test_readme_targets_section_lists_every_check():
    from fastppo.benchmarks import targets

    checks = [targets.Check("gae-cpu-vs-loop", "C++ CPU GAE >= 100x the Python loop", "fastppo[cpp]", "eager",
                            "speedup", 168.0, 100.0, "pass", "", "gae fwd float32 B=256 T=1024"),
              targets.Check("gae-copy-bandwidth", "Triton GAE within 2x of a copy", "fastppo[triton]", "copy",
                            "copy_fraction", None, 0.5, "not measured", "no cuda rows in this run", "gae fwd")]
    md = "\n".join(readme_table.targets_section([c.as_dict() for c in checks]))
    assert "| C++ CPU GAE >= 100x the Python loop | gae fwd float32 B=256 T=1024 | fastppo[cpp] | 168.00x |" in md
    assert "| Triton GAE within 2x of a copy | gae fwd | fastppo[triton] | - | >= 0.5 of copy | not measured |" in md
    assert "Why not measured: no cuda rows in this run." in md
    assert readme_table.targets_section([]) == []


def test_readme_table_picks_newest_full_run(tmp_path):
    rows = [runner.Row("ops", "kl", "fwd", "eager", "baseline", "cpu", "float32", "N=8", N=8, B=1, T=8,
                       median_ms=1.0, speedup_vs_eager=1.0, max_err=0.0, err_flag="ok")]
    for quick in (False, True):  # the quick run is written last, so it is the newest file
        meta = {"date_utc": "2026-01-01T00:00:00", "device_name": f"dev-{quick}", "cpu_model": "x", "cpu_cores": 2,
                "versions": {}, "quick": quick}
        report.write_json(rows, meta, tmp_path / f"bench-{quick}.json")
    assert readme_table.newest_result(tmp_path).name == "bench-False.json"


# ------------------------------------------------------------------------------------------- error flagging
def _logprobs_case(mode: str, dtype: torch.dtype = torch.float32) -> runner.Case:
    inputs = bench_logprobs.make_inputs(41, 257, dtype, CPU)
    b, t = inputs["labels"].shape
    return runner.Case("ops", "logprobs", mode, CPU, dtype, {"N": 41, "V": 257, "B": b, "T": t}, inputs,
                       bench_logprobs.min_bytes(41, 257, dtype, mode), bench_logprobs.make_check(inputs, mode))


def _canned(case: runner.Case, tweak) -> Provider:
    """A 'provider' that returns precomputed (hence very fast) eager outputs, altered by ``tweak``."""
    def setup(c):
        out = {k: v.detach().clone() for k, v in bench_logprobs._runner(c, bench_logprobs.eager_logprobs_entropy)()
               .items()}
        tweak(out)
        return lambda: out
    return Provider("canned", "peer", setup)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_fast_but_wrong_provider_is_flagged(mode):
    case = _logprobs_case(mode)
    eager = Provider("eager", "baseline", bench_logprobs._eager)
    exact = _canned(case, lambda o: None)
    off = _canned(case, lambda o: o["logp"].add_(1e-2))  # wrong by ~1e-3 of max |logp|: small but real
    nan = _canned(case, lambda o: o["entropy"].view(-1)[7].fill_(float("nan")))
    rows = runner.run_case(case, [eager, exact, off, nan], timing.QUICK, log=lambda m: None)
    flags = [r.err_flag for r in rows]
    assert flags == ["ok", "ok", "WRONG", "WRONG"], [(r.provider, r.max_err) for r in rows]
    assert rows[2].speedup_vs_eager > 1  # it is fast, and the table still says it is wrong
    assert math.isnan(rows[3].max_err)


def test_wrong_gradient_is_flagged_however_small():
    case = _logprobs_case("fwd+bwd")
    scaled = _canned(case, lambda o: o["grad"].mul_(1.01))
    zero = _canned(case, lambda o: o["grad"].zero_())
    rows = runner.run_case(case, [Provider("eager", "baseline", bench_logprobs._eager), scaled, zero],
                           timing.QUICK, log=lambda m: None)
    assert [r.err_flag for r in rows] == ["ok", "WRONG", "WRONG"], [(r.provider, r.max_err) for r in rows]


def test_bf16_providers_judged_against_bf16_eager():
    """bf16: fastppo (fp32 accumulation) must pass, a provider twice as bad as eager-bf16 plus more must not."""
    case = _logprobs_case("fwd", torch.bfloat16)
    fast = Provider("fastppo[torch]", "fastppo", bench_logprobs._fastppo("torch", None).setup)
    worse = _canned(case, lambda o: o["logp"].mul_(1.05))
    rows = runner.run_case(case, [Provider("eager", "baseline", bench_logprobs._eager), fast, worse],
                           timing.QUICK, log=lambda m: None)
    assert [r.err_flag for r in rows] == ["ok", "ok", "WRONG"], [(r.provider, r.max_err) for r in rows]
    assert rows[1].max_err < rows[0].max_err  # fp32 accumulation beats bf16 eager


def test_missing_peer_is_a_row_with_the_reason():
    def setup(case):
        peer_attr("no_such_peer_module_xyz", "fn")
    case = _logprobs_case("fwd")
    (row,) = runner.run_case(case, [Provider("ghost", "peer", setup)], timing.QUICK, log=lambda m: None)
    assert row.status.startswith("missing: cannot import no_such_peer_module_xyz")
    assert row.median_ms is None and row.err_flag == ""
    with pytest.raises(Missing):
        peer_attr("torch", "no_such_attribute_xyz")


def test_provider_exception_becomes_error_row_and_suite_goes_on():
    def boom(case):
        def run():
            raise RuntimeError("kaput")
        return run
    case = _logprobs_case("fwd")
    rows = runner.run_case(case, [Provider("boom", "peer", boom), Provider("eager", "baseline", bench_logprobs._eager)],
                           timing.QUICK, log=lambda m: None)
    assert rows[0].status == "error: RuntimeError: kaput" and rows[1].status == "ok"


# --------------------------------------------------------------------------------------------- measurement
def test_min_bytes_formulas():
    n, v = 100, 1000
    assert bench_logprobs.min_bytes(n, v, torch.float32, "fwd") == n * v * 4 + 16 * n
    assert bench_logprobs.min_bytes(n, v, torch.bfloat16, "fwd+bwd") == 3 * n * v * 2 + 24 * n
    assert bench_ppo_loss.min_bytes(n, v, torch.float32) == 3 * n * v * 4 + 21 * n
    assert bench_gae.min_bytes(4, 8) == 17 * 32
    assert bench_linear.min_bytes(n, 64, v, torch.float32) == 3 * v * 64 * 4 + 3 * n * 64 * 4 + 21 * n


def test_timing_repeats_and_median():
    calls = []
    t = timing.time_call(lambda: calls.append(1), CPU, timing.TimingConfig(warmup=2, min_repeats=7, min_time_s=0.0))
    assert t.repeats == 7 and len(calls) == 9 and t.median_ms >= 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU memory probe reads /proc (Linux)")
def test_cpu_peak_memory_probe_sees_torch_allocations():
    assert timing.pin_cpu_allocator()
    mib = 2**20
    for size in (8, 64):  # below and above glibc's 32 MiB steady-state mmap threshold
        peak = timing.peak_extra_bytes(lambda s=size: torch.empty(s * mib // 4).fill_(1.0), CPU)
        assert peak is not None and size * mib * 0.95 <= peak <= size * mib * 1.25, (size, peak / mib)
    # a temporary freed inside the call still counts (that is what "peak" means)
    def temp_then_small():
        x = torch.empty(16 * mib // 4).fill_(1.0)
        return x.sum()
    peak = timing.peak_extra_bytes(temp_then_small, CPU)
    assert 15 * mib <= peak <= 20 * mib, peak / mib


def test_e2e_realistic_case_runs_both_trainers_from_saved_paths():
    """The GRPO case end to end at a small size: both trainers in their own processes, from the saved Qwen2 and
    tokenizer; every reported number present, and the ratios the targets read."""
    s = {"V": 512, "prompts": 1, "samples": 2, "resp_len": 4, "warmup_steps": 1, "steps": 1}
    eng, trl = bench_e2e.run_realistic(s, log=lambda *_: None)
    for row in (eng, trl):
        assert row.status == "ok", row.status
        assert row.median_ms > 0 and row.extra["tokens_per_s"] > 0 and row.extra["peak_rss_mib"] > 100
        assert set(row.extra["time_split_s"]) == {"generation", "experience", "update"}
        assert row.V == 512 and row.B == 2 and row.T == 4 and row.mode == "grpo-step"
    assert set(eng.extra["floor_s"]) == {"generation", "experience"} and min(eng.extra["floor_s"].values()) > 0
    assert eng.extra["tokens_per_s_vs_trl"] > 0 and eng.extra["peak_rss_vs_trl"] > 0


def test_e2e_trl_patched_case_runs_trl_plain_and_patched():
    """TRL's GRPOTrainer on the GRPO case plain, with Liger (missing on CPU, with the reason) and patched by
    fastppo, each in its own process; the patched row holds the ratios the targets read and its step-1 / loss-check
    difference from the plain row."""
    s = {"V": 512, "prompts": 1, "samples": 2, "resp_len": 4, "warmup_steps": 1, "steps": 1}
    plain, liger, patched = bench_e2e.run_trl_patched(s, log=lambda *_: None)
    assert [r.provider for r in (plain, liger, patched)] == [bench_e2e.TRL, bench_e2e.TRL_LIGER,
                                                             bench_e2e.TRL_PATCHED]
    assert liger.status.startswith("missing:") and "CUDA" in liger.status
    for row in (plain, patched):
        assert row.status == "ok", row.status
        assert row.op == "trl-patched" and row.mode == "grpo-step" and row.V == 512
        assert row.median_ms > 0 and row.extra["peak_rss_mib"] > 100
        assert set(row.extra["step1"]) == set(row.extra["loss_check"]) == {"loss", "grad_norm"}
    assert plain.extra["loss_check"]["grad_norm"] > 0  # seeded advantages: a gradient to compare
    assert any(n.endswith("_ChunkedLogProbFunction") for n in patched.extra["patched"])
    assert patched.err_flag == "ok" and patched.max_err < 2e-5
    assert patched.extra["step_time_vs_plain"] > 0 and patched.extra["peak_rss_vs_plain"] > 0


def test_e2e_only_runs_the_cases_asked_for(monkeypatch):
    ran = []
    monkeypatch.setattr(bench_e2e, "run_trl_patched", lambda s, log: ran.append(("trl-patched", s["V"])) or [])
    monkeypatch.setattr(bench_e2e, "run_realistic", lambda s, log: ran.append(("ppo_step", s["V"])) or [])
    monkeypatch.setattr(bench_e2e, "run_engine", lambda device, s: ran.append(("toy", None)) or runner.Row(
        suite="e2e", op="ppo_step", mode="toy-step", provider="x", group="fastppo", device="cpu", dtype="float32",
        shape="s"))
    monkeypatch.setattr(bench_e2e, "run_lm_head_memory", lambda device, quick: ran.append(("memory", None)) or [])
    cli.run_suites(["e2e"], CPU, True, {"trl-patched"}, log=lambda *_: None)
    assert ran == [("trl-patched", 32000)]
    ran.clear()
    cli.run_suites(["e2e"], CPU, True, set(), log=lambda *_: None)
    assert ran == [("toy", None), ("ppo_step", 32000), ("trl-patched", 32000), ("memory", None)]


@pytest.mark.gpu
def test_e2e_realistic_case_runs_on_the_gpu():
    """``fastppo bench e2e --device cuda`` reports the same case on the GPU, with its peak GPU memory."""
    s = {"V": 512, "prompts": 1, "samples": 2, "resp_len": 4, "warmup_steps": 1, "steps": 1, "device": "cuda"}
    for row in bench_e2e.run_realistic(s, log=lambda *_: None):
        assert row.status == "ok", row.status
        assert row.device == "cuda" and row.extra["peak_gpu_mib"] > 0 and row.extra["tokens_per_s"] > 0


def test_e2e_engine_step_runs(tiny):
    s = bench_e2e.settings(True)["toy"]
    row = bench_e2e.run_engine(CPU, s)
    assert row.status == "ok", row.status
    assert row.median_ms > 0 and row.extra["tokens_per_s"] > 0
    assert set(row.extra["time_split_s"]) == {"generation", "experience", "update"}


def test_default_output_is_a_fresh_directory_under_the_working_directory(tiny, tmp_path, monkeypatch):
    package = Path(cli.__file__).resolve().parent
    before = sorted(p for p in package.rglob("*") if "__pycache__" not in p.parts)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["gae", "--quick", "--no-table"]) == 0
    runs = list((tmp_path / "fastppo-bench").iterdir())
    assert len(runs) == 1 and runs[0].is_dir()
    assert len(list(runs[0].glob("bench-gae-*.json"))) == 1
    assert {p.parent for p in tmp_path.rglob("bench-*")} == {runs[0]}
    assert sorted(p for p in package.rglob("*") if "__pycache__" not in p.parts) == before


def test_e2e_engine_memory_with_and_without_the_fused_head(tiny):
    rows = bench_e2e.run_lm_head_memory(CPU, True)
    assert [r.provider for r in rows] == ["fastppo-engine[fused_lm_head=on]", "fastppo-engine[fused_lm_head=off]"]
    for r in rows:
        assert r.status == "ok", r.status
        assert r.V == 3001 and r.median_ms > 0 and set(r.extra) == {"experience_peak_mib", "update_peak_mib"}


def test_time_vs_v_plot_leaves_out_rows_without_n(tmp_path):
    from fastppo.benchmarks import report

    ok = dict(status="ok", op="logprobs", mode="fwd", dtype="float32", median_ms=1.0)
    rows = [{**ok, "provider": "eager", "N": 64, "V": 257}, {**ok, "provider": "eager", "N": 64, "V": 1271},
            {**ok, "op": "ppo_step", "provider": "fastppo-engine", "N": None, "V": 32000},
            {**ok, "op": "ppo_step", "provider": "trl", "N": None, "V": 151936}]
    assert report.plot_time_vs_v(rows, tmp_path / "t.png", "t")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    assert not report.plot_time_vs_v(rows[2:], tmp_path / "u.png", "u")
