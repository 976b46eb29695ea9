"""fastppo's public ops: validate inputs, pick a backend, document shapes.

Every op takes any leading shape ``[...]`` (``[B, T]`` for GAE and the ``seq-*`` aggregations) and a
``backend=`` keyword: ``"auto"`` (default; or the ``FASTPPO_BACKEND`` variable), ``"torch"``, ``"triton"``,
``"cpp"`` or ``"cuda"``. Ops over vocabulary-sized logits and GAE run on kernels; the elementwise ops over
``[N]`` vectors (KL, policy/value losses, masked statistics) run in PyTorch on every backend, since a kernel
buys nothing there; naming an unavailable backend still raises.

Logprob-like outputs are float32 (float64 for float64 inputs, which always take the reference path).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastppo import _dispatch
from fastppo import _validate as validate
from fastppo import reference as ref
from fastppo._contract import DTYPES, TERM, kernel_epilogue_supports
from fastppo.autograd import direct_call_ok, gae_launch
from fastppo.objective import AGG_MODES, KL_CHOICES, PPOObjective, objective_from
from fastppo.reference import advantages as ref_adv
from fastppo.reference.losses import objective_agg, policy_stats

__all__ = [
    "gae",
    "grpo_advantages",
    "kl_penalty",
    "logprobs_and_entropy",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "ppo_loss_from_logits",
    "ppo_policy_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "sample_tokens",
    "token_entropy",
    "token_logprobs",
    "value_loss",
]

_KERNEL_DTYPES = DTYPES


def _backend_for(backend: str | None, t: Tensor, family: str | None) -> str:
    name = _dispatch.resolve(backend, t.device, family)
    if name != "torch" and t.dtype not in _KERNEL_DTYPES:
        if _dispatch.requested_backend(backend) == "auto":
            return "torch"  # float64 (tests, debugging) always takes the exact reference path
        raise TypeError(f"backend {name!r} takes fp32/bf16/fp16 logits, got {t.dtype}; use backend='torch'")
    return name


def _as_3d(logits: Tensor) -> Tensor:
    """View ``[..., V]`` as ``[B, T, V]`` with stride 1 on V, copying only when no such view exists."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()  # explicit copy: kernels need unit stride along the vocabulary
    if logits.dim() == 1:
        return logits.view(1, 1, -1)
    if logits.dim() == 2:
        return logits.unsqueeze(0)
    if logits.dim() == 3:
        return logits
    return logits.reshape(-1, logits.shape[-2], logits.shape[-1])


def _scaled_row_max(logits: Tensor, temperature: float) -> Tensor:
    """``max(logits / T)`` per row in the reference's compute dtype ``[...]``."""
    m = logits.detach().amax(-1)
    return m.to(torch.promote_types(m.dtype, torch.float32)) / temperature


_half_to_float = validate.half_to_float


# ------------------------------------------------------------------------------------ logprobs / entropy
def _kernel_logprobs(
    logits: Tensor, labels: Tensor | None, temperature: float, with_entropy: bool, backend: str, inplace: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Kernel path: ``(logp [...], entropy [...] or empty, lse [N])``."""
    lead = logits.shape[:-1]
    x3 = _as_3d(logits)
    if labels is None:
        lab = torch.zeros(lead.numel(), dtype=torch.int64, device=logits.device)
    else:
        lab = labels.reshape(-1).to(torch.int64).contiguous()
    logp, ent, lse = torch.ops.fastppo.logprobs(x3, lab, temperature, with_entropy, backend, inplace)
    return logp.view(lead), (ent.view(lead) if with_entropy else ent), lse


def _truncate(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """``logits`` with the tokens outside the sampler's top-k / top-p support set to ``-inf`` (a copy; the gradient
    reaches the kept logits only). The support is decided on ``logits / temperature`` in the compute dtype, as the
    reference and the sampler decide it."""
    z = logits.detach().to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    keep = z >= ref.sampling.support_threshold(z, top_k, top_p).unsqueeze(-1)
    return logits.masked_fill(~keep, float("-inf"))


def _in_support(op: str, logp: Tensor, valid: Tensor | None = None) -> None:
    """A label outside the truncated support has log-prob -inf: an error, never a silent -inf (a sampled token is
    always inside; a label that is not has not been drawn with these top_k / top_p)."""
    bad = torch.isneginf(logp.detach())
    if valid is not None:
        bad = bad & (valid != 0)
    validate.check_value(~bad.any(), f"{op}: a label lies outside the top_k/top_p support (its log-prob is -inf); "
                                     "the labels must have been sampled with the same temperature, top_k and top_p")


def _logprobs_entropy(
    logits: object,
    labels: object | None,
    temperature: float,
    backend: str | None,
    inplace_backward: bool,
    want_logp: bool,
    want_entropy: bool,
    top_k: int = 0,
    top_p: float = 1.0,
    op: str = "logprobs",
    mask: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    logits, labels = validate.logits_and_labels(logits, labels)
    if mask is not None:
        mask = validate.mask_tensor("mask", mask, logits.shape[:-1])
    temperature = validate.temperature(temperature)
    top_k, top_p = validate.support(top_k, top_p)
    truncated = top_k > 0 or top_p < 1.0
    if inplace_backward:
        if truncated:
            raise ValueError("inplace_backward=True cannot be combined with top_k/top_p: the truncated logits are a "
                             "copy, so writing dlogits into it saves nothing")
        validate.no_overlap("logits", logits)
    name = _backend_for(backend, logits, "logprobs")
    if logits.numel() == 0:
        name = "torch"  # nothing to launch; the reference returns correctly shaped empty tensors
    if name == "torch":
        if logits.numel() > 0:
            # One cheap reduction: NaN/+inf logits and all -inf rows make the row max non-finite (and so does
            # a max / temperature beyond float32, which the kernels meet as a non-finite lse).
            validate.finite_rows(op, _scaled_row_max(logits, temperature), temperature=temperature)
        kw = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        logp = ref.token_logprobs(logits, labels, **kw) if want_logp else None
        ent = ref.token_entropy(logits, **kw) if want_entropy else None
        if truncated and logp is not None and logp.numel() > 0:
            _in_support(op, logp, mask)
        return _masked(logp, mask), _masked(ent, mask)
    if truncated:
        validate.finite_rows(op, _scaled_row_max(logits, temperature), temperature=temperature)
        logits = _truncate(logits, temperature, top_k, top_p)
    logp, ent, lse = _kernel_logprobs(logits, labels, temperature, want_entropy, name, inplace_backward)
    validate.finite_rows(op, lse.detach(), temperature=temperature)
    if truncated and want_logp:
        _in_support(op, logp, mask)
    return _masked(logp if want_logp else None, mask), _masked(ent if want_entropy else None, mask)


def _masked(t: Tensor | None, mask: Tensor | None) -> Tensor | None:
    """``t`` with 0 where ``mask`` is 0 (a truncated-support log-prob there may be -inf)."""
    if t is None or mask is None:
        return t
    return torch.where(mask != 0, t, torch.zeros_like(t))


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    mask: Tensor | None = None,
    backend: str | None = None,
    inplace_backward: bool = False,
) -> Tensor:
    """Log-probability of ``labels`` under ``softmax(logits / temperature)``.

    ``logits [..., V]`` (fp32/bf16/fp16, any strides), ``labels [...]`` integer in ``[0, V)`` -> ``[...]`` fp32.
    ``top_k`` / ``top_p``: the log-prob under the truncated distribution ``sample_tokens`` draws from (renormalised
    over the same support, same tie rule); a label outside it is an error, except where ``mask [...]`` is 0 (padding:
    those positions give 0). ``inplace_backward=True`` (kernel backends) writes dlogits into ``logits``' buffer
    during backward: do not read ``logits`` after calling backward.
    """
    return _logprobs_entropy(logits, labels, temperature, backend, inplace_backward, True, False, top_k, top_p,
                             "token_logprobs", mask)[0]


def token_entropy(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    backend: str | None = None,
    inplace_backward: bool = False,
) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` per row (of the truncated distribution with ``top_k`` /
    ``top_p``). ``[..., V] -> [...]`` fp32."""
    return _logprobs_entropy(logits, None, temperature, backend, inplace_backward, False, True, top_k, top_p,
                             "token_entropy")[1]


def logprobs_and_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    mask: Tensor | None = None,
    backend: str | None = None,
    inplace_backward: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(token_logprobs, token_entropy)`` from one pass over the logits (``mask``: as ``token_logprobs``).
    ``[..., V], [...] -> ([...], [...])``."""
    return _logprobs_entropy(logits, labels, temperature, backend, inplace_backward, True, True, top_k, top_p,
                             "logprobs_and_entropy", mask)


# ------------------------------------------------------------------------------------------------ KL, stats
def kl_penalty(
    logprob: Tensor,
    ref_logprob: Tensor,
    kind: str = "k1",
    *,
    clamp: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """Per-token KL estimate between policy and reference log-probs. ``[...], [...] -> [...]``.

    kinds: ``k1 = lp - ref``, ``k2 = 0.5*(lp - ref)^2``, ``k3 = exp(ref - lp) - (ref - lp) - 1``,
    ``abs = |lp - ref|``, ``low_var_kl`` (verl's k3: input clamped to +-20, value to +-10), and each with ``+`` (its
    value, the gradient of k2); ``clamp`` clips the result to ``[-clamp, clamp]``.
    """
    validate.float_tensor("logprob", logprob)
    validate.float_tensor("ref_logprob", ref_logprob)
    validate.same_shape("logprob", logprob, ref_logprob=ref_logprob)
    validate.same_device(logprob=logprob, ref_logprob=ref_logprob)
    if kind not in KL_CHOICES:
        raise ValueError(f"unknown KL kind {kind!r}; choose from {KL_CHOICES}")
    if clamp is not None and not float(clamp) > 0.0:
        # clamp(-c, c) with c <= 0 would silently return a constant (or NaN): refuse it
        raise ValueError(f"clamp must be a positive number or None, got {clamp}")
    _dispatch.resolve(backend, logprob.device, None)
    return ref.kl_penalty(_half_to_float(logprob), _half_to_float(ref_logprob), kind, clamp=clamp)


def _masked_input(x: object, mask: object, name: str = "x") -> tuple[Tensor, Tensor]:
    x = validate.float_tensor(name, x)
    mask = validate.mask_tensor("mask", mask, x.shape)
    validate.same_device(**{name: x, "mask": mask})
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: a masked statistic of no elements is undefined")
    return _half_to_float(x), mask


def masked_mean(
    x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None, *, backend: str | None = None
) -> Tensor:
    """Mean of ``x`` over valid (mask != 0) elements, over ``dim`` or all. All-masked input raises."""
    x, mask = _masked_input(x, mask)
    _dispatch.resolve(backend, x.device, None)
    validate.check_value(mask.bool().any(), "masked_mean: the mask has no valid element (all-masked batch)")
    return ref.masked_mean(x, mask, dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True, *, backend: str | None = None) -> Tensor:
    """Variance over valid elements (Bessel-corrected when ``unbiased``; needs >= 2 valid elements)."""
    x, mask = _masked_input(x, mask)
    _dispatch.resolve(backend, x.device, None)
    need = 2 if unbiased else 1
    validate.check_value(
        mask.bool().sum() >= need,
        f"masked_var: needs at least {need} valid element(s) (unbiased={unbiased}); the mask has fewer",
    )
    return ref.masked_var(x, mask, unbiased=unbiased)


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, *, eps: float = 1e-8, backend: str | None = None
) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over valid elements (unbiased var); mean added back if not shift_mean."""
    x, mask = _masked_input(x, mask)
    if validate.number("eps", eps) < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    _dispatch.resolve(backend, x.device, None)
    validate.check_value(mask.bool().sum() >= 2, "masked_whiten: needs at least 2 valid elements")
    return ref.masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)


# ------------------------------------------------------------------------------------------------------ GAE
def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    bootstrap_value: Tensor | None = None,
    whiten_advantages: bool = False,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation. ``rewards, values, mask [B, T]``, ``bootstrap_value [B]`` ->
    ``(advantages [B, T], returns [B, T])`` float32 (float64 for float64 inputs).

    The recursion runs over valid tokens only: masked positions inside a sequence are skipped (carry-forward,
    identical to the classic recursion for contiguous masks); the value after the last valid token is 0, or
    ``bootstrap_value[b]`` for truncated sequences; outputs are 0 where mask is 0.
    ``whiten_advantages=True`` whitens the advantages over all valid tokens (unbiased variance, as
    ``masked_whiten``) after the scan; returns are computed from the raw advantages.
    """
    validate.float_tensor("rewards", rewards)
    validate.float_tensor("values", values)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, T], got shape {tuple(rewards.shape)}")
    validate.same_shape("rewards", rewards, values=values)
    mask = validate.mask_tensor("mask", mask, rewards.shape)
    if bootstrap_value is not None:
        validate.float_tensor("bootstrap_value", bootstrap_value)
        if bootstrap_value.shape != rewards.shape[:1]:
            raise ValueError(f"bootstrap_value must be [B] = [{rewards.shape[0]}], got {tuple(bootstrap_value.shape)}")
    validate.same_device(rewards=rewards, values=values, mask=mask, bootstrap_value=bootstrap_value)
    for name, val in (("gamma", gamma), ("lam", lam)):
        if not 0.0 <= validate.number(name, val) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {val}")
    name = _backend_for(backend, rewards, "gae")
    if rewards.numel() == 0:
        name = "torch"
    if whiten_advantages:
        validate.check_value(mask.bool().sum() >= 2, "gae(whiten_advantages=True) needs at least 2 valid tokens")
    if name == "torch":
        adv, ret = ref.gae(rewards, values, mask, gamma=gamma, lam=lam, bootstrap_value=bootstrap_value)
    else:
        # scan + moments + normalise fused (two-phase) in the backend when it has that launcher
        fused_whiten = whiten_advantages and _dispatch.implements(name, "gae_whiten")
        r, v, m = rewards.float().contiguous(), values.float().contiguous(), mask.bool().contiguous()
        boot = None if bootstrap_value is None else bootstrap_value.float().contiguous()
        if direct_call_ok(rewards, values, mask, bootstrap_value):  # eager: skip the custom op's dispatch
            adv, ret = gae_launch(r, v, m, boot, float(gamma), float(lam), fused_whiten, name)
        else:
            boot = r.new_empty((0,)) if boot is None else boot  # the op's "absent" bootstrap
            adv, ret = torch.ops.fastppo.gae(r, v, m, boot, float(gamma), float(lam), fused_whiten, name)
        if fused_whiten:
            return adv, ret
    if whiten_advantages:
        adv = ref.masked_whiten(adv, mask) * mask.to(adv.dtype)
    return adv, ret


# --------------------------------------------------------------------------------------------------- losses
def _check_agg(agg: str, shape: torch.Size) -> None:
    if agg not in AGG_MODES:
        raise ValueError(f"unknown agg {agg!r}; choose from {AGG_MODES}")
    validate.aggregation(agg, shape)


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    backend: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped PPO surrogate from per-token log-probs ``[B, T]`` (any shape for token-mean).

    ``clip_high`` defaults to ``clip_low`` (asymmetric "clip-higher" when set); ``dual_clip = c > 1`` caps the
    loss of negative-advantage tokens at ``-A*c``. Returns ``(loss, stats)`` with detached stats
    ``pg_loss, clipfrac, dual_clipfrac, approx_kl (k3 of old vs new), ratio_mean, ratio_max``.
    """
    (lp, old, adv), mask = validate.loss_inputs(("logprobs", "old_logprobs", "advantages"),
                                                (logprobs, old_logprobs, advantages), mask)
    validate.finite_where_valid("old_logprobs", old, mask)
    validate.finite_where_valid("advantages", adv, mask)
    _check_agg(agg, lp.shape)
    validate.clips(clip_low, clip_high, dual_clip)
    _dispatch.resolve(backend, lp.device, None)
    return ref.ppo_policy_loss(lp, old, adv, mask, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                               agg=agg)


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip: float | None = None,
    agg: str = "token-mean",
    backend: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss ``0.5*max((v-R)^2, (old + clamp(v-old, ±clip) - R)^2)`` over ``[B, T]``.

    Returns ``(loss, stats)`` with ``vf_loss, vf_clipfrac, value_mean``.
    """
    (v, old, ret), mask = validate.loss_inputs(("values", "old_values", "returns"), (values, old_values, returns),
                                               mask)
    _check_agg(agg, v.shape)
    if validate.number("clip", clip, optional=True) is not None and clip <= 0:
        raise ValueError(f"value clip must be > 0 or None, got {clip}")
    _dispatch.resolve(backend, v.device, None)
    return ref.value_loss(v, old, ret, mask, clip=clip, agg=agg)


def ppo_loss_from_logits(
    logits: Tensor,
    labels: Tensor,
    old_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    objective: PPOObjective | None = None,
    backend: str | None = None,
    inplace_backward: bool = False,
    **settings: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The PPO-family objective from logits, differentiable w.r.t. ``logits``.

    ``logits [B, T, V]`` (any ``[..., V]`` for token-level settings with token-mean), ``labels/old_logprobs/
    advantages/mask [B, T]``, ``ref_logprobs [B, T]`` (needed when ``kl_coef != 0``), ``rollout_logprobs [B, T]``
    (the sampler's log-probs: rollout correction, and the off-policy mask's comparison). The settings are
    ``objective`` (a ``PPOObjective``: clips, CISPO/SAPO, sequence-level ratios, KL, entropy, temperature,
    aggregation and normaliser, rollout correction, masks) and/or its fields as keywords (keywords override).
    ``old_logprobs=None``: exactly on-policy, each token's own log-prob (detached) is its old one.

    Kernel backends read the logits once forward and once backward (read + write of dlogits); masked tokens cost
    nothing. The clipped PPO surrogate with k1/k2/k3/abs KL runs in the kernels' fused epilogue; every other setting
    takes the same kernels' log-probs and entropies and its per-token math in PyTorch (the reference). Stats
    (detached): pg_loss, kl, entropy, clipfrac, dual_clipfrac, approx_kl, ratio_mean, ratio_max, loss, and the
    ``rollout_*`` / ``policy_masked_fraction`` statistics of the settings that have them.
    """
    op = "ppo_loss_from_logits"
    obj = objective_from(objective, settings, op)
    logits, labels = validate.logits_and_labels(logits, labels)
    if labels is None:
        raise TypeError("labels are required")
    if inplace_backward:
        validate.no_overlap("logits", logits)
    lead = logits.shape[:-1]
    ins = validate.ppo_inputs(op, lead, "logits[..., 0]", logits.device, old_logprobs, advantages, mask,
                              ref_logprobs, obj, rollout_logprobs=rollout_logprobs, on_policy_ok=True)
    mask = ins.mask
    name = _backend_for(backend, logits, "ppo_loss")
    truncated = obj.top_k > 0 or obj.top_p < 1.0
    if truncated and inplace_backward:
        raise ValueError("inplace_backward=True cannot be combined with top_k/top_p: the truncated logits are a "
                         "copy, so writing dlogits into it saves nothing")
    if name == "torch":
        validate.finite_rows(op, _scaled_row_max(logits, obj.temperature), valid=mask, temperature=obj.temperature)
        loss, stats = ref.ppo_loss_from_logits(logits, labels, ins.old, ins.adv, mask, ref_logprobs=ins.ref,
                                               rollout_logprobs=ins.rollout, objective=obj)
        if truncated:
            _in_support(op, ref.token_logprobs(logits.detach(), labels, temperature=obj.temperature, top_k=obj.top_k,
                                               top_p=obj.top_p), mask)
        return loss, stats
    if truncated:
        validate.finite_rows(op, _scaled_row_max(logits, obj.temperature), valid=mask, temperature=obj.temperature)
        logits = _truncate(torch.where((mask != 0).unsqueeze(-1), logits, torch.zeros_like(logits)), obj.temperature,
                           obj.top_k, obj.top_p)
    if ins.old is None or ins.rollout is not None or truncated or not kernel_epilogue_supports(obj):
        # The loss is a function of the log-probs and entropies: the logprobs kernels (one pass forward, one
        # backward) and the objective's per-token math in PyTorch.
        logp, ent, lse = _kernel_logprobs(logits, labels, obj.temperature, True, name, inplace_backward)
        validate.finite_rows(op, lse.detach(), valid=mask, temperature=obj.temperature)
        if truncated:
            _in_support(op, logp, mask)
        return ref.ppo_loss_from_logprobs(logp, ent, ins.old, ins.adv, mask, ref_logprobs=ins.ref,
                                          rollout_logprobs=ins.rollout, objective=obj)

    flat = lambda t: t.reshape(-1).to(torch.float32).contiguous()  # noqa: E731
    x3 = _as_3d(logits)
    terms = torch.ops.fastppo.ppo_loss_terms(
        x3, labels.reshape(-1).to(torch.int64).contiguous(), flat(ins.old), flat(ins.adv),
        flat(ins.ref) if ins.ref is not None else ins.old.new_empty((0,), dtype=torch.float32),
        flat(mask), obj.pack(), name, inplace_backward,
    )
    row = lambda k: terms[TERM[k]].view(lead)  # noqa: E731
    validate.finite_rows(op, row("lse").detach(), valid=mask, temperature=obj.temperature)
    agg = objective_agg(obj)
    loss = ref.agg_loss(row("loss"), mask, **agg)
    with torch.no_grad():
        stats = policy_stats(ref.agg_loss(row("pg"), mask, **agg), row("logp"), ins.old, row("ratio"),
                             row("clipped"), row("dual_clipped"), mask)
        if ins.ref is not None:
            stats["kl"] = ref.masked_mean(row("kl"), mask)
        stats["entropy"] = ref.masked_mean(row("entropy"), mask)
        stats["loss"] = loss.detach()
    return loss, stats


# ------------------------------------------------------------------------------- outcome advantage estimators
def _outcome_inputs(scores: object, group_index: object, mask: object) -> tuple[Tensor, Tensor, Tensor]:
    scores = validate.float_tensor("scores", scores)
    if scores.dim() != 1:
        raise ValueError(f"scores must be [B] (one outcome per response), got shape {tuple(scores.shape)}")
    if not isinstance(group_index, Tensor):
        raise TypeError(f"group_index must be an integer torch.Tensor [B], got {type(group_index).__name__}")
    if group_index.dtype.is_floating_point or group_index.dtype.is_complex or group_index.dtype == torch.bool:
        raise TypeError(f"group_index must be an integer tensor of group ids, got {group_index.dtype}")
    if group_index.shape != scores.shape:
        raise ValueError(f"group_index has shape {tuple(group_index.shape)} but scores has {tuple(scores.shape)}")
    if not isinstance(mask, Tensor) or mask.dim() != 2 or mask.shape[0] != scores.shape[0]:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be [B, T] with B = {scores.shape[0]}, got {shape}")
    mask = validate.mask_tensor("mask", mask, mask.shape)
    validate.same_device(scores=scores, group_index=group_index, mask=mask)
    return _half_to_float(scores), group_index, mask


def grpo_advantages(
    scores: Tensor,
    group_index: Tensor,
    mask: Tensor,
    *,
    norm_by_std: bool = True,
    eps: float = 1e-6,
    backend: str | None = None,
) -> Tensor:
    """GRPO advantages: ``(score - group mean) / (group std + eps)`` on every valid token of the response.

    ``scores [B]``, ``group_index [B]`` integer group ids (any values), ``mask [B, T]`` -> ``[B, T]``.
    Unbiased group std; ``norm_by_std=False`` gives ``score - group mean`` (Dr. GRPO). A group of one has
    mean 0 and std 1 (verl's convention). Vectorised (``index_add``), no host synchronisation.
    """
    s, gid, mask = _outcome_inputs(scores, group_index, mask)
    if validate.number("eps", eps) < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    _dispatch.resolve(backend, s.device, None)
    return ref_adv.grpo_advantages(s, gid, mask, norm_by_std=norm_by_std, eps=eps)


def rloo_advantages(scores: Tensor, group_index: Tensor, mask: Tensor, *, backend: str | None = None) -> Tensor:
    """RLOO advantages: ``score - mean of the other responses in the group`` on every valid token.

    ``scores [B]``, ``group_index [B]`` integer ids, ``mask [B, T]`` -> ``[B, T]``. A group of one has no
    baseline and keeps its raw score (verl's ``rloo``).
    """
    s, gid, mask = _outcome_inputs(scores, group_index, mask)
    _dispatch.resolve(backend, s.device, None)
    return ref_adv.rloo_advantages(s, gid, mask)


def reinforce_pp_advantages(
    rewards: Tensor,
    mask: Tensor,
    *,
    gamma: float = 1.0,
    whiten: bool = True,
    eps: float = 1e-8,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++ ``(advantages, returns)``, both ``[B, T]``.

    ``rewards [B, T]`` token rewards, or ``[B]`` scores placed on each row's last valid token; ``mask [B, T]``.
    ``returns``: discounted return over valid tokens (masked positions skipped, 0 where mask is 0);
    ``advantages``: returns whitened over all valid tokens of the batch (unbiased var, ``rsqrt(var + eps)``),
    0 where mask is 0. The scan runs on the GAE kernel on kernel backends (values 0, lam 1).
    """
    rewards = validate.float_tensor("rewards", rewards)
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        raise ValueError("mask must be a [B, T] tensor")
    if rewards.dim() == 1:
        if rewards.shape[0] != mask.shape[0]:
            raise ValueError(f"scores [B] = {tuple(rewards.shape)} do not match mask {tuple(mask.shape)}")
        validate.same_device(rewards=rewards, mask=mask)
        rewards = ref_adv.place_on_last_token(_half_to_float(rewards), mask)
    mask = validate.mask_tensor("mask", mask, rewards.shape)
    validate.same_device(rewards=rewards, mask=mask)
    if not 0.0 <= validate.number("gamma", gamma) <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if validate.number("eps", eps) < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if whiten:
        validate.check_value(mask.bool().sum() >= 2,
                             "reinforce_pp_advantages(whiten=True) needs at least 2 valid tokens")
    name = _backend_for(backend, rewards, "gae")
    if name == "torch" or rewards.numel() == 0:
        return ref_adv.reinforce_pp_advantages(_half_to_float(rewards), mask, gamma=float(gamma), whiten=whiten,
                                               eps=eps)
    ret, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=float(gamma), lam=1.0, backend=name)
    if not whiten:
        return ret.clone(), ret
    return ref.masked_whiten(ret, mask, eps=eps) * mask.to(ret.dtype), ret


# ---------------------------------------------------------------------------------------------------- sampling
def sample_tokens(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seeds: Tensor | None = None,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> Tensor:
    """One token per row of ``logits [..., V]`` from ``softmax(logits / temperature)`` after top-k / top-p
    filtering, in one fused pass per row (no probabilities materialised). ``-> [...]`` int64.

    Randomness: ``seeds`` (int64, one per row, shape ``[...]``) fixes each row's draw by itself (the same seed
    gives the same token on every backend and in any batch), for per-sample streams such as a hash of (seed,
    step, sample index, position); without ``seeds``, one int64 per row is drawn from ``generator`` (or torch's
    default generator of the logits' device). Same distribution as ``softmax`` + ``torch.multinomial``; the
    filtering rules (ties kept together) are in ``fastppo.reference.sampling``. No gradient flows.
    """
    logits = validate.float_tensor("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    temperature = validate.temperature(temperature)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    top_p = float(top_p)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    lead = logits.shape[:-1]
    if seeds is None:
        seeds = torch.randint(-(2**63), 2**63 - 1, lead, dtype=torch.int64, device=logits.device,
                              generator=generator)
    elif not isinstance(seeds, Tensor) or seeds.dtype != torch.int64 or seeds.shape != lead:
        got = f"{seeds.dtype} {tuple(seeds.shape)}" if isinstance(seeds, Tensor) else type(seeds).__name__
        raise ValueError(f"seeds must be an int64 tensor of shape {tuple(lead)} (one per row), got {got}")
    validate.same_device(logits=logits, seeds=seeds)
    x = logits.detach().reshape(-1, logits.shape[-1])
    if x.shape[0] > 0:
        # NaN/+inf logits, or a row with no finite logit, have no distribution to draw from
        validate.finite_rows("sample_tokens", _scaled_row_max(x, temperature), temperature=temperature)
    uniforms = ref.sampling.seed_uniforms(seeds.reshape(-1))
    name = _backend_for(backend, x, "sampling")
    if name == "torch" or x.shape[0] == 0:
        out = ref.sampling.sample_tokens(x, uniforms, temperature=temperature, top_k=top_k, top_p=top_p)
    else:
        if x.stride(-1) != 1:
            x = x.contiguous()  # explicit copy: the kernels need unit stride along the vocabulary
        out = _dispatch.launcher_module(name).sample_forward(x, uniforms, temperature, top_k, top_p)
    return out.view(lead)
