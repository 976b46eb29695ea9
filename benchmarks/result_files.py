"""The file formats every writer and reader of results shares: JSON-safe dicts, dicts as CSV lines, a run's JSON.

``report.py`` (a run's rows) and ``targets.py`` (its target checks) both write through these, and both read runs
back with ``load_json``; neither imports the other for them.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    return v


def clean_dicts(dicts: list[dict]) -> list[dict]:
    """JSON-safe copies (non-finite floats as strings) of result rows or target checks."""
    return [{k: _clean(v) for k, v in d.items()} for d in dicts]


def write_dicts_csv(dicts: list[dict], fields: list[str], path: Path) -> None:
    """One CSV line per dict (``fields`` in order, other keys dropped, None as an empty cell)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for d in dicts:
            w.writerow({k: ("" if v is None else v) for k, v in d.items()})


def load_json(path: Path) -> tuple[dict, list[dict]]:
    """A run's JSON file (written by ``report.write_json``): ``(meta, rows)``."""
    data = json.loads(Path(path).read_text())
    return data["meta"], data["rows"]
