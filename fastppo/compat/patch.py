"""Swap fastppo's adapters into an installed TRL / verl / OpenRLHF, and restore the originals.

``patch("verl")`` imports the framework modules that define the functions fastppo replaces (and a few modules
that import them by name), then scans every loaded module of the framework for references to the original
objects -- module attributes under any name, values of module-level dicts (registries such as verl's
``POLICY_LOSS_REGISTRY``) and attributes of the framework's classes -- and points them at the adapter.
``unpatch("verl")`` scans again and puts the originals back everywhere a replacement is found, including in
modules imported after the patch. Patching twice is a no-op. ``patch`` returns the dotted names it replaced:
a function that the installed version does not define (an older or newer peer) is skipped, not an error.

Callers that load a peer's source file by path under another module name (OpenRLHF's own unit tests do this)
hold a private copy of each function that no ``patch`` can reach.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["FRAMEWORKS", "is_patched", "patch", "unpatch"]


@dataclass(frozen=True)
class _Target:
    module: str  # where the original is defined
    attr: str  # "name" or "Class.name"
    replacement: str  # "fastppo.compat.<adapter>:<name>"
    required: bool = True  # a missing optional module or attribute is skipped (older/newer peer versions)
    # "module:function" returning whether this installed version needs the swap (None: always); e.g. TRL's
    # logits-building log-prob method is replaced only on versions that have no fused LM head of their own
    when: str | None = None


@dataclass(frozen=True)
class _Framework:
    package: str  # import name
    pip: str  # what to install
    targets: tuple[_Target, ...]
    consumers: tuple[str, ...] = ()  # modules that import targets by name; imported when possible
    # Subpackages whose __init__ needs a heavy extra the targets do not (OpenRLHF's models/__init__ imports the
    # actor, which needs flash-attn's CUDA build): when that __init__ fails, the targets' modules are loaded under a
    # bare package over the same directory.
    bare_ok: tuple[str, ...] = ()


def _targets(module: str, adapter: str, names: str, required: bool = True) -> tuple[_Target, ...]:
    out = []
    for name in names.split():
        attr, _, repl = name.partition("=")
        out.append(_Target(module, attr, f"fastppo.compat.{adapter}:{repl or attr.split('.')[-1]}", required))
    return tuple(out)


FRAMEWORKS: dict[str, _Framework] = {
    "trl": _Framework(
        package="trl",
        pip="trl==1.16.0",
        targets=(
            *_targets("trl.trainer.utils", "trl", "selective_log_softmax entropy_from_logits"),
            # TRL >= 1.14 only
            *_targets("trl.trainer.utils", "trl", "selective_log_softmax_and_entropy", False),
            # TRL v0.x helpers, and their later home in the experimental PPO trainer.
            *_targets("trl.core", "trl", "logprobs_from_logits masked_mean masked_var masked_whiten", False),
            *_targets("trl.experimental.ppo.ppo_trainer", "trl", "masked_mean masked_var masked_whiten", False),
            # GRPO's log-probs and entropies on fastppo's fused LM head: TRL's chunked head (GRPO's from 1.14; in
            # trl.trainer.utils, an alias of trl.kernels' class from 1.15), and on TRL 1.12 / 1.13 the GRPO method
            # that builds the [B, L, V] logits
            _Target("trl.trainer.utils", "_ChunkedLogProbFunction",
                    "fastppo.compat.trl_lm_head:ChunkedLogProbFunction", False),
            _Target("trl.trainer.grpo_trainer", "GRPOTrainer._get_per_token_logps_and_entropies",
                    "fastppo.compat.trl_lm_head:get_per_token_logps_and_entropies", False,
                    when="fastppo.compat.trl_lm_head:trl_builds_logits"),
        ),
        consumers=("trl.experimental.sdpo.loss_utils",),
    ),
    "verl": _Framework(
        package="verl",
        pip="verl==0.9.1 (see .ci/install-peers.sh for the few modules its imported code needs)",
        targets=(
            # use_fused_kernels: the fused LM heads that verl's model forwards import at call time
            *_targets("verl.utils.kernel.linear_cross_entropy", "verl_lm_head",
                      "linear_cross_entropy LinearCrossEntropy", False),
            *_targets("verl.utils.experimental.torch_functional", "verl_lm_head",
                      "FusedLinearForPPO FusedLinearForPPOFunction", False),
            *_targets("verl.utils.torch_functional", "verl",
                      "logprobs_from_logits entropy_from_logits entropy_from_logits_with_chunking "
                      "masked_mean masked_var masked_whiten"),
            *_targets("verl.trainer.ppo.core_algos", "verl",
                      "compute_gae_advantage_return compute_grpo_outcome_advantage "
                      "compute_rloo_outcome_advantage compute_reinforce_plus_plus_outcome_advantage "
                      "compute_policy_loss compute_policy_loss_vanilla compute_value_loss kl_penalty "
                      "kl_penalty_forward agg_loss"),
            *_targets("verl.trainer.ppo.core_algos", "verl",
                      "compute_grpo_vectorized_outcome_advantage compute_rloo_vectorized_outcome_advantage", False),
            # Registered policy losses (POLICY_LOSS_REGISTRY's entries are swapped with the functions): fastppo's
            # objective for the modes it represents; verl versions before sapo / cispo skip them.
            *_targets("verl.trainer.ppo.core_algos", "verl",
                      "compute_policy_loss_gspo compute_policy_loss_sapo compute_policy_loss_cispo", False),
        ),
        consumers=("verl.workers.utils.losses", "verl.trainer.ppo.ray_trainer"),
    ),
    "openrlhf": _Framework(
        package="openrlhf",
        pip="openrlhf==0.11.2 (see .ci/install-peers.sh for the few modules its imported code needs)",
        targets=(
            *_targets("openrlhf.models.utils", "openrlhf", "log_probs_from_logits compute_approx_kl"),
            *_targets("openrlhf.models.loss", "openrlhf", "PolicyLoss ValueLoss"),
            *_targets("openrlhf.trainer.ppo_utils.experience_maker", "openrlhf",
                      "RemoteExperienceMaker.get_advantages_and_returns=_get_advantages_and_returns_method "
                      "RemoteExperienceMaker.get_cumulative_returns=_get_cumulative_returns_method", False),
        ),
        consumers=("openrlhf.trainer.ray.ppo_actor", "openrlhf.trainer.ray.ppo_critic"),
        bare_ok=("openrlhf.models",),
    ),
}


@dataclass
class _State:
    pairs: list[tuple[Any, Any]] = field(default_factory=list)  # (original, replacement)
    names: list[str] = field(default_factory=list)  # "module.attr" of each replaced target
    records: list[tuple[Any, Any, str, Any]] = field(default_factory=list)  # where each replacement went


_PATCHED: dict[str, _State] = {}


def _framework(name: str) -> _Framework:
    if name not in FRAMEWORKS:
        raise ValueError(f"unknown framework {name!r}; choose from {sorted(FRAMEWORKS)}")
    fw = FRAMEWORKS[name]
    if importlib.util.find_spec(fw.package) is None:
        raise ModuleNotFoundError(
            f"fastppo.compat.patch({name!r}): {fw.package} is not installed; install it with: pip install {fw.pip}",
            name=fw.package,
        )
    return fw


def _bare_package(name: str, reason: Exception) -> None:
    """Register package ``name`` without running its ``__init__`` (which failed with ``reason``), so its
    submodules import from the installed directory; a name only the ``__init__`` defines says why it is missing."""
    parent, _, last = name.rpartition(".")
    directory = Path(importlib.import_module(parent).__file__).parent / last
    pkg = ModuleType(name, f"{name} without its __init__ (it failed: {reason})")
    pkg.__path__ = [str(directory)]
    pkg.__package__ = name

    def missing(attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise AttributeError(f"{name}.{attr} is unavailable: {name}/__init__.py failed to import ({reason}); "
                             "fastppo.compat.patch loaded the submodules it patches without it")

    pkg.__getattr__ = missing  # type: ignore[method-assign]
    sys.modules[name] = pkg


def _import(fw: _Framework, module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pkg = next((p for p in fw.bare_ok if module.startswith(p + ".")), None)
        if pkg is None or sys.modules.get(pkg) is not None:
            raise
        _bare_package(pkg, exc)
        return importlib.import_module(module)


def _resolve(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _lookup(module: ModuleType, attr: str) -> Any:
    owner: Any = module
    *path, last = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    return vars(owner)[last] if isinstance(owner, type) else getattr(owner, last)


def _framework_modules(package: str) -> list[ModuleType]:
    prefix = package + "."
    return [m for n, m in list(sys.modules.items()) if m is not None and (n == package or n.startswith(prefix))]


_Record = tuple[Any, Any, str, Any]  # (container, key, "attr" | "item", original)


def _swap_everywhere(package: str, mapping: dict[int, tuple[Any, Any]]) -> list[_Record]:
    """Replace every reference to ``mapping``'s keys (by identity) inside the framework's modules; return where."""
    done: list[_Record] = []

    def hit(value: Any) -> Any:
        h = mapping.get(id(value))
        return h if h is not None and h[0] is value else None

    for module in _framework_modules(package):
        try:
            namespace = vars(module)
        except TypeError:
            continue
        for key, value in list(namespace.items()):
            if (h := hit(value)) is not None:
                setattr(module, key, h[1])
                done.append((module, key, "attr", h[0]))
            elif type(value) is dict:  # registries: name -> function
                for k, v in list(value.items()):
                    if (h := hit(v)) is not None:
                        value[k] = h[1]
                        done.append((value, k, "item", h[0]))
            elif isinstance(value, type) and getattr(value, "__module__", "").startswith(package):
                for k, v in list(vars(value).items()):
                    if (h := hit(v)) is not None:
                        setattr(value, k, h[1])
                        done.append((value, k, "attr", h[0]))
    return done


def patch(name: str) -> list[str]:
    """Swap fastppo's adapters into the installed framework ``name`` ("trl", "verl" or "openrlhf").

    Returns the dotted names of the functions replaced (e.g. ``"trl.trainer.utils.selective_log_softmax"``);
    functions the installed version does not define are skipped. Raises ``ModuleNotFoundError`` (with a pip
    hint) when the framework is not installed, ``ImportError`` when a module that defines a required target
    cannot be imported. Idempotent: patching again returns the same list.
    """
    fw = _framework(name)
    if name in _PATCHED:
        return list(_PATCHED[name].names)
    pairs: list[tuple[Any, Any]] = []
    names: list[str] = []
    for t in fw.targets:
        try:
            module = _import(fw, t.module)
            original = _lookup(module, t.attr)
            if original is None:  # a name a version defines as None when an optional import failed
                raise AttributeError(f"{t.module}.{t.attr} is None")
        except (ImportError, AttributeError, KeyError) as e:
            if t.required:
                raise ImportError(
                    f"fastppo.compat.patch({name!r}): cannot import {t.module}.{t.attr} ({e}); the installed "
                    f"{fw.package} is not a supported version or misses a dependency (pip install {fw.pip})"
                ) from e
            continue
        if t.when is not None and not _resolve(t.when)():
            continue
        pairs.append((original, _resolve(t.replacement)))
        names.append(f"{t.module}.{t.attr}")
    for consumer in fw.consumers:
        try:
            importlib.import_module(consumer)
        except Exception:  # noqa: BLE001 - optional: a consumer needing an absent extra (ray, vllm) is skipped
            pass
    mapping = {id(orig): (orig, repl) for orig, repl in pairs}
    records = _swap_everywhere(fw.package, mapping)
    _PATCHED[name] = _State(pairs, names, records)
    return list(names)


def unpatch(name: str) -> int:
    """Restore every original that ``patch(name)`` replaced (also in modules imported since). Returns the
    number of references restored; 0 when ``name`` was not patched."""
    if name not in FRAMEWORKS:
        raise ValueError(f"unknown framework {name!r}; choose from {sorted(FRAMEWORKS)}")
    state = _PATCHED.pop(name, None)
    if state is None:
        return 0
    restored = 0
    replacements = {id(repl) for _, repl in state.pairs}
    for container, key, kind, original in state.records:
        current = container.get(key) if kind == "item" else vars(container).get(key)
        if current is not None and id(current) in replacements:
            if kind == "item":
                container[key] = original
            else:
                setattr(container, key, original)
            restored += 1
    # Modules imported after the patch copied replacements by name: restore those whose original is unambiguous.
    by_repl: dict[int, list[tuple[Any, Any]]] = {}
    for orig, repl in state.pairs:
        by_repl.setdefault(id(repl), []).append((repl, orig))
    mapping = {k: v[0] for k, v in by_repl.items() if len(v) == 1}
    return restored + len(_swap_everywhere(FRAMEWORKS[name].package, mapping))


def is_patched(name: str) -> bool:
    return name in _PATCHED


def original_of(replacement: Any) -> Any | None:
    """The peer's object that a patched framework holds ``replacement`` in place of (None when none does): an
    adapter that hands a call it cannot compute back to the peer's own code finds it here."""
    for state in _PATCHED.values():
        for orig, repl in state.pairs:
            if repl is replacement:
                return orig
    return None
