"""Config ``fused_lm_head``: experience and the PPO update from the last hidden states + lm_head weight give the
same numbers (and gradients) as the full-logits path."""

from __future__ import annotations

import torch

from fastppo.engine.experience import make_experience, score_rollout
from fastppo.engine.lm_head import last_hidden, lm_head_of
from fastppo.engine.trainer import PPOTrainer
from tests.engine.tiny import quiet, tiny_config
from tests.tolerances import assert_close


def _experience(tr: PPOTrainer):
    torch.manual_seed(3)
    ro = tr._generate(tr.train_prompts[: tr.cfg.batch_size], greedy=False)
    scores, _, _ = score_rollout(ro, tr.tokenizer, tr.reward_fn, tr.cfg)
    return make_experience(ro, scores, tr.policy, tr.ref_lm, tr.critic, tr.cfg, 0.1)


def test_lm_head_is_the_linear_map_of_the_last_hidden_state(tmp_path):
    tr = PPOTrainer(tiny_config(sft_steps=0), tmp_path, echo=quiet)
    lm = tr.policy.lm
    head = lm_head_of(lm)
    assert head is not None and head.weight is lm.get_output_embeddings().weight
    ids = torch.randint(0, head.weight.shape[0], (2, 7))
    attn = torch.ones_like(ids)
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=attn).logits
        hid = last_hidden(lm, input_ids=ids, attention_mask=attn)
    torch.testing.assert_close(torch.nn.functional.linear(hid, head.weight, head.bias), logits)
    lm.config.final_logit_softcapping = 30.0  # logits no longer a linear map: the full-logits path is kept
    assert lm_head_of(lm) is None


def test_experience_and_update_match_with_the_flag_on_and_off(tmp_path):
    cfg = tiny_config(sft_steps=3, kl_in_loss=True, kl_kind="k3", kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0,
                      critic="separate")
    assert cfg.fused_lm_head  # on by default
    tr = PPOTrainer(cfg, tmp_path, echo=quiet)
    with torch.no_grad():
        for p in tr.policy.lm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    exps = {}
    for fused in (False, True):
        tr.cfg.fused_lm_head = fused
        exps[fused] = _experience(tr)
    a, b = exps[False], exps[True]
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    for field in ("old_logprobs", "ref_logprobs", "entropy", "values", "advantages", "returns"):
        assert_close(getattr(b, field), getattr(a, field).double(), torch.float32)
    torch.manual_seed(4)  # step away from the rollout policy: ratios != 1, some tokens clipped
    with torch.no_grad():
        for p in tr.policy.lm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    losses, grads = {}, {}
    for fused in (False, True):
        tr.cfg.fused_lm_head = fused
        tr.policy.zero_grad(set_to_none=True)
        tr.critic.zero_grad(set_to_none=True)
        loss, stats = tr.micro_loss(a)
        loss.backward()
        assert stats["clipfrac"] > 0
        losses[fused] = loss.detach()
        named = [*tr.policy.named_parameters(), *(("critic." + n, p) for n, p in tr.critic.named_parameters())]
        grads[fused] = {n: p.grad.clone() for n, p in named if p.grad is not None}
    assert_close(losses[True], losses[False].double(), torch.float32)
    assert grads[False].keys() == grads[True].keys()
    assert any("lm_head" in n or "embed_tokens" in n for n in grads[True])
    for n, g in grads[False].items():
        assert_close(grads[True][n], g.double(), torch.float32, "grad")


def test_training_runs_with_the_fused_head(tmp_path):
    tr = PPOTrainer(tiny_config(total_steps=1, sft_steps=0), tmp_path, echo=quiet)
    tr.train()
    assert torch.isfinite(torch.tensor(tr.metrics.history[-1]["loss"]))
