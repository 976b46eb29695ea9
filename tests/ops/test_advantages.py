"""Public outcome estimators (``fastppo.grpo_advantages`` / ``rloo_advantages`` / ``reinforce_pp_advantages``):
fp32 against the float64 reference, dtypes, kernel-backed scan, input validation."""

from __future__ import annotations

import pytest
import torch

import fastppo
from fastppo.reference import advantages as A
from tests.tolerances import assert_close


def _batch(B=13, T=17, n_groups=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, generator=g) * 3
    ids = torch.randint(0, n_groups, (B,), generator=g) * 11
    mask = torch.rand(B, T, generator=g) > 0.25
    return scores, ids, mask


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_fp32_matches_float64_reference(norm):
    scores, ids, mask = _batch()
    got = fastppo.grpo_advantages(scores, ids, mask, norm_by_std=norm)
    assert got.dtype == torch.float32 and got.shape == mask.shape
    assert_close(got, A.grpo_advantages(scores.double(), ids, mask, norm_by_std=norm), torch.float32)
    assert (got[~mask] == 0).all()


def test_rloo_fp32_matches_float64_reference():
    scores, ids, mask = _batch(seed=1)
    got = fastppo.rloo_advantages(scores, ids, mask.float())
    assert_close(got, A.rloo_advantages(scores.double(), ids, mask), torch.float32)


def test_half_precision_scores_come_back_float32():
    scores, ids, mask = _batch(seed=2)
    got = fastppo.grpo_advantages(scores.bfloat16(), ids, mask)
    assert got.dtype == torch.float32
    assert_close(got, A.grpo_advantages(scores.bfloat16().double(), ids, mask), torch.float32)


@pytest.mark.parametrize("gamma", [1.0, 0.99, 0.0])
def test_reinforce_pp_fp32_matches_float64_reference(gamma):
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(5, 33, generator=g)
    mask = torch.rand(5, 33, generator=g) > 0.3
    adv, ret = fastppo.reinforce_pp_advantages(rewards, mask, gamma=gamma)
    e_adv, e_ret = A.reinforce_pp_advantages(rewards.double(), mask, gamma=gamma)
    assert_close(ret, e_ret, torch.float32)
    assert_close(adv, e_adv, torch.float32)
    # [B] scores are placed on each row's last valid token.
    adv_s, ret_s = fastppo.reinforce_pp_advantages(rewards[:, 0], mask, gamma=gamma)
    e_adv_s, e_ret_s = A.reinforce_pp_advantages(A.place_on_last_token(rewards[:, 0].double(), mask), mask, gamma=gamma)
    assert_close(ret_s, e_ret_s, torch.float32)
    assert_close(adv_s, e_adv_s, torch.float32)


def test_reinforce_pp_on_the_gae_kernel_matches_reference():
    pytest.importorskip("triton")
    if not fastppo.backends()["triton"].available:
        pytest.skip("triton backend unavailable here (needs CUDA or TRITON_INTERPRET=1)")
    g = torch.Generator().manual_seed(4)
    rewards = torch.randn(3, 40, generator=g)
    mask = torch.rand(3, 40, generator=g) > 0.3
    adv, ret = fastppo.reinforce_pp_advantages(rewards, mask, gamma=0.97, backend="triton")
    e_adv, e_ret = A.reinforce_pp_advantages(rewards.double(), mask, gamma=0.97)
    assert_close(ret, e_ret, torch.float32)
    assert_close(adv, e_adv, torch.float32)


def test_validation_errors():
    scores, ids, mask = _batch()
    with pytest.raises(TypeError, match="group_index"):
        fastppo.grpo_advantages(scores, ids.float(), mask)
    with pytest.raises(TypeError, match="group_index"):
        fastppo.rloo_advantages(scores, ids.tolist(), mask)
    with pytest.raises(ValueError, match=r"scores must be \[B\]"):
        fastppo.grpo_advantages(scores[:, None], ids, mask)
    with pytest.raises(ValueError, match="group_index has shape"):
        fastppo.grpo_advantages(scores, ids[:-1], mask)
    with pytest.raises(ValueError, match="mask must be"):
        fastppo.grpo_advantages(scores, ids, mask[:-1])
    with pytest.raises(TypeError, match="scores"):
        fastppo.rloo_advantages(ids, ids, mask)
    with pytest.raises(ValueError, match="eps"):
        fastppo.grpo_advantages(scores, ids, mask, eps=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        fastppo.reinforce_pp_advantages(torch.randn(2, 3), torch.ones(2, 3), gamma=1.5)
    with pytest.raises(ValueError, match="at least 2 valid"):
        fastppo.reinforce_pp_advantages(torch.randn(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="do not match"):
        fastppo.reinforce_pp_advantages(torch.randn(3), torch.ones(2, 3))


def test_all_masked_rows_and_single_token_sequences():
    scores = torch.tensor([1.0, 2.0, 4.0])
    mask = torch.tensor([[1], [0], [1]])
    adv = fastppo.grpo_advantages(scores, torch.tensor([0, 0, 0]), mask)
    assert adv[1, 0] == 0 and torch.isfinite(adv).all()
    adv, ret = fastppo.reinforce_pp_advantages(scores, mask)
    assert ret[:, 0].tolist() == [1.0, 0.0, 4.0] and adv[1, 0] == 0
