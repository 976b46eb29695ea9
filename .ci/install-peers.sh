#!/usr/bin/env bash
# Install the peer frameworks the compat tests compare against (tests/compat), into the active Python, fast and
# without touching torch: run after fastppo (and so some torch >= 2.4, CPU or CUDA build) is installed.
#
# - TRL 1.16.0 with its own (light) dependencies, plus TRL 0.11.4's trl/core.py (the v0.x logprobs_from_logits /
#   masked_* helpers) unpacked under $FASTPPO_PEERS_DIR (default ~/.cache/fastppo-peers) for the tests to load.
# - verl 0.9.1 and OpenRLHF 0.11.2 with --no-deps (they pin vLLM, flash-attn, ray[default], older transformers),
#   plus exactly what the modules the tests import need: verl.utils.torch_functional, verl.trainer.ppo.core_algos,
#   verl.workers.utils.losses; openrlhf.models.utils / loss (deepspeed, built from source without its ops).
#   flash-attn has no CPU build, so openrlhf.models/__init__ (the actor) cannot load here; the tests load the
#   installed utils.py / loss.py directly (tests/compat/conftest.py).
# At the end torch must be exactly the build it was before and every peer module the tests use must import.
set -euo pipefail
export PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python}
pip_install() { "$PY" -m pip install -q "$@"; }

torch_version() { "$PY" -c "import torch; print(torch.__version__)"; }
TORCH_BEFORE=$(torch_version) || { echo "install-peers: no torch in $PY: pip install -e . first" >&2; exit 1; }
# Anything that asks for torch must be satisfied by the installed build, never replace it. The constraint names
# the version without its local label (2.14.1, not 2.14.1+cu130): an index has no "+cu130" release to resolve
# against, while "==2.14.1" is satisfied by the installed 2.14.1+cu130 (PEP 440 ignores the label).
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==${TORCH_BEFORE%%+*}" > "$CONSTRAINTS"

# --- TRL ---------------------------------------------------------------------------------------------------
pip_install -c "$CONSTRAINTS" "trl==1.16.0"

# Same default as tests/compat/conftest.py (Path.home() also works where $HOME is unset).
PEERS_DIR=${FASTPPO_PEERS_DIR:-$("$PY" -c "import pathlib; print(pathlib.Path.home() / '.cache' / 'fastppo-peers')")}
if [ ! -f "$PEERS_DIR/trl-0.11.4/trl/core.py" ]; then
  TMP=$(mktemp -d)
  "$PY" -m pip download -q --no-deps "trl==0.11.4" -d "$TMP"
  mkdir -p "$PEERS_DIR/trl-0.11.4/trl"
  "$PY" - "$TMP" "$PEERS_DIR/trl-0.11.4/trl/core.py" <<'EOF'
import glob, sys, zipfile
wheel = glob.glob(f"{sys.argv[1]}/trl-0.11.4-*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("trl/core.py"))
EOF
  rm -rf "$TMP"
fi

# TRL 1.12.0 and 1.13.0 (pure Python, no dependencies installed) in their own trees: their GRPO builds the
# [B, L, V] logits, so fastppo.compat.patch("trl") replaces another hook there; tests/compat/test_trl_lm_head.py
# runs its GRPOTrainer tests again with each first on PYTHONPATH.
for TRL_OLD in 1.12.0 1.13.0; do
  if [ ! -f "$PEERS_DIR/trl-$TRL_OLD/trl/__init__.py" ]; then
    "$PY" -m pip install -q --no-deps --target "$PEERS_DIR/trl-$TRL_OLD" "trl==$TRL_OLD"
  fi
done

# --- verl (its imported modules need omegaconf, codetiming, ray core, tensordict, PIL) ----------------------
pip_install --no-deps "verl==0.9.1" "tensordict==0.15.3" "pyvers==0.2.3" "cloudpickle==3.1.2" "orjson==3.13.0" \
  "codetiming==1.4.0"
pip_install -c "$CONSTRAINTS" "omegaconf==2.3.0" "ray==2.60.0" "pillow" "numpy"

# --- OpenRLHF (models.utils imports deepspeed) ---------------------------------------------------------------
pip_install --no-deps "openrlhf==0.11.2"
pip_install -c "$CONSTRAINTS" setuptools wheel "hjson==3.1.0" "py-cpuinfo==9.0.0" "ninja==1.13.2" "pydantic>=2" \
  "msgpack==1.2.4" "einops==0.8.2" "nvidia-ml-py==13.615.71" psutil packaging
DS_BUILD_OPS=0 pip_install --no-deps --no-build-isolation "deepspeed==0.19.6"
# The OpenRLHF wheel also installs its own test suite as a top-level `tests` package; drop it so it can never
# shadow this repository's tests/.
"$PY" - <<'EOF'
import importlib.metadata as md, pathlib, shutil
dist = md.distribution("openrlhf")
stray = {pathlib.Path(dist.locate_file(f)).parent for f in dist.files or [] if str(f).startswith("tests/")}
for d in sorted(stray, key=lambda p: len(p.parts)):
    if d.name == "tests" and d.is_dir():
        shutil.rmtree(d, ignore_errors=True)
EOF

# --- the peers' own unit tests (tests/compat/test_peer_suites.py runs them with fastppo.compat.patch applied) --
# verl's and OpenRLHF's wheels ship their test suites (as a top-level `tests` package, dropped above); keep a copy
# from the same wheels under $PEERS_DIR/<name>-<version>/tests. TRL ships no tests in its wheel or sdist.
for PEER in "verl==0.9.1" "openrlhf==0.11.2"; do
  DEST="$PEERS_DIR/${PEER/==/-}"
  if [ ! -f "$DEST/tests/__init__.py" ]; then
    TMP=$(mktemp -d)
    "$PY" -m pip download -q --no-deps "$PEER" -d "$TMP"
    "$PY" - "$TMP" "$DEST" <<'EOF'
import glob, pathlib, re, sys, zipfile
wheel, dest = glob.glob(f"{sys.argv[1]}/*.whl")[0], pathlib.Path(sys.argv[2])
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        rel = re.sub(r"^[^/]+[.]data/purelib/", "", name)
        if rel.startswith("tests/") and not name.endswith("/"):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(z.read(name))
EOF
    rm -rf "$TMP"
  fi
done

# --- fused-LM-head peers (benchmarks/bench_linear.py): Liger's chunked losses, Apple's Cut-Cross-Entropy ------
pip_install -c "$CONSTRAINTS" "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1"

# --- checks ----------------------------------------------------------------------------------------------
TORCH_AFTER=$(torch_version)
if [ "$TORCH_AFTER" != "$TORCH_BEFORE" ]; then
  echo "install-peers: torch changed from $TORCH_BEFORE to $TORCH_AFTER" >&2
  exit 1
fi
"$PY" - <<'EOF'
import importlib, importlib.util, sys, types, pathlib
for name in ("trl.trainer.utils", "verl.utils.torch_functional", "verl.trainer.ppo.core_algos",
             "verl.workers.utils.losses", "deepspeed", "liger_kernel.chunked_loss", "cut_cross_entropy"):
    importlib.import_module(name)
spec = importlib.util.find_spec("openrlhf")
pkg = types.ModuleType("openrlhf.models")
pkg.__path__ = [str(pathlib.Path(spec.origin).parent / "models")]
sys.modules["openrlhf.models"] = pkg
importlib.import_module("openrlhf.models.utils")
importlib.import_module("openrlhf.models.loss")
print("install-peers: trl, verl, openrlhf, liger-kernel, cut-cross-entropy ready; torch", __import__("torch").__version__)
EOF
