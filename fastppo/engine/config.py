"""The engine's one configuration dataclass: defaults, help text, YAML loading, ``--field value`` overrides and
validation with clear errors.

Every field carries its help text in ``metadata["help"]``; ``fastppo train --help`` prints them.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from fastppo.objective import KL_CHOICES, PPOObjective


class ConfigError(ValueError):
    """A configuration that cannot run: unknown field, wrong type, impossible sizes, bad choice."""


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:  # noqa: A002
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


# Fields holding a local path: a missing one is named up front (transformers would say "Repo id must be ...").
_PATH_FIELDS = ("model", "tokenizer", "critic_model", "reward_model", "prompts_file")
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")
_ESTIMATOR_OPS = {"grpo": "grpo_advantages", "rloo": "rloo_advantages", "reinforce_pp": "reinforce_pp_advantages"}


@dataclass
class PPOConfig:
    # --- run --------------------------------------------------------------------------------------------------
    seed: int = _f(0, "random seed (python, numpy, torch); runs on CPU are deterministic for a given seed")
    output_dir: str = _f("", "run directory; empty = runs/<timestamp>")
    total_steps: int = _f(600, "number of PPO steps (rollout + experience + update)")
    device: str = _f("auto", "torch device: auto (cuda if available), cpu, cuda, cuda:N")
    dtype: str = _f("float32", "model parameter dtype", ("float32", "bfloat16", "float16"))
    backend: str = _f("auto", "fastppo kernel backend for the fused ops", ("auto", "torch", "triton", "cpp", "cuda"))
    dist_timeout: float = _f(300.0, "multi-process runs (torchrun): seconds a rank waits in a collective before it "
                             "fails, so a dead or stuck rank ends the run instead of hanging it")
    torch_threads: int = _f(0, "torch.set_num_threads(N); 0 = auto: 1 for the tiny built-in model (its ops are too "
                            "small to gain from threads, and on a busy CPU they lose badly), else torch's default")
    # --- models -----------------------------------------------------------------------------------------------
    model: str = _f("", "policy: local path of a Hugging Face AutoModelForCausalLM; empty = tiny Llama built in code")
    tokenizer: str = _f("", "tokenizer path; empty = the model's (or the embedded task's code-built tokenizer)")
    tiny_hidden_size: int = _f(64, "tiny Llama (model empty): hidden size")
    tiny_layers: int = _f(2, "tiny Llama: number of layers")
    tiny_heads: int = _f(4, "tiny Llama: attention heads")
    tiny_intermediate_size: int = _f(128, "tiny Llama: MLP width")
    critic: str = _f("shared", "value function: a head on the policy trunk, or a separate value model",
                     ("shared", "separate"))
    critic_model: str = _f("", "separate critic: path of a causal LM used as the value trunk; empty = copy of policy")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    lora_r: int = _f(0, "LoRA rank (needs peft); > 0 trains a LoRA adapter on the policy and the reference model is "
                     "the base weights with the adapter disabled (no second copy); 0 = full fine-tuning")
    lora_alpha: float = _f(16.0, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _f(0.0, "LoRA dropout")
    lora_target_modules: str = _f("q_proj,k_proj,v_proj,o_proj",
                                  "comma-separated module names to adapt, or all-linear")
    # --- task / reward ----------------------------------------------------------------------------------------
    task: str = _f("reverse", "prompts: the embedded digit-reversal task, or prompts from prompts_file",
                   ("reverse", "prompts_file"))
    prompts_file: str = _f("", "task=prompts_file: .txt (one prompt a line) or .jsonl with a 'prompt' field")
    reward: str = _f("function", "reward: a Python function (verifier) or a sequence-classification model",
                     ("function", "model"))
    reward_fn: str = _f("fastppo.engine.task:reverse_reward",
                        "reward=function: 'module:function' taking (prompts, responses) -> list of floats")
    reward_model: str = _f("", "reward=model: path of an AutoModelForSequenceClassification (num_labels=1)")
    missing_eos_penalty: float = _f(0.0, "subtracted from the score of responses that hit max_new_tokens")
    task_min_digits: int = _f(3, "reverse task: shortest digit string")
    task_max_digits: int = _f(8, "reverse task: longest digit string")
    task_num_prompts: int = _f(4096, "reverse task: size of the prompt pool")
    sft_steps: int = _f(300, "supervised warm-up steps on (noisy) demonstrations before PPO; 0 = none")
    sft_batch_size: int = _f(64, "warm-up batch size")
    sft_lr: float = _f(3e-3, "warm-up learning rate")
    demo_noise: float = _f(0.35, "reverse task: probability that a demonstration digit is replaced by a random one")
    # --- rollout ----------------------------------------------------------------------------------------------
    batch_size: int = _f(64, "rollouts (sequences) per PPO step")
    samples_per_prompt: int = _f(1, "responses sampled per prompt (group size for grpo/rloo)")
    max_new_tokens: int = _f(10, "generation length limit")
    temperature: float = _f(1.0, "sampling temperature (logprobs use the same temperature)")
    top_k: int = _f(0, "top-k sampling; 0 = off (log-probs are then over the same truncated support)")
    top_p: float = _f(1.0, "nucleus sampling; 1.0 = off (log-probs are then over the same truncated support)")
    kv_cache: str = _f("dynamic", "generation KV cache: dynamic (grows) or static (preallocated, fixed shapes)",
                       ("dynamic", "static"))
    forward_batch_size: int = _f(64, "sequences per forward pass when computing experience")
    fused_lm_head: bool = _f(True, "logprobs, entropy and the PPO loss from the last hidden states and the lm_head "
                             "weight (fastppo.linear_*), never the [B, L, V] logits; off = full logits (models "
                             "whose head is not a plain linear map use full logits either way)")
    # --- PPO ----------------------------------------------------------------------------------------------------
    ppo_epochs: int = _f(2, "passes over each batch of experience")
    mini_batch_size: int = _f(32, "sequences per optimizer step")
    micro_batch_size: int = _f(32, "sequences per forward/backward (gradient accumulation = mini / micro)")
    lr: float = _f(5e-4, "AdamW learning rate")
    lr_schedule: str = _f("constant", "learning-rate schedule after warmup", ("constant", "linear", "cosine"))
    warmup_steps: int = _f(0, "linear LR warmup, in optimizer steps")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient-norm clipping; <= 0 = off")
    policy_loss: str = _f("ppo", "policy term: ppo (clipped surrogate), cispo (clipped detached IS weight x logp), "
                          "sapo (soft sigmoid gate); see fastppo.PPOObjective", ("ppo", "cispo", "sapo"))
    importance_sampling_level: str = _f("token", "importance ratio per token, per sequence (GSPO) or the sequence's "
                                        "value with per-token gradients (GSPO-token)",
                                        ("token", "sequence", "sequence_token"))
    sapo_tau_pos: float = _f(1.0, "SAPO gate temperature for positive advantages")
    sapo_tau_neg: float = _f(1.05, "SAPO gate temperature for negative advantages")
    clip_range: float = _f(0.2, "PPO ratio clip (low side, and high side unless clip_range_high is set)")
    clip_range_high: float | None = _f(None, "PPO ratio clip on the high side ('clip-higher'); none = clip_range")
    dual_clip: float | None = _f(None, "dual-clip constant c > 1 for negative advantages; none = off")
    value_clip: float | None = _f(0.2, "value-loss clip around the old values; none = off")
    vf_coef: float = _f(0.5, "value-loss weight")
    entropy_coef: float = _f(0.0, "entropy bonus weight")
    ptx_coef: float = _f(0.0, "PPO-ptx (InstructGPT): weight of the mean NLL of a pretraining batch added to every "
                         "optimizer step; 0 = off (the run is then exactly the plain PPO run)")
    ptx_file: str = _f("", "PPO-ptx texts: .txt (one per line) or .jsonl with a 'text' field; empty = the reverse "
                       "task's demonstrations (prompt + demonstration)")
    ptx_batch_size: int = _f(8, "PPO-ptx: texts per optimizer step")
    loss_agg: str = _f("token-mean", "loss aggregation",
                       ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"))
    gamma: float = _f(1.0, "discount")
    lam: float = _f(0.95, "GAE lambda")
    advantage_estimator: str = _f("gae", "advantages: GAE with the critic, or critic-free GRPO / RLOO (need "
                                  "samples_per_prompt >= 2) / REINFORCE++; critic-free ones do not train the value "
                                  "head (pair them with kl_in_loss for GRPO-style KL)", ADVANTAGE_ESTIMATORS)
    whiten_advantages: bool = _f(True, "normalise advantages over the batch's valid tokens")
    # --- KL -----------------------------------------------------------------------------------------------------
    kl_coef: float = _f(0.03, "initial KL coefficient (to the reference model)")
    kl_kind: str = _f("k1", "KL estimator per token (a '+' suffix: that value with k2's gradient)", KL_CHOICES)
    kl_ratio_weighted: bool = _f(False, "kl_in_loss: weight the KL by the importance ratio (TRL's bias-corrected KL)")
    # --- rollout correction and masks ---------------------------------------------------------------------------
    rollout_is_level: str | None = _f(None, "rollout correction: importance weights of the sampler's log-probs "
                                      "(recorded during generation) per token or per sequence; none = off",
                                      (None, "token", "sequence"))
    rollout_is_mode: str = _f("truncate", "rollout correction: truncate the weights (TIS) or zero those outside the "
                              "bounds (MIS / IcePop)", ("truncate", "mask"))
    rollout_is_min: float | None = _f(None, "rollout correction: lower bound of the weights; none = no lower bound")
    rollout_is_max: float | None = _f(2.0, "rollout correction: upper bound of the weights; none = no upper bound")
    off_policy_mask_threshold: float | None = _f(None, "drop the policy term of negative-advantage sequences whose "
                                                 "mean (sampler - current) log-prob exceeds this; none = off")
    top_entropy_quantile: float = _f(1.0, "keep the policy term of the top fraction of tokens by entropy; 1 = all")
    kl_in_loss: bool = _f(False, "put the KL term in the loss (GRPO style) instead of the per-token reward")
    adaptive_kl: bool = _f(True, "adapt kl_coef toward kl_target (Ziegler et al. 2019)")
    kl_target: float = _f(3.0, "adaptive KL: target KL per sequence (sum over tokens of kl_kind)")
    kl_horizon: int = _f(2000, "adaptive KL: horizon in sequences")
    # --- logging / checkpoints --------------------------------------------------------------------------------
    save_every: int = _f(100, "checkpoint every N PPO steps (and at the end); 0 = only at the end")
    keep_checkpoints: int = _f(2, "how many complete checkpoints to keep")
    num_samples: int = _f(8, "sample generations written before and after training")
    eval_prompts: int = _f(256, "reverse task: held-out prompts scored greedily before and after training")
    progress: bool = _f(True, "show a progress bar")
    tensorboard: bool = _f(True, "write TensorBoard event files")
    plot: bool = _f(True, "write curves.png at the end")

    # ------------------------------------------------------------------------------------------------ derived
    @property
    def grad_accum_steps(self) -> int:
        return self.mini_batch_size // self.micro_batch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def objective(self, *, kl_coef: float) -> PPOObjective:
        """The loss settings as the ``PPOObjective`` the fused ops take (``kl_coef``: the current coefficient when the
        KL is in the loss, else 0; the reference log-probs then only feed the statistics)."""
        return PPOObjective(
            policy_loss=self.policy_loss, importance_sampling_level=self.importance_sampling_level,
            clip_low=self.clip_range, clip_high=self.clip_range_high, dual_clip=self.dual_clip,
            sapo_tau_pos=self.sapo_tau_pos, sapo_tau_neg=self.sapo_tau_neg,
            kl_coef=kl_coef if self.kl_in_loss else 0.0, kl_kind=self.kl_kind,
            kl_ratio_weighted=self.kl_ratio_weighted, entropy_coef=self.entropy_coef, temperature=self.temperature,
            agg=self.loss_agg, rollout_is_level=self.rollout_is_level, rollout_is_mode=self.rollout_is_mode,
            rollout_is_min=self.rollout_is_min, rollout_is_max=self.rollout_is_max,
            off_policy_mask_threshold=self.off_policy_mask_threshold, top_entropy_quantile=self.top_entropy_quantile,
            top_k=self.top_k, top_p=self.top_p,
        )

    # --------------------------------------------------------------------------------------------- validation
    def validate(self) -> PPOConfig:
        """Raise ``ConfigError`` naming the field(s) when the configuration cannot run."""
        for f in fields(self):
            choices = f.metadata.get("choices")
            val = getattr(self, f.name)
            if choices and val not in choices:
                raise ConfigError(f"{f.name}={val!r} is not one of {list(choices)}")
            # NaN slips through every range check below (all comparisons are false) and inf passes the
            # one-sided ones: a run would train on NaN and fail much later, so refuse them up front.
            if isinstance(val, float) and not math.isfinite(val):
                raise ConfigError(f"{f.name} must be a finite number, got {val}")
        for name in _PATH_FIELDS:
            path = getattr(self, name)
            if path and not Path(path).exists():
                raise ConfigError(f"{name}: path {path!r} does not exist (fastppo loads local files and "
                                  "directories, e.g. one written by save_pretrained)")
        positive = ("total_steps", "batch_size", "samples_per_prompt", "max_new_tokens", "ppo_epochs",
                    "mini_batch_size", "micro_batch_size", "forward_batch_size", "tiny_hidden_size", "tiny_layers",
                    "tiny_heads", "tiny_intermediate_size", "sft_batch_size", "task_num_prompts", "kl_horizon",
                    "keep_checkpoints")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("sft_steps", "warmup_steps", "top_k", "save_every", "num_samples", "eval_prompts",
                     "torch_threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size % self.mini_batch_size:
            raise ConfigError(f"mini_batch_size={self.mini_batch_size} must divide batch_size={self.batch_size}")
        if self.mini_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"micro_batch_size={self.micro_batch_size} must divide mini_batch_size={self.mini_batch_size}"
            )
        if self.batch_size % self.samples_per_prompt:
            raise ConfigError(
                f"samples_per_prompt={self.samples_per_prompt} must divide batch_size={self.batch_size}"
            )
        if self.tiny_hidden_size % self.tiny_heads:
            raise ConfigError(f"tiny_heads={self.tiny_heads} must divide tiny_hidden_size={self.tiny_hidden_size}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("gamma", "lam", "demo_noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.value_clip is not None and self.value_clip <= 0:
            raise ConfigError(f"value_clip must be > 0 (or none), got {self.value_clip}")
        for name in ("lr", "kl_target", "dist_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.ptx_coef < 0 or self.ptx_batch_size <= 0:
            raise ConfigError(f"need ptx_coef >= 0 and ptx_batch_size > 0, got {self.ptx_coef}, {self.ptx_batch_size}")
        if self.ptx_coef > 0 and not self.ptx_file and self.task != "reverse":
            raise ConfigError("ptx_coef > 0 needs ptx_file (only the reverse task has built-in demonstrations)")
        if self.ptx_file and not Path(self.ptx_file).is_file():
            raise ConfigError(f"ptx_file {self.ptx_file!r} does not exist")
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef must be >= 0, got {self.kl_coef}")
        try:  # the loss settings, checked by the objective they build (one validation for engine and ops)
            self.objective(kl_coef=self.kl_coef)
        except (TypeError, ValueError) as exc:  # the objective names its fields; say the config's names too
            raise ConfigError(f"loss settings (clip_range -> clip_low, clip_range_high -> clip_high, loss_agg -> agg): "
                              f"{exc}") from None
        if self.task_min_digits < 1 or self.task_max_digits < self.task_min_digits:
            raise ConfigError(
                f"need 1 <= task_min_digits <= task_max_digits, got {self.task_min_digits}, {self.task_max_digits}"
            )
        if self.task == "prompts_file" and not self.prompts_file:
            raise ConfigError("task=prompts_file needs prompts_file")
        if self.reward == "model" and not self.reward_model:
            raise ConfigError("reward=model needs reward_model (a path)")
        if self.reward == "function" and ":" not in self.reward_fn:
            raise ConfigError(f"reward_fn must look like 'package.module:function', got {self.reward_fn!r}")
        if self.task != "reverse" and not self.model:
            # The tiny model is built for the embedded task's vocabulary; other prompts need a real tokenizer.
            if not self.tokenizer:
                raise ConfigError("task=prompts_file with the tiny built-in model needs tokenizer (a path)")
        if self.lora_r < 0:
            raise ConfigError(f"lora_r must be >= 0, got {self.lora_r}")
        if self.lora_r:
            import importlib.util

            if importlib.util.find_spec("peft") is None:
                raise ConfigError("lora_r > 0 needs the peft package (pip install peft)")
            if self.gradient_checkpointing:
                raise ConfigError("gradient_checkpointing with a LoRA adapter is not supported by the engine yet")
        if self.advantage_estimator != "gae":
            import fastppo

            fn = _ESTIMATOR_OPS[self.advantage_estimator]
            if not hasattr(fastppo, fn):
                raise ConfigError(f"advantage_estimator={self.advantage_estimator!r} needs fastppo.{fn}, which this "
                                  "build of fastppo does not provide")
            if self.advantage_estimator in ("grpo", "rloo") and self.samples_per_prompt < 2:
                raise ConfigError(f"advantage_estimator={self.advantage_estimator!r} needs samples_per_prompt >= 2")
        return self


# --------------------------------------------------------------------------------------------------- parsing
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(PPOConfig)
    return {f.name: hints[f.name] for f in fields(PPOConfig)}


def _split_optional(tp: Any) -> tuple[Any, bool]:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def coerce(name: str, value: Any, *, from_string: bool) -> Any:
    """Check ``value`` against the type of field ``name`` (parsing it when it comes from the command line)."""
    types_ = _field_types()
    if name not in types_:
        close = [n for n in types_ if n.startswith(name[:4])] if len(name) >= 4 else []
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown config field {name!r}{hint}; `fastppo train --help` lists them")
    tp, optional = _split_optional(types_[name])
    if from_string and isinstance(value, str):
        low = value.strip().lower()
        if optional and low in ("none", "null", "~"):
            return None
        try:
            if tp is bool:
                if low in _TRUE:
                    return True
                if low in _FALSE:
                    return False
                raise ValueError
            if tp is int:
                return int(value)
            if tp is float:
                return float(value)
        except ValueError:
            raise ConfigError(f"{name} expects {tp.__name__}, got {value!r}") from None
        return value
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} expects {tp.__name__}, got null")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML (YAML 1.1) reads `1e-3` (no dot) as a string: accept any numeric string for a float field.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{name} expects float, got str {value!r}") from None
    if (tp is int and isinstance(value, bool)) or not isinstance(value, tp):
        raise ConfigError(f"{name} expects {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(data: dict[str, Any], base: PPOConfig | None = None) -> PPOConfig:
    cfg = dataclasses.replace(base) if base is not None else PPOConfig()
    for key, val in data.items():
        setattr(cfg, key, coerce(key, val, from_string=False))
    return cfg


def load_yaml(path: str | Path, base: PPOConfig | None = None) -> PPOConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of field: value")
    return from_dict(data, base)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``['--lr', '1e-4', '--progress=false']`` -> ``{'lr': 1e-4, 'progress': False}`` (typed, checked)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        tok = args[i]
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(f"expected --field value, got {tok!r}")
        key = tok[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            nxt = args[i + 1] if i + 1 < len(args) else None
            tp, _ = _split_optional(_field_types().get(key.replace("-", "_"), str))
            if nxt is None or (nxt.startswith("--") and tp is bool):
                if tp is not bool:
                    raise ConfigError(f"--{key} needs a value")
                raw, i = "true", i + 1  # a bare boolean flag means true
            else:
                raw, i = nxt, i + 2
        key = key.replace("-", "_")
        out[key] = coerce(key, raw, from_string=True)
    return out


def help_text() -> str:
    lines = []
    types_ = _field_types()
    default = PPOConfig()
    for f in fields(PPOConfig):
        tp, optional = _split_optional(types_[f.name])
        tname = tp.__name__ + (" | none" if optional else "")
        choices = f.metadata.get("choices")
        extra = f" {{{', '.join('none' if c is None else c for c in choices)}}}" if choices else ""
        head = f"  --{f.name} {tname}{extra}  (default: {getattr(default, f.name)!r})"
        lines.append(f"{head}\n      {f.metadata['help']}")
    return "\n".join(lines)
