#!/usr/bin/env bash
# Download the wheels the GPU kit needs (benchmarks/gpu_wheels.txt), for a GPU machine without a package registry.
#
#   bash benchmarks/gpu_wheels.sh DIR
#
# Run where pip reaches an index. Fetches each pinned wheel without its dependencies, as binary wheels for CPython
# $FASTPPO_GPU_PY (default 3.12) on manylinux x86_64, into DIR; prints each file's size and the total, and fails
# when the total exceeds $FASTPPO_GPU_WHEELS_MAX_MIB (default 64: what the GPU machine accepts per upload).
# Then: bash benchmarks/gpu_run.sh OUT_DIR with FASTPPO_GPU_WHEELS=DIR (its default is ./.whl).
set -euo pipefail
dir=${1:?usage: bash benchmarks/gpu_wheels.sh DIR}
py=${FASTPPO_GPU_PY:-3.12}
max_mib=${FASTPPO_GPU_WHEELS_MAX_MIB:-64}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$dir"
mapfile -t reqs < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$here/gpu_wheels.txt")
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    plat+=(--platform "$p")
done
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$py" \
    --implementation cp "${plat[@]}" -d "$dir" "${reqs[@]}"
python3 - "$dir" "$max_mib" <<'PY'
import pathlib, sys
wheels = sorted(pathlib.Path(sys.argv[1]).glob("*.whl"))
limit = int(sys.argv[2])
total = 0
for w in wheels:
    total += w.stat().st_size
    print(f"{w.stat().st_size / 2**20:10.2f} MiB  {w.name}")
print(f"{total / 2**20:10.2f} MiB  total ({len(wheels)} wheels, limit {limit} MiB)")
if total > limit * 2**20:
    sys.exit(f"gpu_wheels.sh: the wheels exceed {limit} MiB")
PY
