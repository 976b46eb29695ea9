"""Building the models: tokenizer, policy (+ value head), critic, frozen reference, reward.

The policy is any Hugging Face ``AutoModelForCausalLM``; the value function reads the trunk's last hidden state
(``output_hidden_states``), so it works with any architecture that reports hidden states.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from collections.abc import Callable

import torch
from torch import Tensor, nn

from fastppo.engine.config import ConfigError, PPOConfig
from fastppo.engine.lm_head import forward_keep, last_hidden

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA device is available")
    return dev


def cache_kwarg(lm: nn.Module) -> str:
    """The keyword a causal LM's ``forward`` takes its KV cache under: ``cache`` (recent transformers) or
    ``past_key_values`` (older releases, where ``cache`` is unknown). Passing the old name to a new release only
    works through a deprecation shim, so ask the forward's signature (through a PEFT wrapper to the base model).
    """
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    params = inspect.signature(type(base).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions counted over valid tokens only, so a left-padded prompt starts at position 0. ``[B, L]``."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class ValueModel(nn.Module):
    """A causal LM trunk with a scalar head: ``forward -> (logits [B, L, V] or None, values [B, L])``.

    With ``critic=shared`` the policy itself is a ValueModel (one forward gives logits and values); with
    ``critic=separate`` the critic is a second ValueModel whose logits are ignored.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        hidden = lm.config.hidden_size
        self.v_head = nn.Linear(hidden, 1, dtype=next(lm.parameters()).dtype)
        nn.init.normal_(self.v_head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.v_head.bias)

    @property
    def config(self):
        return self.lm.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None, *,
                keep: int = 0, values: bool = True, hidden_only: bool = False, **kw) -> tuple[Tensor, Tensor | None]:
        """``keep > 0``: logits of the last ``keep`` positions only (``[B, keep, V]``; the LM head skips the rest);
        ``values=False``: no value head (and no hidden states kept), ``None`` in its place.
        ``hidden_only=True`` (the fused LM head): ``(last hidden states [B, L, H], values)``, logits for one position
        only."""
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        if hidden_only:
            hidden = last_hidden(self.lm, input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids, use_cache=False, **kw)
            vals = self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1).float() if values else None
            return hidden, vals
        out = forward_keep(self.lm, keep, input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids, output_hidden_states=values, use_cache=False, **kw)
        if not values:
            return out.logits, None
        hidden = out.hidden_states[-1]
        vals = self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1).float()
        return out.logits, vals


def build_tokenizer(cfg: PPOConfig):
    path = cfg.tokenizer or cfg.model
    if path:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        tok.padding_side = "left"
        if tok.pad_token is None:
            if tok.eos_token is None:
                raise ConfigError(f"tokenizer {path!r} has neither a pad nor an eos token")
            tok.pad_token = tok.eos_token
        return tok
    from fastppo.engine.task import make_tokenizer

    return make_tokenizer()


def build_causal_lm(cfg: PPOConfig, tokenizer, path: str = "") -> nn.Module:
    """``path`` (a local HF checkpoint), or the tiny Llama built from the config's ``tiny_*`` fields."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = _DTYPES[cfg.dtype]
    if path:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        conf = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.tiny_hidden_size, intermediate_size=cfg.tiny_intermediate_size,
            num_hidden_layers=cfg.tiny_layers, num_attention_heads=cfg.tiny_heads,
            num_key_value_heads=cfg.tiny_heads, max_position_embeddings=256, tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, attn_implementation="eager",
        )
        lm = LlamaForCausalLM(conf).to(dtype)
    if cfg.gradient_checkpointing:
        # transformers 5 renamed it; keep working with both spellings
        enable = getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable
        enable()
    return lm


def apply_lora(lm: nn.Module, cfg: PPOConfig) -> nn.Module:
    """Wrap ``lm`` in a peft LoRA adapter; only the adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules.strip()
    conf = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
                      task_type="CAUSAL_LM")
    return get_peft_model(lm, conf)


class AdapterDisabledReference(nn.Module):
    """The reference model of a LoRA policy: the same module with its adapter switched off (the base weights).

    The policy is held outside the module tree so ``.to()`` / ``state_dict()`` do not see its weights twice.
    """

    def __init__(self, peft_lm: nn.Module) -> None:
        super().__init__()
        self._policy = [peft_lm]

    @property
    def config(self):
        return self._policy[0].config

    def forward(self, **kw):
        lm = self._policy[0]
        with lm.disable_adapter():
            return lm(**kw)


def frozen_copy(module: nn.Module) -> nn.Module:
    ref = copy.deepcopy(module)
    ref.eval()
    ref.requires_grad_(False)
    return ref


# ----------------------------------------------------------------------------------------------------- reward
RewardFn = Callable[[list[str], list[str]], list[float]]


def load_reward_fn(spec: str) -> RewardFn:
    mod_name, _, fn_name = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ConfigError(f"reward_fn {spec!r}: cannot import {mod_name!r}: {exc}") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"reward_fn {spec!r}: {mod_name} has no callable {fn_name!r}")
    return fn


class RewardModelScorer:
    """Scores decoded ``prompt + response`` texts with a sequence-classification model (logit 0 = score)."""

    def __init__(self, path: str, device: torch.device, batch_size: int = 64) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        self.model.requires_grad_(False)
        self.tok = AutoTokenizer.from_pretrained(path)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        if self.model.config.pad_token_id is None:
            # sequence classifiers find the last token through pad_token_id
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.tok.padding_side = "right"
        self.device = device
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        scores: list[float] = []
        texts = [p + " " + r for p, r in zip(prompts, responses, strict=False)]
        for i in range(0, len(texts), self.batch_size):
            enc = self.tok(texts[i: i + self.batch_size], return_tensors="pt", padding=True).to(self.device)
            logits = self.model(**enc).logits
            scores.extend(logits[:, 0].float().cpu().tolist())
        return scores


def build_reward(cfg: PPOConfig, device: torch.device) -> RewardFn:
    if cfg.reward == "model":
        return RewardModelScorer(cfg.reward_model, device)
    return load_reward_fn(cfg.reward_fn)
