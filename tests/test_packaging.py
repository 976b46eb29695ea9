"""Every package directory of fastppo is listed in pyproject (a wheel install would silently drop one that isn't)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_packaged():
    # (tomllib is 3.11+; the project supports 3.10)
    block = re.search(r"^packages = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    listed = set(re.findall(r'"([^"]+)"', block.group(1)))
    on_disk = {"fastppo." + ".".join(p.parent.relative_to(ROOT / "fastppo").parts)
               for p in (ROOT / "fastppo").rglob("__init__.py") if p.parent != ROOT / "fastppo"}
    assert on_disk | {"fastppo", "fastppo.kernels", "fastppo.benchmarks"} <= listed, on_disk - listed
