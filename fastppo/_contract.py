"""The launcher contract's constants, defined once for Python (floor 0: imports nothing from fastppo).

Every Python user (reference, kernels, launchers, autograd, ops) imports these names from here. The C++ and
CUDA kernels define the same facts once, in ``csrc/common/contract.h``; the compiled modules expose them
(``TERMS``, ``KL_KINDS``, ``LOG_RATIO_CLAMP``, ``DTYPES``) and ``fastppo._native_launchers`` refuses a module
whose values differ from these (``tests/contract/test_constants.py`` checks both bindings).
"""

from __future__ import annotations

import os

import torch

# Row order of the ``terms [NUM_TERMS, N]`` output of ``ppo_loss_forward`` (see fastppo/autograd.py).
PPO_TERMS = ("logp", "entropy", "lse", "pg", "ratio", "kl", "dpg", "dkl", "clipped", "dual_clipped", "loss")
NUM_TERMS = len(PPO_TERMS)
TERM = {name: i for i, name in enumerate(PPO_TERMS)}  # name -> row of ``terms``

# KL estimators of ``kl_penalty``; launchers take the index into this tuple (``kl_kind``).
KL_KINDS = ("k1", "k2", "k3", "abs")

# ratio = exp(clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)): exp(20) ~ 5e8 keeps fp32 finite, and the
# gradient passes only on the closed range (as torch.clamp's).
LOG_RATIO_CLAMP = 20.0

# Element types of the logits the kernels take, in the order of their dtype codes (the native modules receive
# the code next to each raw pointer).
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_CODES = {dtype: code for code, dtype in enumerate(DTYPES)}


def triton_interpret() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter (Triton kernels on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ------------------------------------------------------------------------------------- the launchers' inputs
# Every launcher (Triton, C++, CUDA) checks its tensors with these same functions and converts nothing: the
# public ops (fastppo/ops.py) are the one place that reshapes, copies or casts user inputs into this form.
def check_logits(logits: torch.Tensor, dtypes: tuple[torch.dtype, ...] = DTYPES) -> None:
    """``logits [B, T, V]``: one of ``dtypes`` (the kernels': fp32/bf16/fp16), any strides on B and T, unit stride
    along V."""
    if logits.dim() != 3:
        raise ValueError(f"launchers take logits as [B, T, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in dtypes:
        names = "/".join(str(d).removeprefix("torch.").replace("float", "fp").replace("bfp", "bf") for d in dtypes)
        raise TypeError(f"launchers take {names} logits, got {logits.dtype}")
    if logits.stride(2) != 1 and logits.shape[2] > 1:
        raise ValueError("launchers need unit stride along the vocabulary (logits.stride(-1) == 1)")


def check_out(out: torch.Tensor, logits: torch.Tensor) -> None:
    """``out`` (dlogits): logits' shape, dtype and device, unit stride along V (may be ``logits`` itself)."""
    if (out.shape != logits.shape or out.dtype != logits.dtype or out.device != logits.device
            or (out.stride(2) != 1 and out.shape[2] > 1)):
        raise ValueError(f"out must be [B, T, V] like logits ({tuple(logits.shape)} {logits.dtype} on "
                         f"{logits.device}) with unit stride on V, got {tuple(out.shape)} {out.dtype} on {out.device}")


def check_vector(name: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    """A per-row input: exactly ``shape`` (``(N,)`` for the row ops, ``(B, T)`` for GAE), ``dtype``, contiguous,
    on ``device``."""
    if t.shape != shape or t.dtype != dtype or t.device != device or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}, got "
                         f"{'' if t.is_contiguous() else 'non-contiguous '}{tuple(t.shape)} {t.dtype} on {t.device}")


def check_gae_inputs(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, bootstrap: torch.Tensor | None
) -> None:
    """``rewards, values`` float32 ``[B, T]``, ``mask`` bool ``[B, T]``, ``bootstrap`` float32 ``[B]`` or None, all
    contiguous on one device."""
    if rewards.dim() != 2:
        raise ValueError(f"GAE launchers take rewards, values and mask as [B, T], got shape {tuple(rewards.shape)}")
    shape, dev = tuple(rewards.shape), rewards.device
    check_vector("rewards", rewards, shape, torch.float32, dev)
    check_vector("values", values, shape, torch.float32, dev)
    check_vector("mask", mask, shape, torch.bool, dev)
    if bootstrap is not None:
        check_vector("bootstrap", bootstrap, shape[:1], torch.float32, dev)


def kernel_epilogue_supports(objective: object) -> bool:
    """Whether the kernels' shared per-token PPO epilogue (``ppo_loss_forward``: csrc/common/ppo_epilogue.h, the
    Triton row kernel) computes this ``PPOObjective``: the token-level clipped surrogate (clip-higher, dual clip) with
    one of ``KL_KINDS`` and the entropy aggregated like the rest. Every other objective runs on the same row kernels
    for log-probs and entropy with its per-token math in PyTorch (``fastppo.reference.objective``)."""
    obj = objective
    return (obj.policy_loss == "ppo" and obj.importance_sampling_level == "token" and obj.kl_kind in KL_KINDS
            and not obj.kl_ratio_weighted and obj.entropy_agg is None and obj.off_policy_mask_threshold is None
            and obj.top_entropy_quantile == 1.0)
