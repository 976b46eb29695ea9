#!/usr/bin/env bash
# One-command GPU run for the targets of issues #3 and #4: environment, GPU tests, the full benchmark suite.
#
#   bash benchmarks/gpu_run.sh OUT_DIR [all|tests|bench]
#
# Writes into OUT_DIR: env.txt (nvidia-smi, versions, fastppo backends), pytest-gpu.log, bench.log, run.log
# (phase timestamps) and the suite's bench-*.csv/.json/-targets.csv/.png; the targets table (pass / FAIL / not
# measured) ends bench.log. Commit OUT_DIR's files under benchmarks/results/ afterwards.
# Needs an NVIDIA GPU, a CUDA build of torch, this checkout installed (pip install -e ".[test]", then
# .ci/install-peers.sh; liger-kernel and flash-attn give their rows). Budgeted for < 10 min on an H100 (estimate,
# not yet timed: ~2 min of GPU tests, ~7 min of suite, mostly torch.compile of the 9 logits cases); the second
# argument splits the run in two commands if needed, and FASTPPO_BENCH_ARGS (e.g. "--only logprobs,ppo_loss,gae")
# narrows the suite to the cases the targets read. FASTPPO_BENCH_DEVICE=cpu FASTPPO_BENCH_ARGS=--quick dry-runs
# the script on a machine without a GPU.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_run.sh OUT_DIR [all|tests|bench]}
what=${2:-all}
device=${FASTPPO_BENCH_DEVICE:-cuda}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
log() { echo "== $(date -u +%FT%TZ) $*" | tee -a "$out/run.log"; }

if [ "$device" = cuda ] && ! nvidia-smi >/dev/null 2>&1; then
    echo "gpu_run.sh: nvidia-smi failed: no NVIDIA GPU here (FASTPPO_BENCH_DEVICE=cpu for a dry run)" >&2
    exit 2
fi
command -v fastppo >/dev/null || { echo "gpu_run.sh: no 'fastppo' command: pip install -e '.[test]'" >&2; exit 2; }

log "environment -> env.txt"
{
    if [ "$device" = cuda ]; then
        nvidia-smi
        nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.memory,power.limit,driver_version \
            --format=csv
    fi
    echo "commit $(git rev-parse HEAD 2>/dev/null) $(git status --short 2>/dev/null | wc -l) changed paths"
    python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
        'triton', triton.__version__)"
    python -m pip list 2>/dev/null | grep -iE '^(torch|triton|transformers|trl|verl|openrlhf|liger|flash)'
    fastppo backends
} 2>&1 | tee "$out/env.txt"

tests_rc=0
bench_rc=0
if [ "$what" = all ] || [ "$what" = tests ]; then
    log "python -m pytest -m gpu -q tests -> pytest-gpu.log"
    python -m pytest -m gpu -q tests 2>&1 | tee "$out/pytest-gpu.log"
    tests_rc=${PIPESTATUS[0]}
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
    log "fastppo bench all --device $device ${FASTPPO_BENCH_ARGS:-} -> bench.log"
    # shellcheck disable=SC2086  # FASTPPO_BENCH_ARGS is a list of options
    fastppo bench all --device "$device" --out "$out" ${FASTPPO_BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
    bench_rc=${PIPESTATUS[0]}
fi
log "done: pytest rc=$tests_rc, bench rc=$bench_rc; files in $out"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
