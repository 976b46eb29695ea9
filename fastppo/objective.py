"""The PPO objective's settings, as one frozen value that every loss entry point passes down unchanged.

``PPOObjective`` holds every setting of the loss (clips, dual clip, KL estimator and coefficient, entropy bonus,
temperature, aggregation). It is validated once, when it is built (``fastppo._validate.objective``), so every entry
point (``ppo_loss_from_logits``, ``ppo_loss_from_hidden`` and their vocabulary-parallel twins) accepts exactly the
same settings with the same errors. Keyword arguments of those functions build one (``objective_from``).

At a ``torch.library`` custom-op boundary the objective travels as a flat ``list[float]`` (``pack`` / ``unpack``:
custom ops take no dataclasses, and a float list keeps ``torch.compile(fullgraph=True)`` working); on both sides of
the boundary code reads the fields by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

from fastppo._contract import KL_KINDS

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")

# Fields whose value is one of a fixed set of names: packed as the name's index.
CHOICES: dict[str, tuple[str, ...]] = {"kl_kind": KL_KINDS, "agg": AGG_MODES}


@dataclass(frozen=True)
class PPOObjective:
    """Every setting of the PPO loss. Per valid token, with ``ratio = exp(logp - old_logp)``:

    ``pg = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))`` (and ``min(pg, -A * dual_clip)`` for
    ``A < 0`` when ``dual_clip`` is set), ``loss = pg + kl_coef * KL_kind(logp, ref_logp) - entropy_coef * H``,
    aggregated over the batch with ``agg``. Log-probs and entropy are of ``softmax(logits / temperature)``.

    - ``clip_low`` in ``[0, 1)``; ``clip_high >= 0`` (None: ``clip_low``; set: asymmetric "clip-higher").
    - ``dual_clip``: ``c > 1`` caps the loss of negative-advantage tokens at ``-A * c`` (None: off).
    - ``kl_coef`` (needs ``ref_logprobs`` when non-zero), ``kl_kind`` one of ``k1 k2 k3 abs``.
    - ``entropy_coef``: the entropy bonus (subtracted).
    - ``temperature > 0``: logits are divided by it.
    - ``agg``: ``token-mean``, ``seq-mean-token-sum``, ``seq-mean-token-mean``, ``seq-mean-token-sum-norm``.

    Every value is checked when the object is built; ``clip_high=None`` is stored as ``clip_low``.
    """

    clip_low: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    entropy_coef: float = 0.0
    temperature: float = 1.0
    agg: str = "token-mean"

    def __post_init__(self) -> None:
        from fastppo import _validate  # floor 0 both: _validate imports nothing of this module at import time

        for name, value in _validate.objective(self).items():
            object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ the custom-op boundary
    def pack(self) -> list[float]:
        """The fields as floats, in declaration order: names as their index in ``CHOICES``, None as 0.0 (``dual_clip``
        is > 1 when set, so 0.0 is unambiguous)."""
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in CHOICES:
                value = CHOICES[f.name].index(value)
            out.append(0.0 if value is None else float(value))
        return out

    @classmethod
    def unpack(cls, packed: Sequence[float]) -> PPOObjective:
        """The inverse of ``pack`` (cached: a training loop passes the same few objectives every step)."""
        return _unpack(tuple(float(x) for x in packed))


@lru_cache(maxsize=256)
def _unpack(packed: tuple[float, ...]) -> PPOObjective:
    names = [f.name for f in fields(PPOObjective)]
    if len(packed) != len(names):
        raise ValueError(f"a packed PPOObjective has {len(names)} values, got {len(packed)}")
    values: dict[str, Any] = {}
    for name, x in zip(names, packed, strict=True):
        if name in CHOICES:
            values[name] = CHOICES[name][int(x)]
        elif name == "dual_clip":
            values[name] = None if x == 0.0 else x
        else:
            values[name] = x
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
