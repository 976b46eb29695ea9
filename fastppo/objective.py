"""The PPO objective's settings, as one frozen value that every loss entry point passes down unchanged.

``PPOObjective`` holds every setting of the loss: the policy term (PPO clip, CISPO, SAPO; token- or sequence-level
importance ratios), the KL to a reference policy, the entropy bonus, the temperature, the aggregation and its
normaliser, rollout correction and the off-policy / entropy masks. It is validated once, when it is built
(``fastppo._validate.objective``), so every entry point (``ppo_loss_from_logits``, ``ppo_loss_from_hidden`` and their
vocabulary-parallel twins) accepts exactly the same settings with the same errors. Keyword arguments of those
functions build one (``objective_from``). The formulas are ``fastppo.reference.objective`` (the spec).

At a ``torch.library`` custom-op boundary the objective travels as a flat ``list[float]`` (``pack`` / ``unpack``:
custom ops take no dataclasses, and a float list keeps ``torch.compile(fullgraph=True)`` working); on both sides of
the boundary code reads the fields by name.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

from fastppo._contract import KL_KINDS

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
POLICY_LOSSES = ("ppo", "cispo", "sapo")
IS_LEVELS = ("token", "sequence", "sequence_token")
# The kernels' four estimators, verl's low_var_kl (k3 with clamps), and each with "+": its value, the gradient of k2.
KL_ESTIMATORS = (*KL_KINDS, "low_var_kl")
KL_CHOICES = (*KL_ESTIMATORS, *(k + "+" for k in KL_ESTIMATORS))
ROLLOUT_IS_LEVELS = ("token", "sequence")
ROLLOUT_IS_MODES = ("truncate", "mask")

# Fields whose value is one of a fixed set: packed as the value's index (None is a member where it is allowed).
CHOICES: dict[str, tuple[str | None, ...]] = {
    "policy_loss": POLICY_LOSSES,
    "importance_sampling_level": IS_LEVELS,
    "kl_kind": KL_CHOICES,
    "agg": AGG_MODES,
    "entropy_agg": (None, *AGG_MODES),
    "rollout_is_level": (None, *ROLLOUT_IS_LEVELS),
    "rollout_is_mode": ROLLOUT_IS_MODES,
}


@dataclass(frozen=True)
class PPOObjective:
    """Every setting of the PPO-family loss (``fastppo.reference.objective`` has the formulas and the papers).

    Per valid token, with the importance ratio ``r`` (``exp(logp - old_logp)`` at ``importance_sampling_level="token"``)
    and advantage ``A``, the policy term is:

    - ``policy_loss="ppo"``: ``max(-A r, -A clamp(r, 1 - clip_low, 1 + clip_high))``, and ``min(., -A dual_clip)`` for
      ``A < 0`` when ``dual_clip`` is set (verl ``vanilla``, TRL grpo/bnpo/dr_grpo/dapo, OpenRLHF ``ppo``);
    - ``"cispo"``: ``-sg(clamp(r, 1 - clip_low, 1 + clip_high)) A logp`` (MiniMax-M1; ``clip_low >= 1``: no lower
      bound, as TRL);
    - ``"sapo"``: ``-sigmoid(tau (r - 1)) 4/tau A``, ``tau = sapo_tau_pos`` if ``A > 0`` else ``sapo_tau_neg`` (SAPO).

    ``importance_sampling_level``: ``"token"``; ``"sequence"`` (GSPO: ``r`` is ``exp`` of the sequence's mean
    log-ratio, the gradient flows through the mean; TRL, OpenRLHF ``gspo``); ``"sequence_token"`` (GSPO-token: the
    sequence ratio's value with each token's own gradient; verl ``gspo``).

    The loss is ``agg(pg) + kl_coef * agg(KL) - entropy_coef * entropy_agg(H)``:

    - ``kl_kind``: ``k1 k2 k3 abs low_var_kl`` (verl's clamped k3), each optionally with ``+`` (the kind's value,
      k2's gradient, verl's straight-through); ``kl_ratio_weighted``: the KL times the (differentiable) importance
      ratio (TRL's ``use_bias_correction_kl``). Needs ``ref_logprobs`` when ``kl_coef != 0``.
    - ``agg``: ``token-mean``, ``seq-mean-token-sum``, ``seq-mean-token-mean``, ``seq-mean-token-sum-norm``;
      ``loss_normalizer`` replaces the local denominator (valid tokens for ``token-mean``, non-empty sequences for the
      ``seq-*`` modes), e.g. the global token count of a gradient-accumulation step (TRL's ``dapo``), so micro-batches
      and ranks sum to the full-batch loss; ``max_completion_length`` replaces ``T`` in ``seq-mean-token-sum-norm``
      (Dr. GRPO); ``entropy_agg``: the entropy's own aggregation (None: ``agg`` with its normaliser; a mode: that
      mode over this call's tokens, as TRL's entropy bonus).
    - ``temperature``: logits are divided by it.

    Rollout correction (needs ``rollout_logprobs``, the sampler's log-probs): ``rho = exp(old_logp - rollout_logp)``
    per token (``rollout_is_level="token"``) or its product over the sequence (``"sequence"``);
    ``rollout_is_mode="truncate"``: ``clamp(rho, rollout_is_min, rollout_is_max)`` (TIS); ``"mask"``: ``rho`` inside
    ``[rollout_is_min, rollout_is_max]``, else 0 (MIS; IcePop at token level with both bounds). The policy term is
    multiplied by the (detached) weight.

    ``off_policy_mask_threshold``: drop the policy term of a sequence with ``A < 0`` whose mean of
    ``sampler_logp - sg(logp)`` exceeds the threshold (DeepSeek-V3.2's off-policy sequence masking, TRL).
    ``top_entropy_quantile < 1``: only tokens whose entropy is in the top fraction of the batch keep their policy
    term (and count in the entropy bonus), as TRL.

    ``top_k`` / ``top_p``: log-probs and entropies over the truncated support the sampler (``sample_tokens``) draws
    from with these settings, renormalised (0 / 1.0: the whole vocabulary); old, reference and rollout log-probs are
    expected on the same support.

    Every value is checked when the object is built; ``clip_high=None`` is stored as ``clip_low``.
    """

    policy_loss: str = "ppo"
    importance_sampling_level: str = "token"
    clip_low: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = None
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    kl_ratio_weighted: bool = False
    entropy_coef: float = 0.0
    temperature: float = 1.0
    agg: str = "token-mean"
    loss_normalizer: float | None = None
    max_completion_length: int | None = None
    entropy_agg: str | None = None
    rollout_is_level: str | None = None
    rollout_is_mode: str = "truncate"
    rollout_is_min: float | None = None
    rollout_is_max: float | None = 2.0
    off_policy_mask_threshold: float | None = None
    top_entropy_quantile: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        from fastppo import _validate  # floor 0 both: _validate imports nothing of this module at import time

        for name, value in _validate.objective(self).items():
            object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ what the math needs
    @property
    def token_separable(self) -> bool:
        """Whether each token's loss and gradient depend only on its own log-prob and entropy (given the detached
        per-token inputs): then a chunked pass can finish a chunk's gradient before seeing the next chunk. Sequence-
        level ratios and the off-policy and entropy masks need statistics of the current log-probs first."""
        return (self.importance_sampling_level == "token" and self.off_policy_mask_threshold is None
                and self.top_entropy_quantile == 1.0)

    @property
    def needs_rollout_logprobs(self) -> bool:
        return self.rollout_is_level is not None

    # ------------------------------------------------------------------ the custom-op boundary
    def pack(self) -> list[float]:
        """The fields as floats, in declaration order: a choice as its index in ``CHOICES``, a bool as 0/1, an optional
        number as two floats (present 0/1, value)."""
        out: list[float] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in CHOICES:
                out.append(float(CHOICES[f.name].index(value)))
            elif _optional(f):
                out += [0.0, 0.0] if value is None else [1.0, float(value)]
            else:
                out.append(float(value))
        return out

    @classmethod
    def unpack(cls, packed: Sequence[float]) -> PPOObjective:
        """The inverse of ``pack`` (cached: a training loop passes the same few objectives every step)."""
        return _unpack(tuple(float(x) for x in packed))


_HINTS = typing.get_type_hints(PPOObjective)


def _optional(f: dataclasses.Field) -> bool:
    return f.name not in CHOICES and type(None) in typing.get_args(_HINTS[f.name])


def _number_type(f: dataclasses.Field) -> type:
    args = [a for a in typing.get_args(_HINTS[f.name]) if a is not type(None)] or [_HINTS[f.name]]
    return args[0]


@lru_cache(maxsize=256)
def _unpack(packed: tuple[float, ...]) -> PPOObjective:
    values: dict[str, Any] = {}
    i = 0
    try:
        for f in fields(PPOObjective):
            if f.name in CHOICES:
                values[f.name] = CHOICES[f.name][int(packed[i])]
                i += 1
            elif _optional(f):
                values[f.name] = _number_type(f)(packed[i + 1]) if packed[i] else None
                i += 2
            else:
                values[f.name] = _number_type(f)(packed[i])
                i += 1
    except IndexError:
        raise ValueError(f"a packed PPOObjective has more values than the {len(packed)} given") from None
    if i != len(packed):
        raise ValueError(f"a packed PPOObjective has {i} values, got {len(packed)}")
    return PPOObjective(**values)


FIELD_NAMES = tuple(f.name for f in fields(PPOObjective))


def objective_from(objective: PPOObjective | None, settings: Mapping[str, Any], op: str) -> PPOObjective:
    """The objective of a call: ``objective`` (default settings when None) with ``settings`` (keyword arguments
    named like its fields) applied on top. An unknown keyword is a ``TypeError`` naming the valid ones."""
    unknown = sorted(set(settings) - set(FIELD_NAMES))
    if unknown:
        raise TypeError(f"{op}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; the objective's "
                        f"settings are {', '.join(FIELD_NAMES)}")
    if objective is None:
        return PPOObjective(**settings)
    if not isinstance(objective, PPOObjective):
        raise TypeError(f"objective must be a fastppo.PPOObjective, got {type(objective).__name__}")
    if not settings:
        return objective
    if "clip_low" in settings and "clip_high" not in settings and objective.clip_high == objective.clip_low:
        settings = {**settings, "clip_high": None}  # a symmetric objective stays symmetric
    return dataclasses.replace(objective, **settings)
