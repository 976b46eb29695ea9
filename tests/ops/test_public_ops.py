"""Public ops on the default CPU path against the float64 reference: values, gradients, dtypes, leading shapes."""

from __future__ import annotations

import pytest
import torch

import fastppo
from fastppo import reference as ref
from tests.tolerances import assert_close, assert_no_worse_than_torch


def _inputs(shape=(3, 7), v=1271, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, v, generator=g) * 2
    labels = torch.randint(0, v, shape, generator=g)
    return logits, labels


@pytest.mark.parametrize("shape", [(41,), (3, 7), (2, 3, 5)])
def test_logprobs_and_entropy_any_leading_shape(shape):
    logits, labels = _inputs(shape)
    lp, h = fastppo.logprobs_and_entropy(logits, labels, temperature=0.9)
    e_lp, e_h = ref.logprobs_and_entropy(logits.double(), labels, temperature=0.9)
    assert lp.dtype == torch.float32 and lp.shape == shape
    assert_close(lp, e_lp, torch.float32)
    assert_close(h, e_h, torch.float32)
    assert_close(fastppo.token_logprobs(logits, labels, temperature=0.9), e_lp, torch.float32)
    assert_close(fastppo.token_entropy(logits, temperature=0.9), e_h, torch.float32)


def test_bf16_is_no_worse_than_pytorch_bf16():
    logits, labels = _inputs((41,))
    x = logits.bfloat16()
    lp = fastppo.token_logprobs(x, labels)
    expected = ref.token_logprobs(x.double(), labels)
    eager_bf16 = torch.log_softmax(x, -1).gather(-1, labels[:, None]).squeeze(-1)
    assert_no_worse_than_torch(lp, expected, eager_bf16)


def test_non_contiguous_logits():
    big, _ = _inputs((2, 8), v=300)
    labels = torch.randint(0, 300, (2, 7))
    view = big[:, :-1, :]
    lp = fastppo.token_logprobs(view, labels)
    assert_close(lp, ref.token_logprobs(view.double(), labels), torch.float32)
    t = big.transpose(0, 1)  # stride(-1) == 1 but rows interleave
    assert_close(fastppo.token_entropy(t), ref.token_entropy(t.double()), torch.float32)


def test_ppo_loss_from_logits_gradient_matches_fp64():
    logits, labels = _inputs((2, 9), v=513, seed=4)
    g = torch.Generator().manual_seed(5)
    old = torch.randn(2, 9, generator=g) * 0.1 - 6
    adv = torch.randn(2, 9, generator=g)
    rlp = torch.randn(2, 9, generator=g) * 0.1 - 6
    mask = torch.rand(2, 9, generator=g) > 0.25
    kw = dict(ref_logprobs=rlp, kl_coef=0.05, kl_kind="k3", entropy_coef=0.01, clip_high=0.28, dual_clip=3.0,
              temperature=1.1, agg="seq-mean-token-mean")
    x = logits.clone().requires_grad_()
    loss, stats = fastppo.ppo_loss_from_logits(x, labels, old, adv, mask, **kw)
    loss.backward()
    x64 = logits.double().requires_grad_()
    e_loss, e_stats = ref.ppo_loss_from_logits(x64, labels, old.double(), adv.double(), mask,
                                               **{**kw, "ref_logprobs": rlp.double()})
    e_loss.backward()
    assert_close(loss, e_loss, torch.float32)
    assert_close(x.grad, x64.grad, torch.float32, "grad")
    assert set(stats) == set(e_stats)
    for k in stats:
        assert_close(stats[k], e_stats[k], torch.float32)


def test_losses_promote_half_inputs_to_float32():
    lp = torch.randn(2, 5).bfloat16()
    loss, stats = fastppo.ppo_policy_loss(lp, lp, torch.ones(2, 5).bfloat16(), torch.ones(2, 5))
    assert loss.dtype == torch.float32 and stats["ratio_mean"].item() == pytest.approx(1.0)
    kl = fastppo.kl_penalty(lp, lp.float() * 0 + 1, "k2")
    assert kl.dtype == torch.float32


def test_gae_public_matches_reference():
    g = torch.Generator().manual_seed(9)
    r, v = torch.randn(4, 33, generator=g), torch.randn(4, 33, generator=g)
    m = torch.rand(4, 33, generator=g) > 0.2
    boot = torch.randn(4, generator=g)
    adv, ret = fastppo.gae(r, v, m, gamma=0.99, lam=0.95, bootstrap_value=boot)
    e_adv, e_ret = ref.gae(r.double(), v.double(), m, gamma=0.99, lam=0.95, bootstrap_value=boot.double())
    assert_close(adv, e_adv, torch.float32)
    assert_close(ret, e_ret, torch.float32)


def test_stats_are_detached_tensors():
    lp = torch.randn(2, 5, requires_grad=True)
    loss, stats = fastppo.ppo_policy_loss(lp, lp.detach(), torch.randn(2, 5), torch.ones(2, 5))
    assert loss.requires_grad
    assert all(isinstance(t, torch.Tensor) and not t.requires_grad for t in stats.values())


def test_gae_whiten_advantages_over_valid_tokens():
    g = torch.Generator().manual_seed(11)
    r, v = torch.randn(3, 20, generator=g), torch.randn(3, 20, generator=g)
    m = torch.rand(3, 20, generator=g) > 0.3
    adv, ret = fastppo.gae(r, v, m, whiten_advantages=True)
    raw, e_ret = ref.gae(r.double(), v.double(), m)
    assert_close(adv, ref.masked_whiten(raw, m) * m, torch.float32)
    assert_close(ret, e_ret, torch.float32)
    assert (adv[~m] == 0).all()
