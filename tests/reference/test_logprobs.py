"""Reference logprobs/entropy: hand-derived values, and the backward formula the kernels implement."""

from __future__ import annotations

import math

import pytest
import torch

from fastppo import reference as ref


def test_hand_derived_three_way_softmax():
    # softmax([0, ln2, ln3]) = [1/6, 2/6, 3/6]
    x = torch.tensor([[0.0, math.log(2.0), math.log(3.0)]], dtype=torch.float64)
    lp = ref.token_logprobs(x, torch.tensor([2]))
    h = ref.token_entropy(x)
    p = [1 / 6, 2 / 6, 3 / 6]
    assert lp.item() == pytest.approx(math.log(0.5), abs=1e-14)
    assert h.item() == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-14)


def test_temperature_divides_logits():
    x = torch.tensor([[0.0, 2 * math.log(2.0), 2 * math.log(3.0)]], dtype=torch.float64)
    lp, h = ref.logprobs_and_entropy(x, torch.tensor([0]), temperature=2.0)
    assert lp.item() == pytest.approx(math.log(1 / 6), abs=1e-14)
    assert h.item() == pytest.approx(-sum(q * math.log(q) for q in (1 / 6, 2 / 6, 3 / 6)), abs=1e-14)


def test_masked_vocabulary_entries_contribute_nothing():
    x = torch.tensor([[0.0, -math.inf, 0.0, -math.inf]], dtype=torch.float64)
    lp, h = ref.logprobs_and_entropy(x, torch.tensor([2]))
    assert lp.item() == pytest.approx(math.log(0.5), abs=1e-14)
    assert h.item() == pytest.approx(math.log(2.0), abs=1e-14)


def test_low_precision_inputs_accumulate_in_fp32():
    x = torch.randn(5, 300).bfloat16()
    lp = ref.token_logprobs(x, torch.randint(0, 300, (5,)))
    assert lp.dtype == torch.float32


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_backward_matches_the_kernel_formula(temperature):
    """dx_j = [g_lp*(1[j=t] - p_j) - g_H*p_j*(log p_j + H)] / T, the formula every kernel backend implements."""
    g = torch.Generator().manual_seed(0)
    n, v = 13, 37
    x = (torch.randn(n, v, generator=g, dtype=torch.float64) * 3).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    g_lp = torch.randn(n, generator=g, dtype=torch.float64)
    g_h = torch.randn(n, generator=g, dtype=torch.float64)
    lp, h = ref.logprobs_and_entropy(x, labels, temperature=temperature)
    (lp * g_lp + h * g_h).sum().backward()
    logp_all = torch.log_softmax(x.detach() / temperature, -1)
    p = logp_all.exp()
    onehot = torch.nn.functional.one_hot(labels, v).to(torch.float64)
    expected = (g_lp[:, None] * (onehot - p) - g_h[:, None] * p * (logp_all + h.detach()[:, None])) / temperature
    torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=1e-12)
