"""Backend selection: auto falls back quietly, an explicit missing backend raises with the reason and a hint."""

from __future__ import annotations

import pytest
import torch

import fastppo
from fastppo import _dispatch


def test_backends_report_every_backend_with_a_reason():
    info = fastppo.backends()
    assert list(info) == ["torch", "triton", "triton-interpret", "cpp", "cuda"]
    assert info["torch"].available
    for b in info.values():
        assert b.reason  # available: what it runs on; missing: why


def test_auto_on_cpu_picks_cpp_when_built_else_torch():
    got = _dispatch.resolve("auto", torch.device("cpu"), "logprobs")
    expected = "cpp" if fastppo.backends()["cpp"].available and _dispatch.implements("cpp", "logprobs") else "torch"
    assert got == expected


def test_elementwise_ops_run_in_torch():
    assert _dispatch.resolve(None, torch.device("cpu"), None) == "torch"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend"):
        fastppo.token_logprobs(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), backend="tpu")


def test_env_variable_overrides(monkeypatch):
    monkeypatch.setenv("FASTPPO_BACKEND", "torch")
    assert _dispatch.resolve(None, torch.device("cpu"), "logprobs") == "torch"
    monkeypatch.setenv("FASTPPO_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend"):
        _dispatch.resolve(None, torch.device("cpu"), "logprobs")


def test_explicit_unavailable_backend_raises_with_reason_and_hint(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the cuda backend may be available")
    with pytest.raises(fastppo.BackendUnavailableError, match="'cuda' is not available.*Hint"):
        fastppo.token_logprobs(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), backend="cuda")
    with pytest.raises(fastppo.BackendUnavailableError, match="'triton' is not available.*TRITON_INTERPRET"):
        fastppo.token_logprobs(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), backend="triton")


def test_float64_on_auto_takes_the_exact_reference():
    x = torch.randn(3, 7, dtype=torch.float64)
    assert fastppo.token_logprobs(x, torch.zeros(3, dtype=torch.long)).dtype == torch.float64


def test_torch_backend_matches_reference():
    from fastppo import reference as ref

    x = torch.randn(4, 9)
    lab = torch.randint(0, 9, (4,))
    torch.testing.assert_close(fastppo.token_logprobs(x, lab, backend="torch"), ref.token_logprobs(x, lab))


def test_interpreter_mode_is_reported(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fastppo.backends()["triton-interpret"].available == fastppo.backends()["triton"].available
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    info = fastppo.backends()["triton-interpret"]
    assert not info.available and "TRITON_INTERPRET" in info.reason
