"""The experience pass does only the work the update needs: response-position logits, no value head without a
critic, and on an exactly on-policy update no policy forward at all (the update's own forward gives the old
log-probs, with the same results)."""

from __future__ import annotations

import pytest
import torch

import fastppo
from fastppo.engine.experience import make_experience, response_slice, score_rollout, update_is_on_policy
from fastppo.engine.trainer import PPOTrainer
from tests.engine.tiny import quiet, tiny_config

ON_POLICY = dict(advantage_estimator="grpo", samples_per_prompt=4, batch_size=8, mini_batch_size=8,
                 micro_batch_size=8, forward_batch_size=8, ppo_epochs=1, kl_in_loss=True, kl_kind="k3",
                 kl_coef=0.04, adaptive_kl=False, sft_steps=0, total_steps=2)


def test_on_policy_old_logprobs_from_the_update_give_identical_results(tmp_path):
    runs = []
    for reuse in (True, False):
        tr = PPOTrainer(tiny_config(**ON_POLICY), tmp_path / str(reuse), echo=quiet)
        assert tr.old_from_update  # the configuration qualifies
        tr.old_from_update = reuse
        steps = [tr.train_step() for _ in range(2)]
        runs.append((steps, {k: v.detach().clone() for k, v in tr.policy.state_dict().items()}))
    (a_steps, a_params), (b_steps, b_params) = runs
    for a, b in zip(a_steps, b_steps, strict=True):
        for k in a:
            if not k.startswith("time_") and k != "tokens_per_s":
                assert a[k] == b[k], k  # bitwise: the same logits give the same old log-probs
    assert a_steps[0]["clipfrac"] == 0.0 and a_steps[1]["kl"] != 0.0  # step 2: the policy has moved
    for k in a_params:
        assert torch.equal(a_params[k], b_params[k]), k
    assert any(not torch.equal(v, PPOTrainer(tiny_config(**ON_POLICY), tmp_path / "fresh", echo=quiet)
                               .policy.state_dict()[k]) for k, v in a_params.items())


@pytest.mark.parametrize("change", [dict(ppo_epochs=2), dict(mini_batch_size=4, micro_batch_size=4),
                                    dict(kl_in_loss=False), dict(advantage_estimator="gae", samples_per_prompt=1)])
def test_off_policy_configurations_keep_the_experience_forward(change):
    assert not update_is_on_policy(tiny_config(**{**ON_POLICY, **change}))
    assert update_is_on_policy(tiny_config(**{**ON_POLICY, "kl_in_loss": False, "kl_coef": 0.0}))
    assert update_is_on_policy(tiny_config(**{**ON_POLICY, "advantage_estimator": "gae", "samples_per_prompt": 1,
                                              "critic": "separate"}))


def _calls(module: torch.nn.Module) -> list[int]:
    n = [0]
    module.register_forward_hook(lambda *_: n.__setitem__(0, n[0] + 1))
    return n


def test_response_positions_only_and_no_value_head_without_a_critic(tmp_path):
    cfg = tiny_config(advantage_estimator="grpo", samples_per_prompt=4, kl_in_loss=True, sft_steps=0,
                      critic="separate")
    tr = PPOTrainer(cfg, tmp_path, echo=quiet)
    assert tr.critic is None  # critic-free: no separate critic is built
    v_head = _calls(tr.policy.v_head)
    torch.manual_seed(0)
    ro = tr._generate(tr.train_prompts[:8], greedy=False)
    scores, _, _ = score_rollout(ro, tr.tokenizer, tr.reward_fn, cfg)
    exp = make_experience(ro, scores, tr.policy, tr.ref_lm, None, cfg, 0.1)
    tr.update(exp)
    assert v_head[0] == 0
    assert torch.equal(exp.values, torch.zeros_like(exp.values))
    # the response-position logits equal the slice of a full forward
    with torch.no_grad():
        full, _ = tr.policy(exp.input_ids, exp.attention_mask, exp.position_ids)
        lp = fastppo.token_logprobs(response_slice(full, exp.prompt_width), exp.labels) * exp.mask
        kept, _ = tr.policy(exp.input_ids, exp.attention_mask, exp.position_ids, keep=exp.labels.shape[1] + 1,
                            values=False)
    assert kept.shape[1] == exp.labels.shape[1] + 1
    torch.testing.assert_close(kept[:, :-1], response_slice(full, exp.prompt_width), rtol=1e-5, atol=1e-5)
    exp2 = make_experience(ro, scores, tr.policy, tr.ref_lm, None, cfg, 0.1)
    torch.testing.assert_close(exp2.old_logprobs, lp, rtol=1e-5, atol=1e-5)
