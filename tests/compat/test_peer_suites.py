"""The peers' own unit tests for the functions fastppo replaces, run with ``fastppo.compat.patch(peer)`` applied.

Each suite runs in its own pytest process (the peers ship their tests as a top-level ``tests`` package) from the
copy ``.ci/install-peers.sh`` keeps under ``$FASTPPO_PEERS_DIR/<name>-<version>/tests``, with the plugin
``tests/compat/peer_plugin/fastppo_peer_patch.py`` patching before collection. A suite is skipped only when the
peer or its tests are not installed here.

- verl: its tests import ``verl`` normally, so ``patch("verl")`` alone redirects them.
- OpenRLHF: its tests load ``openrlhf/models/utils.py`` / ``loss.py`` by file path under private module names,
  which no ``patch`` can reach (the README says so); the plugin points those private copies at the adapters
  (``FASTPPO_PEER_BY_PATH=1``), so the tests still exercise fastppo.
- TRL ships no tests in its wheel or sdist, so there is no TRL suite to run here; ``tests/compat/test_trl.py``
  compares every adapter with the installed TRL instead. (Checked by hand against TRL's GitHub
  ``tests/test_utils.py`` ``TestSelectiveLogSoftmax`` / ``TestEntropyFromLogits``: with the patch, all pass
  except the bf16/fp16 cases, which demand bit-equality with TRL's half-precision arithmetic -- a documented
  difference.)

Deselected peer tests (none today) must name the documented difference that makes them fail.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.compat.conftest import peers_dir

PLUGIN_DIR = Path(__file__).resolve().parent / "peer_plugin"

SUITES = {
    "verl": {
        "files": [
            "tests/trainer/ppo/test_core_algos_on_cpu.py",
            "tests/trainer/ppo/test_loss_aggregation_on_cpu.py",
            "tests/trainer/ppo/test_dynamic_policy_losses_on_cpu.py",
            "tests/trainer/ppo/test_value_loss_normalization_on_cpu.py",
            "tests/trainer/ppo/test_reinforce_pp_multiturn_on_cpu.py",
            "tests/trainer/ppo/test_rollout_corr_integration.py",
        ],
        "by_path": False,
        "min_passed": 70,
        "deselect": {},
    },
    "openrlhf": {
        "files": ["tests/test_kl_estimator_gradient.py", "tests/test_loss_aggregation.py"],
        "by_path": True,
        "min_passed": 25,
        "deselect": {},
    },
}


def _suite_root(peer: str, tmp_path: Path) -> Path:
    try:
        version = importlib.metadata.version(peer)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{peer} is not installed (run .ci/install-peers.sh)")
    stored = peers_dir() / f"{peer}-{version}" / "tests"
    if not (stored / "__init__.py").is_file():
        pytest.skip(f"{peer} {version}'s own tests are not at {stored} (run .ci/install-peers.sh)")
    # The peer's tests expect to sit beside the package (OpenRLHF resolves ../openrlhf/models/*.py from their
    # resolved __file__, so they are copied, not linked).
    root = tmp_path / "suite"
    shutil.copytree(stored, root / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    spec = importlib.util.find_spec(peer)
    (root / peer).symlink_to(Path(spec.origin).parent, target_is_directory=True)
    return root


@pytest.mark.slow  # a pytest process importing torch and the peer: ~15-50 s on the 2-core machine
@pytest.mark.parametrize("peer", sorted(SUITES))
def test_peer_suite_passes_with_patch(peer, tmp_path):
    suite = SUITES[peer]
    root = _suite_root(peer, tmp_path)
    report, junit = tmp_path / "patch-report.json", tmp_path / "junit.xml"
    env = {
        **os.environ,
        "PYTHONPATH": str(PLUGIN_DIR),
        "FASTPPO_PEER": peer,
        "FASTPPO_PEER_BY_PATH": "1" if suite["by_path"] else "0",
        "FASTPPO_PEER_REPORT": str(report),
    }
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "fastppo_peer_patch",
           "--rootdir", str(root), "--junitxml", str(junit), *suite["files"]]
    for test_id in suite["deselect"]:
        cmd += ["--deselect", test_id]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert junit.is_file(), tail
    totals = ET.parse(junit).getroot().find("testsuite").attrib
    failed, errors, skipped = int(totals["failures"]), int(totals["errors"]), int(totals["skipped"])
    passed = int(totals["tests"]) - failed - errors - skipped
    assert proc.returncode == 0 and failed == errors == 0, tail
    assert passed >= suite["min_passed"], tail
    # the suite ran against fastppo: the patch replaced the peer's functions (and, by path, the private copies)
    done = json.loads(report.read_text())
    assert len(done["replaced"]) >= 4, done
    if suite["by_path"]:
        assert any(name.startswith("tests.") for name in done["by_path"]), done
