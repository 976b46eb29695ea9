from __future__ import annotations

import math

import pytest
import torch

from fastppo import reference as ref

LP, RF = math.log(0.5), math.log(0.25)
D = LP - RF  # ln 2


@pytest.mark.parametrize(
    "kind,expected",
    [("k1", D), ("k2", 0.5 * D * D), ("k3", math.exp(-D) + D - 1.0), ("abs", abs(D))],
)
def test_hand_derived(kind, expected):
    out = ref.kl_penalty(torch.tensor([LP], dtype=torch.float64), torch.tensor([RF], dtype=torch.float64), kind)
    assert out.item() == pytest.approx(expected, abs=1e-14)


def test_k3_is_nonnegative_and_zero_at_equality():
    lp = torch.randn(1000, dtype=torch.float64)
    rf = torch.randn(1000, dtype=torch.float64)
    assert (ref.kl_penalty(lp, rf, "k3") >= 0).all()
    assert ref.kl_penalty(lp, lp, "k3").abs().max() == 0


def test_clamp():
    out = ref.kl_penalty(torch.tensor([0.0, 0.0]), torch.tensor([30.0, -30.0]), "k1", clamp=10.0)
    assert out.tolist() == [-10.0, 10.0]


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown KL kind"):
        ref.kl_penalty(torch.zeros(1), torch.zeros(1), "k4")
