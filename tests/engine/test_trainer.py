"""A few PPO steps on a tiny model: outputs, variants, experience bookkeeping, torch vs fused backends."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fastppo
from fastppo import _dispatch
from fastppo import reference as ref
from fastppo.engine.experience import make_experience, score_rollout
from fastppo.engine.trainer import KLController, PPOTrainer
from tests.engine.tiny import quiet, tiny_config
from tests.tolerances import assert_close

STEP_KEYS = ("reward_mean", "reward_std", "kl", "entropy", "clipfrac", "approx_kl", "value_loss",
             "explained_variance", "grad_norm", "tokens_per_s", "time_generation", "time_experience", "time_update")


def test_a_few_ppo_steps_write_the_run_directory(tmp_path):
    cfg = tiny_config(total_steps=3, save_every=2, tensorboard=True, plot=True, num_samples=3)
    tr = PPOTrainer(cfg, tmp_path, echo=quiet)
    before = {k: v.clone() for k, v in tr.policy.state_dict().items()}
    seen = []  # on_step_end runs after each step, once that step's checkpoint (if due) is in place
    summary = tr.train(on_step_end=[lambda step: seen.append((step, (tmp_path / "checkpoints").is_dir()))])
    assert summary["steps"] == 3
    assert seen == [(1, False), (2, True), (3, True)]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for m in lines:
        for k in STEP_KEYS:
            assert k in m and math.isfinite(m[k]), k
    assert lines[0]["kl"] == 0.0  # the first rollout comes from the reference weights themselves
    assert any(m["kl"] != 0 for m in lines[1:])  # k1 per sample can have either sign
    after = tr.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"metrics.jsonl", "curves.png", "samples_before.txt", "samples_after.txt", "checkpoints", "final",
            "summary.json", "reference.safetensors", "tensorboard"} <= names
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step_000002", "step_000003"]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tmp_path / "samples_after.txt").read_text().splitlines()) == 1 + 3


@pytest.mark.parametrize(
    "overrides",
    [
        dict(critic="separate"),
        dict(kl_in_loss=True, kl_kind="k3", entropy_coef=0.01),
        dict(adaptive_kl=True, kl_target=0.01, kl_horizon=100, lr_schedule="cosine", warmup_steps=2),
        dict(gradient_checkpointing=True, loss_agg="seq-mean-token-mean", value_clip=None, dual_clip=3.0),
        dict(top_k=5, top_p=0.9, temperature=0.8, clip_range_high=0.28, missing_eos_penalty=0.5,
             whiten_advantages=False, kv_cache="static"),
        dict(advantage_estimator="grpo", samples_per_prompt=4, kl_in_loss=True),
        dict(advantage_estimator="rloo", samples_per_prompt=2),
        dict(advantage_estimator="reinforce_pp"),
        dict(advantage_estimator="grpo", samples_per_prompt=4, kl_in_loss=True, policy_loss="cispo", clip_range=1.0,
             clip_range_high=4.0, kl_kind="low_var_kl+"),
        dict(advantage_estimator="grpo", samples_per_prompt=4, policy_loss="sapo", importance_sampling_level="sequence",
             loss_agg="seq-mean-token-mean", kl_in_loss=True, kl_kind="k3", kl_ratio_weighted=True),
        dict(advantage_estimator="grpo", samples_per_prompt=2, importance_sampling_level="sequence_token",
             rollout_is_level="sequence", rollout_is_mode="mask", rollout_is_min=0.5, rollout_is_max=2.0,
             off_policy_mask_threshold=0.1, top_entropy_quantile=0.8),
        dict(rollout_is_level="token", rollout_is_max=1.5, fused_lm_head=False),
    ],
    ids=["separate-critic", "kl-in-loss-k3", "adaptive-kl-cosine", "grad-ckpt-seq-agg", "sampling-knobs", "grpo",
         "rloo", "reinforce-pp", "cispo-low-var-kl", "sapo-gspo-ratio-kl", "gspo-token-mis-masks", "tis-full-logits"],
)
def test_variants_train(tmp_path, overrides):
    cfg = tiny_config(total_steps=2, **overrides)
    tr = PPOTrainer(cfg, tmp_path, echo=quiet)
    if cfg.critic == "separate":
        assert tr.critic is not None
        critic_before = {k: v.clone() for k, v in tr.critic.state_dict().items()}
    tr.train()
    for m in tr.metrics.history:
        assert all(math.isfinite(m[k]) for k in STEP_KEYS)
    if cfg.adaptive_kl:
        assert tr.kl_ctl.value != cfg.kl_coef
    if cfg.critic == "separate":
        assert any(not torch.equal(critic_before[k], v) for k, v in tr.critic.state_dict().items())


def test_grpo_advantages_are_per_prompt_group(tmp_path):
    cfg = tiny_config(advantage_estimator="grpo", samples_per_prompt=4, kl_in_loss=True, sft_steps=0)
    tr = PPOTrainer(cfg, tmp_path, echo=quiet)
    torch.manual_seed(0)
    prompts = [p for p in tr.train_prompts[:2] for _ in range(4)]
    ro = tr._generate(prompts, greedy=False)
    scores = torch.arange(8, dtype=torch.float32)  # distinct scores: every group has spread
    e = make_experience(ro, scores, tr.policy, tr.ref_lm, tr.critic, cfg, 0.0)
    m = e.mask
    seq_adv = (e.advantages * m).sum(1) / m.sum(1)  # constant over a sequence's valid tokens
    torch.testing.assert_close(e.advantages, seq_adv[:, None] * m)
    for g in range(2):
        s = scores[4 * g: 4 * g + 4]
        torch.testing.assert_close(seq_adv[4 * g: 4 * g + 4], (s - s.mean()) / (s.std() + 1e-6))


def test_kl_controller():
    fixed = KLController(0.1, False, 1.0, 100)
    fixed.update(50.0, 10)
    assert fixed.value == 0.1
    ada = KLController(0.1, True, 1.0, 100)
    ada.update(50.0, 10)  # far above target: the error is clipped at +0.2
    assert ada.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    ada.update(0.5, 10)  # below target: shrinks
    assert ada.value < 0.1 * (1 + 0.2 * 10 / 100)


def _experience(tr: PPOTrainer, kl_coef: float = 0.1):
    torch.manual_seed(3)
    prompts = tr.train_prompts[: tr.cfg.batch_size]
    ro = tr._generate(prompts, greedy=False)
    scores, _, _ = score_rollout(ro, tr.tokenizer, tr.reward_fn, tr.cfg)
    return make_experience(ro, scores, tr.policy, tr.ref_lm, tr.critic, tr.cfg, kl_coef)


def test_experience_rewards_and_advantages(tmp_path):
    tr = PPOTrainer(tiny_config(sft_steps=0, whiten_advantages=False, gamma=0.9, lam=0.8), tmp_path, echo=quiet)
    with torch.no_grad():  # move the policy away from the reference so the KL term is not zero
        for p in tr.policy.lm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    e = _experience(tr, kl_coef=0.1)
    m = e.mask
    lengths = m.sum(1).long()
    kl = (e.old_logprobs - e.ref_logprobs) * m  # k1
    assert kl.abs().sum() > 0
    want = -0.1 * kl
    want[torch.arange(len(lengths)), lengths - 1] += e.scores
    torch.testing.assert_close(e.rewards, want)
    adv, ret = ref.gae(e.rewards.double(), e.values.double(), m, gamma=0.9, lam=0.8)
    torch.testing.assert_close(e.advantages.double(), adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e.returns.double(), ret, atol=1e-5, rtol=1e-5)
    # old logprobs are the policy's own: recompute with the plain reference op on a fresh forward
    logits, _ = tr.policy(e.input_ids, e.attention_mask, e.position_ids)
    p = e.prompt_width
    lp = ref.token_logprobs(logits[:, p - 1: -1].double(), e.labels) * m
    torch.testing.assert_close(e.old_logprobs.double(), lp, atol=1e-5, rtol=1e-5)


def test_reward_model_scorer(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from fastppo.engine.task import make_tokenizer

    tok = make_tokenizer()
    conf = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    rm_dir = tmp_path / "rm"
    LlamaForSequenceClassification(conf).save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    tr = PPOTrainer(tiny_config(total_steps=1, reward="model", reward_model=str(rm_dir)), tmp_path / "run",
                    echo=quiet)
    scores = tr.reward_fn(["1 2 =", "3 ="], ["2 1", "3"])
    assert len(scores) == 2 and scores[0] != scores[1]
    tr.train()
    assert math.isfinite(tr.metrics.history[-1]["reward_mean"])


def _fused_backends() -> list[str]:
    return ["cpp", "triton"]


@pytest.mark.parametrize("backend", _fused_backends())
def test_torch_and_fused_backend_agree_on_one_update(tmp_path, backend):
    info = fastppo.backends()[backend]
    if not info.available:
        pytest.skip(f"backend {backend!r} unavailable here: {info.reason}")
    for fam in ("logprobs", "ppo_loss", "gae"):
        if not _dispatch.implements(backend, fam):
            pytest.skip(f"backend {backend!r} does not implement the {fam!r} kernels in this build")
    # kl_in_loss + entropy bonus exercise every term of the fused loss; dual clip too
    cfg = tiny_config(sft_steps=3, kl_in_loss=True, kl_kind="k3", kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0,
                      backend="torch")
    tr = PPOTrainer(cfg, tmp_path, echo=quiet)
    with torch.no_grad():
        for p in tr.policy.lm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    exps, losses, grads = {}, {}, {}
    for name in ("torch", backend):
        tr.cfg.backend = name
        exps[name] = _experience(tr)
    # step the policy away from the rollout policy so ratios != 1 and some tokens get clipped
    torch.manual_seed(4)
    with torch.no_grad():
        for p in tr.policy.lm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    for name in ("torch", backend):
        tr.cfg.backend = name
        tr.policy.zero_grad(set_to_none=True)
        loss, stats = tr.micro_loss(exps["torch"])
        loss.backward()
        assert stats["clipfrac"] > 0
        losses[name] = loss.detach()
        grads[name] = {n: p.grad.clone() for n, p in tr.policy.named_parameters() if p.grad is not None}
    a, b = exps["torch"], exps[backend]
    # the same seeded rollout for both
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    for field in ("old_logprobs", "ref_logprobs", "entropy", "advantages", "returns"):
        assert_close(getattr(b, field), getattr(a, field), torch.float32)
    assert_close(losses[backend], losses["torch"], torch.float32)
    assert grads["torch"].keys() == grads[backend].keys() and grads["torch"]
    for n, g in grads["torch"].items():
        assert_close(grads[backend][n], g, torch.float32, "grad")


def _has_peft() -> bool:
    import importlib.util

    return importlib.util.find_spec("peft") is not None


@pytest.mark.skipif(not _has_peft(), reason="peft is not installed (LoRA support needs it)")
def test_lora_policy_reference_is_the_base_and_resume_is_exact(tmp_path):
    cfg = tiny_config(total_steps=3, lora_r=4, lr=1e-2, save_every=1, keep_checkpoints=5)
    tr = PPOTrainer(cfg, tmp_path / "a", echo=quiet)
    assert type(tr.policy.lm).__name__.startswith("PeftModel")
    before = {k: v.clone() for k, v in tr.policy.state_dict().items()}
    tr.train()
    after = tr.policy.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k or k.startswith("v_head") for k in changed)  # base weights stay frozen
    kls = [m["kl"] for m in tr.metrics.history]
    assert kls[0] == 0.0 and any(k != 0 for k in kls[1:])  # reference = adapter off
    # resume from step 2 in a copy of the run: step 3 must come out identical
    import shutil

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_000003")
    tb = PPOTrainer(cfg, tmp_path / "b", resume=True, echo=quiet)
    assert tb.step == 2
    tb.train()
    for k, v in tr.policy.state_dict().items():
        assert torch.equal(v, tb.policy.state_dict()[k]), k
    strip = lambda h: [{k: v for k, v in m.items() if not k.startswith("time") and k != "tokens_per_s"} for m in h]
    assert strip(tr.metrics.history) == strip(tb.metrics.history)


def test_hf_model_path_prompts_file_and_bf16(tmp_path):
    from fastppo.engine.models import build_causal_lm
    from fastppo.engine.task import make_tokenizer

    # a local Hugging Face checkpoint (model + tokenizer) and a jsonl prompts file, as a user would bring them
    tok = make_tokenizer()
    torch.manual_seed(0)
    build_causal_lm(tiny_config(), tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["1 2 =", "3 4 5 =", "6 =", "7 8 9 0 ="]))
    cfg = tiny_config(model=str(tmp_path / "model"), task="prompts_file", prompts_file=str(prompts), total_steps=2,
                      dtype="bfloat16")
    tr = PPOTrainer(cfg, tmp_path / "run", echo=quiet)
    assert next(tr.policy.lm.parameters()).dtype == torch.bfloat16
    tr.train()
    assert all(math.isfinite(m["loss"]) for m in tr.metrics.history)
    assert (tmp_path / "run" / "samples_after.txt").read_text().count("->") == 2


@pytest.mark.parametrize("support", [{}, {"top_k": 5, "top_p": 0.9}], ids=["full", "top-k-top-p"])
def test_recorded_sampler_logprobs_are_the_policys_and_reach_the_loss(tmp_path, support):
    """With rollout correction on, generation records each token's log-prob from the decode step's logits; the same
    weights recompute them (full forward, no KV cache) in the experience pass, so they agree to float32 rounding, and
    the loss reports the correction's statistics. With top-k / top-p sampling both are over the truncated support the
    tokens were drawn from (a full-softmax log-prob would differ by the log of the kept mass)."""
    cfg = tiny_config(total_steps=1, rollout_is_level="token", rollout_is_max=2.0, sft_steps=0, **support)
    tr = PPOTrainer(cfg, tmp_path, echo=quiet)
    torch.manual_seed(0)
    ro = tr._generate(tr.train_prompts[:8], greedy=False)
    assert ro.logprobs is not None and ro.logprobs.shape == ro.response_ids.shape
    e = make_experience(ro, torch.zeros(8), tr.policy, tr.ref_lm, tr.critic, cfg, 0.0)
    m = e.mask
    assert torch.all(e.rollout_logprobs[m == 0] == 0)
    torch.testing.assert_close(e.rollout_logprobs * m, e.old_logprobs * m, atol=1e-4, rtol=1e-4)
    _, stats = tr.micro_loss(e)
    assert {"rollout_is_mean", "rollout_is_ess", "rollout_logp_diff_max"} <= set(stats)
    assert float(stats["rollout_logp_diff_max"]) < 1e-4
    if support:  # the truncated log-probs are not the full-softmax ones
        full = make_experience(ro, torch.zeros(8), tr.policy, tr.ref_lm, tr.critic, tiny_config(sft_steps=0), 0.0)
        assert float(((full.old_logprobs - e.old_logprobs) * m).abs().max()) > 1e-3
