#!/usr/bin/env bash
# The GPU kit: on a GPU machine, offline, install this checkout, run the GPU tests and the benchmark cases that the
# GPU performance targets read, and end with the targets table.
#
#   bash benchmarks/gpu_wheels.sh .whl              # first, where pip reaches an index (a few MiB of wheels)
#   bash benchmarks/gpu_run.sh OUT_DIR [all|install|tests|bench]
#
# Phases (`all` runs the three in order; each can be run alone, `install` first in a fresh machine):
#   install  the wheels of $FASTPPO_GPU_WHEELS (default ./.whl) with `pip --no-index --no-deps` into
#            $FASTPPO_GPU_SITE (default /tmp/fastppo-gpu-site, put first on PYTHONPATH), then this checkout with
#            `pip install --no-index --no-deps --no-build-isolation -e .`, building the CUDA extension with the
#            machine's nvcc for $FASTPPO_CUDA_ARCHS (default 90: sm_90 only) -> install.log
#   tests    python -m pytest -m gpu tests -> pytest-gpu.log
#   bench    fastppo bench SUITE --targets for each of $FASTPPO_BENCH_SUITES (default: ops gae linear), each under
#            $FASTPPO_BENCH_SUITE_TIMEOUT seconds (default 300; FASTPPO_BENCH_ARGS replaces --targets) -> bench.log,
#            bench-results.tar (every suite's bench-*.json, -targets.csv, .csv and plots, in SUITE/ folders)
# run.log gets the environment (nvidia-smi, versions, backends) and a timestamp per phase. Every phase writes its
# files into OUT_DIR when it ends, so a run cut short still returns what it did; 5 files in all.
# Measured on one H200 (2026-12-04, torch 2.11, Triton 3.6): install 23 s (the sm_90 CUDA extension included), the
# environment 12 s, pytest -m gpu ~100 s (117 of 118 tests ran before a 100 s limit), the ops target cases 41 s, the
# GAE case 42 s; the linear case outran 150 s then (its inputs were built on the CPU; now on the GPU): not yet timed.
# Dry run without a GPU (CI does this, tests/benchmarks/test_gpu_kit.py): FASTPPO_BENCH_DEVICE=cpu
# FASTPPO_BENCH_ARGS=--quick, with wheels fetched for the local Python (FASTPPO_GPU_PY).
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_run.sh OUT_DIR [all|install|tests|bench]}
what=${2:-all}
case "$what" in all|install|tests|bench) ;; *) echo "gpu_run.sh: unknown phase $what" >&2; exit 2;; esac
device=${FASTPPO_BENCH_DEVICE:-cuda}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
repo=$(pwd)
wheels=${FASTPPO_GPU_WHEELS:-$repo/.whl}
site=${FASTPPO_GPU_SITE:-/tmp/fastppo-gpu-site}
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python3}
log() { echo "== $(date -u +%FT%TZ) $*" | tee -a "$out/run.log"; }

if [ "$device" = cuda ] && ! nvidia-smi >/dev/null 2>&1; then
    echo "gpu_run.sh: nvidia-smi failed: no NVIDIA GPU here (FASTPPO_BENCH_DEVICE=cpu for a dry run)" >&2
    exit 2
fi

rc=0
phase_failed() { log "phase $1 FAILED (rc=$2)"; rc=$2; }

if [ "$what" = all ] || [ "$what" = install ]; then
    log "install: wheels from $wheels into $site, then this checkout (-e, CUDA archs ${FASTPPO_CUDA_ARCHS:-90}) -> install.log"
    {
        set -e
        if compgen -G "$wheels/*.whl" >/dev/null; then
            "$PY" -m pip install --no-index --no-deps --no-compile --upgrade --target "$site" "$wheels"/*.whl
        else
            echo "no wheels in $wheels: the peer rows (trl, liger) will say missing"
        fi
        build_cuda=0
        [ "$device" = cuda ] && build_cuda=1
        FASTPPO_BUILD_CUDA=${FASTPPO_BUILD_CUDA:-$build_cuda} FASTPPO_CUDA_ARCHS=${FASTPPO_CUDA_ARCHS:-90} \
            "$PY" -m pip install --no-index --no-deps --no-build-isolation -e .
    } > "$out/install.log" 2>&1
    install_rc=$?
    tail -n 3 "$out/install.log"
    [ "$install_rc" = 0 ] || phase_failed install "$install_rc"
fi

log "environment"
{
    if [ "$device" = cuda ]; then
        nvidia-smi
        nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.memory,power.limit,driver_version \
            --format=csv
    fi
    echo "commit $(git rev-parse HEAD 2>/dev/null) $(git status --short 2>/dev/null | wc -l) changed paths"
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__,
        'cuda', torch.version.cuda)"
    "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|triton|transformers|trl|verl|openrlhf|liger|flash|datasets)'
    "$PY" -m fastppo.cli backends
} >> "$out/run.log" 2>&1

if [ "$what" = all ] || [ "$what" = tests ]; then
    log "tests: python -m pytest -m gpu -q tests -> pytest-gpu.log"
    "$PY" -m pytest -m gpu -q -p no:cacheprovider tests > "$out/pytest-gpu.log" 2>&1
    tests_rc=$?
    tail -n 3 "$out/pytest-gpu.log"
    [ "$tests_rc" = 0 ] || phase_failed tests "$tests_rc"
fi

if [ "$what" = all ] || [ "$what" = bench ]; then
    # One suite at a time, each under its own time limit, so a slow suite cannot take the others' results with it
    # (the first H200 run lost every JSON when the linear case outran the command's limit).
    args=${FASTPPO_BENCH_ARGS:---targets}
    suites=${FASTPPO_BENCH_SUITES:-ops gae linear}
    limit=${FASTPPO_BENCH_SUITE_TIMEOUT:-300}
    tmp=$(mktemp -d)
    : > "$out/bench.log"
    bench_rc=0
    for suite in $suites; do
        log "bench: fastppo bench $suite --device $device $args (limit ${limit}s) -> bench.log"
        # shellcheck disable=SC2086  # args is a list of options
        timeout "$limit" "$PY" -m fastppo.cli bench "$suite" --device "$device" --out "$tmp/$suite" $args \
            >> "$out/bench.log" 2>&1
        suite_rc=$?
        [ "$suite_rc" = 0 ] || { log "bench $suite FAILED (rc=$suite_rc)"; bench_rc=$suite_rc; }
    done
    # every suite's JSON, CSV, target checks and plots in one archive (the device tool returns at most 8 files)
    (cd "$tmp" && tar -cf "$out/bench-results.tar" .)
    rm -rf "$tmp"
    grep -E "targets:|rows in" "$out/bench.log" | tail -n 12
    [ "$bench_rc" = 0 ] || phase_failed bench "$bench_rc"
fi
log "done ($what): rc=$rc; files in $out: $(cd "$out" && ls | tr '\n' ' ')"
exit "$rc"
