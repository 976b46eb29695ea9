"""Checks before any model work: an unusable kernel backend is refused before the warm-up."""

from __future__ import annotations

import pytest
import torch
import yaml

from fastppo import backends
from fastppo.engine import cli
from tests.engine.tiny import TINY


def _unusable_backends() -> list[tuple[str, str]]:
    # (backend, device): the CUDA extension can never run on the CPU; triton neither without a GPU or the interpreter
    cases = [("cuda", "cpu")]
    if not torch.cuda.is_available():
        cases.append(("triton", "cpu"))
    if not backends()["cpp"].available:
        cases.append(("cpp", "cpu"))
    return cases


@pytest.mark.parametrize("backend, device", _unusable_backends())
def test_unusable_backend_is_refused_before_the_warm_up(tmp_path, capsys, monkeypatch, backend, device):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    conf = tmp_path / "tiny.yaml"
    conf.write_text(yaml.safe_dump({**TINY, "sft_steps": 200, "backend": backend, "device": device}))
    run = tmp_path / "run"
    assert cli.main(["--config", str(conf), "--output_dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"backend={backend!r} on device {device}" in err
    assert "is not available" in err or "cannot run on cpu tensors" in err
    assert not (run / "reference.safetensors").exists()  # the warm-up never ran
