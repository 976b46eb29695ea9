"""Turning rollouts into PPO experience: old / reference logprobs and values (one forward each, through the fused
ops), scores, per-token rewards with the KL penalty, advantages (GAE, or GRPO / RLOO when fastppo has them).

Shapes: ``B`` sequences, ``P`` prompt width (left-padded), ``R`` response width, ``L = P + R``.
The logits that predict response token ``t`` sit at sequence position ``P - 1 + t``, hence the ``[P-1 : L-1]``
slices below; values are read at the same positions (the state before the token is chosen).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

import fastppo
from fastppo.engine.config import PPOConfig
from fastppo.engine.lm_head import forward_keep, last_hidden, lm_head_of
from fastppo.engine.models import position_ids_from_mask
from fastppo.engine.rollout import Rollout


@dataclass
class Experience:
    input_ids: Tensor  # [B, L]
    attention_mask: Tensor  # [B, L]
    position_ids: Tensor  # [B, L]
    labels: Tensor  # [B, R] response tokens
    mask: Tensor  # [B, R] float32, 1 = valid response token
    old_logprobs: Tensor  # [B, R]
    ref_logprobs: Tensor  # [B, R]
    values: Tensor  # [B, R]
    rewards: Tensor  # [B, R] per-token reward (score on the last valid token, minus the KL penalty if in reward)
    advantages: Tensor  # [B, R]
    returns: Tensor  # [B, R]
    scores: Tensor  # [B]
    kl: Tensor  # [B, R] per-token KL estimate (kl_kind) of policy vs reference
    entropy: Tensor  # [B, R]
    prompt_width: int
    rollout_logprobs: Tensor | None = None  # [B, R] the sampler's log-probs (recorded for rollout correction)

    def select(self, idx: Tensor) -> Experience:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[idx] if isinstance(v, Tensor) else v
        return Experience(**out)


def response_slice(t: Tensor, prompt_width: int) -> Tensor:
    """Positions predicting the response tokens: ``[B, L, ...] -> [B, R, ...]`` (a view)."""
    return t[:, prompt_width - 1: t.shape[1] - 1]


# ----------------------------------------------------------------------------- the experience pass's forwards
def _on_valid_rows(fn, hid: Tensor, labels: Tensor, mask: Tensor | None) -> tuple[Tensor, ...]:
    """``fn(hidden [M, H], labels [M], mask [M] | None) -> tuple of [M]`` over the valid (``mask``) response tokens
    only, scattered back to ``[B, R]`` with zeros at the others: padding after EOS costs no LM-head matmul (where the
    fused LM head skips it too: ``autograd_linear.valid_rows_on_cpu``); otherwise over every token, with the mask."""
    from fastppo.autograd_linear import valid_rows_on_cpu

    keep = None if mask is None else valid_rows_on_cpu(mask)
    if keep is None:
        return fn(hid, labels, mask)
    outs = fn(hid.reshape(-1, hid.shape[-1]).index_select(0, keep), labels.reshape(-1).index_select(0, keep), None)
    full = []
    for o in outs:
        t = o.new_zeros(labels.numel())
        t[keep] = o
        full.append(t.view(labels.shape))
    return tuple(full)


def policy_logprobs_entropy(policy: torch.nn.Module, ids: Tensor, attn: Tensor, pos: Tensor, labels: Tensor, p: int,
                            cfg: PPOConfig, values: bool = True, mask: Tensor | None = None
                            ) -> tuple[Tensor, Tensor, Tensor | None]:
    """One policy (``ValueModel``) forward: ``(logprobs [B, R], entropy [B, R], values [B, L] or None)``; with the
    response ``mask [B, R]``, 0 at masked tokens. With ``top_k`` / ``top_p`` sampling, over the sampler's truncated
    support (the distribution the tokens were drawn from)."""
    head = lm_head_of(policy.lm) if cfg.fused_lm_head else None
    if head is None:  # logits of the response positions only (the LM head skips the prompt)
        logits, vals = policy(ids, attn, pos, keep=labels.shape[1] + 1, values=values)
        lp, ent = fastppo.logprobs_and_entropy(logits[:, :-1], labels, temperature=cfg.temperature, top_k=cfg.top_k,
                                               top_p=cfg.top_p, mask=mask, backend=cfg.backend)
    else:
        hid, vals = policy(ids, attn, pos, hidden_only=True, values=values)
        lp, ent = _on_valid_rows(
            lambda h, lab, m: fastppo.linear_logprobs_and_entropy(h, head.weight, lab, bias=head.bias,
                                                                  temperature=cfg.temperature, top_k=cfg.top_k,
                                                                  top_p=cfg.top_p, mask=m, backend=cfg.backend),
            response_slice(hid, p), labels, mask)
    return lp, ent, vals


def reference_logprobs(ref_lm: torch.nn.Module, ids: Tensor, attn: Tensor, pos: Tensor, labels: Tensor, p: int,
                       cfg: PPOConfig, mask: Tensor | None = None) -> Tensor:
    """The reference model's logprobs of the response ``[B, R]`` (one forward; with ``mask``, 0 at masked tokens).
    Over the whole vocabulary even with ``top_k`` / ``top_p`` sampling: a token drawn from the policy's truncated
    support may lie outside the reference's own (as NeMo-RL, the KL uses the reference's full distribution)."""
    kw = dict(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False)
    head = lm_head_of(ref_lm) if cfg.fused_lm_head else None
    if head is None:
        logits = forward_keep(ref_lm, labels.shape[1] + 1, **kw).logits
        return fastppo.token_logprobs(logits[:, :-1], labels, temperature=cfg.temperature, backend=cfg.backend)
    hid = last_hidden(ref_lm, **kw)
    return _on_valid_rows(
        lambda h, lab, m: (fastppo.linear_logprobs(h, head.weight, lab, bias=head.bias, temperature=cfg.temperature,
                                                   backend=cfg.backend),),
        response_slice(hid, p), labels, mask)[0]


@torch.no_grad()
def score_rollout(rollout: Rollout, tokenizer, reward_fn, cfg: PPOConfig) -> tuple[Tensor, list[str], list[str]]:
    """Decode prompts/responses and score them. Returns ``(scores [B] float32, prompts, responses)``."""
    prompts = tokenizer.batch_decode(rollout.prompt_ids.cpu().tolist(), skip_special_tokens=True)
    resp_ids = rollout.response_ids.cpu()
    resp_mask = rollout.response_mask.cpu().bool()
    responses = [tokenizer.decode(ids[m].tolist(), skip_special_tokens=True)
                 for ids, m in zip(resp_ids, resp_mask, strict=True)]
    scores = torch.tensor(reward_fn(prompts, responses), dtype=torch.float32)
    if scores.shape != (len(prompts),):
        raise ValueError(f"the reward returned {tuple(scores.shape)} scores for {len(prompts)} responses")
    if not torch.isfinite(scores).all():
        raise ValueError("the reward returned NaN/Inf scores")
    if cfg.missing_eos_penalty:
        lengths = resp_mask.sum(1)
        last = resp_ids.gather(1, (lengths - 1).clamp_min(0)[:, None]).squeeze(1)
        scores = scores - cfg.missing_eos_penalty * (last != tokenizer.eos_token_id).float()
    return scores.to(rollout.prompt_ids.device), prompts, responses


def update_is_on_policy(cfg: PPOConfig) -> bool:
    """Whether the update's own forward can supply the old log-probs: one epoch of one minibatch (the policy is
    still the one that generated when it runs), the KL not in the reward (the advantages must not need the old
    log-probs before the update), and the values not read from the policy's forward (critic-free, or a separate
    critic). Then the experience pass skips the policy forward, as TRL's GRPO does for one iteration."""
    one_pass = cfg.ppo_epochs == 1 and cfg.mini_batch_size == cfg.batch_size
    return one_pass and (cfg.kl_in_loss or cfg.kl_coef == 0.0) and (
        cfg.advantage_estimator != "gae" or cfg.critic == "separate")


@torch.no_grad()
def make_experience(
    rollout: Rollout,
    scores: Tensor,
    policy: torch.nn.Module,
    ref_lm: torch.nn.Module,
    critic: torch.nn.Module | None,
    cfg: PPOConfig,
    kl_coef: float,
    gather: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
    *,
    old_from_update: bool = False,
) -> Experience:
    """No-grad forwards through policy (+ value head), reference and (separate) critic, each computing logits at
    the response positions only. Critic-free estimators run no value head.

    ``gather`` (multi-process runs): turns this rank's rows into the global batch's (concatenated in rank order)
    after the forwards, so rewards, advantages and their whitening are computed over the whole batch.
    ``old_from_update`` (see ``update_is_on_policy``): no policy forward; ``old_logprobs`` / ``entropy`` / ``kl``
    are NaN until the update fills them from its own forward (``fill_from_update``).
    """
    ids, attn = rollout.input_ids, rollout.attention_mask
    pos = position_ids_from_mask(attn)
    labels, mask = rollout.response_ids, rollout.response_mask.float()
    p = rollout.prompt_ids.shape[1]
    need_values = cfg.advantage_estimator == "gae"
    old_lp, ent, ref_lp, values = [], [], [], []
    fb = cfg.forward_batch_size
    for s in range(0, ids.shape[0], fb):
        sl = slice(s, s + fb)
        vals = None
        if not old_from_update:
            # config fused_lm_head: from the last hidden states and the lm_head weight, no [B, R, V] logits
            lp, h, vals = policy_logprobs_entropy(policy, ids[sl], attn[sl], pos[sl], labels[sl], p, cfg,
                                                  values=need_values and critic is None, mask=mask[sl])
            old_lp.append(lp)
            ent.append(h)
        ref_lp.append(reference_logprobs(ref_lm, ids[sl], attn[sl], pos[sl], labels[sl], p, cfg, mask=mask[sl]))
        if need_values:
            if critic is not None:
                _, vals = critic(ids[sl], attn[sl], pos[sl], keep=1)
            values.append(response_slice(vals, p))
    if old_from_update:  # NaN, not zeros: a statistic read before the update fills them cannot pass unnoticed
        old_lp = ent = [torch.full_like(labels, float("nan"), dtype=torch.float32)]
    if not need_values:
        values = [torch.zeros_like(labels, dtype=torch.float32)]
    old_logprobs = torch.cat(old_lp) * mask
    ref_logprobs = torch.cat(ref_lp) * mask
    entropy = torch.cat(ent) * mask
    values_t = torch.cat(values).float() * mask
    rollout_lp = None if rollout.logprobs is None else rollout.logprobs.float() * mask
    if gather is not None:
        rows = {"ids": ids, "attn": attn, "pos": pos, "labels": labels, "mask": mask, "old": old_logprobs,
                "ref": ref_logprobs, "entropy": entropy, "values": values_t, "scores": scores}
        if rollout_lp is not None:
            rows["rollout"] = rollout_lp
        g = gather(rows)
        ids, attn, pos, labels, mask = g["ids"], g["attn"], g["pos"], g["labels"], g["mask"]
        old_logprobs, ref_logprobs, entropy, values_t, scores = g["old"], g["ref"], g["entropy"], g["values"], \
            g["scores"]
        rollout_lp = g.get("rollout")

    kl = fastppo.kl_penalty(old_logprobs, ref_logprobs, cfg.kl_kind) * mask
    rewards = torch.zeros_like(ref_logprobs)
    if not cfg.kl_in_loss and not old_from_update:  # (old_from_update implies kl_coef == 0 here)
        rewards = rewards - kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp_min(0)  # responses are contiguous: the last valid token
    rewards = rewards.scatter_add(1, last[:, None], scores[:, None].float())

    if cfg.advantage_estimator == "gae":
        # whitening happens inside the scan's launcher on kernel backends (one pass, no extra kernel)
        adv, returns = fastppo.gae(rewards, values_t, mask, gamma=cfg.gamma, lam=cfg.lam,
                                   whiten_advantages=cfg.whiten_advantages, backend=cfg.backend)
    else:
        adv, returns = critic_free_advantages(rewards, mask, cfg)
    return Experience(ids, attn, pos, labels, mask, old_logprobs, ref_logprobs, values_t, rewards, adv, returns,
                      scores, kl, entropy, p, rollout_lp)


def critic_free_advantages(rewards: Tensor, mask: Tensor, cfg: PPOConfig) -> tuple[Tensor, Tensor]:
    """GRPO / RLOO (each sequence's total reward against its group of ``samples_per_prompt``; rows of one prompt
    are adjacent) or REINFORCE++ (whitened discounted returns). ``[B, T] -> ([B, T], [B, T])``."""
    est = cfg.advantage_estimator
    if est == "reinforce_pp":
        return fastppo.reinforce_pp_advantages(rewards, mask, gamma=cfg.gamma, whiten=cfg.whiten_advantages,
                                               backend=cfg.backend)
    seq_reward = (rewards * mask).sum(1)
    group = torch.arange(seq_reward.shape[0], device=rewards.device) // cfg.samples_per_prompt
    if est == "grpo":  # already normalised per group: no batch whitening on top
        adv = fastppo.grpo_advantages(seq_reward, group, mask, backend=cfg.backend)
    else:
        adv = fastppo.rloo_advantages(seq_reward, group, mask, backend=cfg.backend)
        if cfg.whiten_advantages:
            adv = fastppo.masked_whiten(adv, mask) * mask
    return adv, adv


def fill_from_update(exp: Experience, logprobs: Tensor, entropy: Tensor, cfg: PPOConfig) -> None:
    """Store the update forward's (detached) ``logprobs`` / ``entropy`` ``[B, R]`` as the old log-probs of an
    on-policy experience, and the KL to the reference they give (in place)."""
    exp.old_logprobs = logprobs * exp.mask
    exp.entropy = entropy * exp.mask
    exp.kl = fastppo.kl_penalty(exp.old_logprobs, exp.ref_logprobs, cfg.kl_kind) * exp.mask
