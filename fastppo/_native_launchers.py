"""The launcher contract of ``fastppo/autograd.py`` for the compiled csrc modules (backends cpp and cuda).

``fastppo._C_cpu`` / ``fastppo._C_cuda`` are plain pybind11 modules that take raw data pointers, sizes,
element strides and dtype codes (no libtorch linkage). This layer allocates the torch outputs, checks the
layouts the kernels rely on and passes ``data_ptr()``s: CPU calls get ``torch.get_num_threads()`` OpenMP
threads, CUDA calls the tensor's device index and the current stream (no host synchronisation).
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fastppo._contract import (
    DTYPE_CODES,
    DTYPES,
    KL_KINDS,
    LOG_RATIO_CLAMP,
    NUM_TERMS,
    PPO_TERMS,
    check_gae_inputs,
    check_logits,
    check_out,
    check_vector,
)

if TYPE_CHECKING:
    from fastppo.objective import PPOObjective


def contract_mismatches(mod: ModuleType) -> list[str]:
    """Where the constants a compiled module was built with (csrc/common/contract.h, exposed by its binding)
    differ from fastppo/_contract.py; empty when they agree."""
    want = {
        "TERMS": PPO_TERMS,
        "NUM_TERMS": NUM_TERMS,
        "KL_KINDS": KL_KINDS,
        "DTYPES": tuple(str(d).removeprefix("torch.") for d in DTYPES),
        "LOG_RATIO_CLAMP": LOG_RATIO_CLAMP,
    }
    got = {name: getattr(mod, name, None) for name in want}
    got = {name: tuple(v) if isinstance(v, (list, tuple)) else v for name, v in got.items()}
    return [f"{k}: module {got[k]!r}, fastppo._contract {want[k]!r}" for k in want if got[k] != want[k]]


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class NativeLaunchers:
    """The launchers of ``fastppo._launchers``' families over a compiled module ``mod``: logprobs, ppo_loss, gae,
    and sampling where the module was built with it (``sample_forward`` exists only then, so dispatch sees the
    family as missing otherwise)."""

    def __init__(self, kind: str, mod: ModuleType) -> None:
        bad = contract_mismatches(mod)
        if bad:
            raise ImportError(f"{mod.__name__} was built for another launcher contract ({'; '.join(bad)}); "
                              "rebuild the extension")
        self.kind = kind
        self.device_type = "cpu" if kind == "cpp" else "cuda"
        self.module = mod
        if hasattr(mod, "sample_forward"):  # the sampling family, where this build has it
            self.sample_forward = self._sample_forward

    def __repr__(self) -> str:
        return f"NativeLaunchers({self.kind!r}, {self.module.__name__})"

    # --------------------------------------------------------------------------------------- helpers
    def _tail(self, t: Tensor) -> tuple[int, ...]:
        """Trailing execution arguments: OpenMP threads (cpp) or (device index, stream handle) (cuda)."""
        if self.kind == "cpp":
            return (torch.get_num_threads(),)
        return (t.device.index, torch.cuda.current_stream(t.device).cuda_stream)

    def _check_device(self, name: str, t: Tensor) -> None:
        if not (t.is_cuda if self.device_type == "cuda" else t.is_cpu):  # flags: no torch.device per check
            raise ValueError(f"backend {self.kind!r} needs {self.device_type} tensors; {name} is on {t.device}")

    def _logits(self, logits: Tensor) -> tuple[int, ...]:
        """``(ptr, dtype code, B, T, V, sB, sT)`` of a ``[B, T, V]`` view with unit stride on V."""
        self._check_device("logits", logits)
        check_logits(logits)
        B, T, V = logits.shape
        return (logits.data_ptr(), DTYPE_CODES[logits.dtype], B, T, V, logits.stride(0), logits.stride(1))

    @staticmethod
    def _vec(name: str, t: Tensor | None, like: Tensor, n: int, dtype: torch.dtype = torch.float32) -> Tensor | None:
        if t is not None:
            check_vector(name, t, (n,), dtype, like.device)
        return t

    # ------------------------------------------------------------------------------------- launchers
    def logprobs_forward(
        self, logits: Tensor, labels: Tensor, temperature: float, with_entropy: bool
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """``logits [B, T, V]``, ``labels [N]`` -> ``(logp [N], entropy [N] | None, lse [N])`` float32."""
        view = self._logits(logits)
        n = view[2] * view[3]
        labels = self._vec("labels", labels, logits, n, torch.int64)
        logp = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if with_entropy else None
        if n > 0:
            self.module.logprobs_forward(*view, _ptr(labels), 1.0 / float(temperature), _ptr(logp), _ptr(ent),
                                         _ptr(lse), *self._tail(logits))
        return logp, ent, lse

    def logprobs_backward(
        self,
        logits: Tensor,
        labels: Tensor,
        lse: Tensor,
        entropy: Tensor | None,
        grad_logp: Tensor | None,
        grad_entropy: Tensor | None,
        temperature: float,
        out: Tensor,
    ) -> Tensor:
        """dlogits into ``out [B, T, V]`` (logits' dtype, unit stride on V; may be ``logits`` itself)."""
        view = self._logits(logits)
        n = view[2] * view[3]
        check_out(out, logits)
        if grad_entropy is not None and entropy is None:
            raise ValueError("grad_entropy needs the forward entropy")
        labels = self._vec("labels", labels, logits, n, torch.int64)
        lse = self._vec("lse", lse, logits, n)
        entropy = self._vec("entropy", entropy, logits, n)
        g_lp = self._vec("grad_logp", grad_logp, logits, n)
        g_h = self._vec("grad_entropy", grad_entropy, logits, n)
        if n > 0:
            self.module.logprobs_backward(*view, _ptr(labels), _ptr(lse), _ptr(entropy), _ptr(g_lp), _ptr(g_h),
                                          1.0 / float(temperature), out.data_ptr(), out.stride(0), out.stride(1),
                                          *self._tail(logits))
        return out

    def ppo_loss_forward(
        self,
        logits: Tensor,
        labels: Tensor,
        old_logp: Tensor,
        adv: Tensor,
        ref_logp: Tensor | None,
        mask: Tensor,
        objective: PPOObjective,
    ) -> Tensor:
        """Per-token PPO terms ``[NUM_TERMS, N]`` float32 in ``PPO_TERMS`` order (masked rows: zeros)."""
        view = self._logits(logits)
        n = view[2] * view[3]
        obj = objective
        labels = self._vec("labels", labels, logits, n, torch.int64)
        old = self._vec("old_logp", old_logp, logits, n)
        adv = self._vec("adv", adv, logits, n)
        ref = self._vec("ref_logp", ref_logp, logits, n)
        mask = self._vec("mask", mask, logits, n)
        terms = torch.empty((NUM_TERMS, n), dtype=torch.float32, device=logits.device)
        if n > 0:
            # the C struct PpoParams (csrc/common/ppo_epilogue.h), field by field; dual clip 0.0 = off
            self.module.ppo_loss_forward(*view, _ptr(labels), _ptr(old), _ptr(adv), _ptr(ref), _ptr(mask),
                                         1.0 / float(obj.temperature), float(obj.clip_low), float(obj.clip_high),
                                         0.0 if obj.dual_clip is None else float(obj.dual_clip),
                                         KL_KINDS.index(obj.kl_kind), float(obj.kl_coef), float(obj.entropy_coef),
                                         terms.data_ptr(), *self._tail(logits))
        return terms

    def gae_forward(
        self, rewards: Tensor, values: Tensor, mask: Tensor, bootstrap: Tensor | None, gamma: float, lam: float
    ) -> tuple[Tensor, Tensor]:
        """``rewards, values [B, T]`` float32, ``mask [B, T]`` bool, ``bootstrap [B]`` -> ``(adv, returns) [B, T]``."""
        self._check_device("rewards", rewards)
        check_gae_inputs(rewards, values, mask, bootstrap)
        B, T = rewards.shape
        r, v, m, boot = rewards, values, mask, bootstrap
        adv = torch.empty((B, T), dtype=torch.float32, device=rewards.device)
        ret = torch.empty_like(adv)
        if B * T > 0:
            self.module.gae_forward(_ptr(r), _ptr(v), _ptr(m), _ptr(boot), B, T, float(gamma), float(lam),
                                    adv.data_ptr(), ret.data_ptr(), *self._tail(rewards))
        return adv, ret

    def _sample_forward(self, logits: Tensor, uniforms: Tensor, temperature: float, top_k: int,
                        top_p: float) -> Tensor:
        """``logits [B, V]`` (unit stride on V), ``uniforms [B]`` float64 in (0, 1) -> tokens ``[B]`` int64."""
        self._check_device("logits", logits)
        code = DTYPE_CODES.get(logits.dtype)
        if logits.dim() != 2 or code is None or (logits.stride(1) != 1 and logits.shape[1] > 1):
            raise ValueError("sample_forward takes fp32/bf16/fp16 logits [B, V] with unit stride on V")
        B, V = logits.shape
        u = self._vec("uniforms", uniforms, logits, B, torch.float64)
        out = torch.empty(B, dtype=torch.int64, device=logits.device)
        if B > 0:
            self.module.sample_forward(logits.data_ptr(), code, B, V, logits.stride(0), _ptr(u),
                                       1.0 / float(temperature), int(top_k), float(top_p), out.data_ptr(),
                                       *self._tail(logits))
        return out
