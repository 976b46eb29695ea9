"""The README's quick start and CI run the same two commands, verbatim, in a fresh environment."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Quick start$(.*?)^#+ ", text, re.M | re.S)
    assert section, "README has no '## Quick start' section"
    blocks = re.findall(r"```bash\n(.*?)```", section.group(1), re.S)
    assert blocks, "the quick start has no bash block"
    return [ln.strip() for ln in blocks[0].splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_readme_quick_start_is_two_commands():
    cmds = quick_start_commands()
    assert len(cmds) == 2, cmds
    assert cmds[0].startswith("pip install -e .") and "fastppo train" in cmds[0]
    assert "python -m pytest" in cmds[1]


def test_ci_runs_the_readme_commands_verbatim_with_nothing_installed_before():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    cmds = quick_start_commands()
    where = []
    for cmd in cmds:
        hits = [i for i, ln in enumerate(ci) if ln == cmd or ln == f"{cmd} || exit $?"]
        assert len(hits) == 1, f".ci/run must run {cmd!r} once, verbatim (optionally followed by '|| exit $?')"
        where.append(hits[0])
    assert where == sorted(where), "the commands run in the README's order"
    before = [ln for ln in ci[: where[0]] if ln.strip() and not ln.lstrip().startswith("#")]
    assert not [ln for ln in before if re.search(r"\bpip\b|\binstall\b", ln)], before
    assert any(re.match(r"python3 -m venv \S+", ln) for ln in before), "CI starts from a fresh venv"
    assert any(ln.startswith("fastppo bench") and "--quick" in ln for ln in ci[where[-1]:])
