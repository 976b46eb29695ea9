"""Autograd glue: torch.library custom ops over the backend launchers.

The launchers (Triton in ``fastppo.kernels``, C++ in ``fastppo._C_cpu`` and CUDA in ``fastppo._C_cuda`` via
``fastppo._native_launchers``) know nothing of autograd; their interface is the typed protocols of
``fastppo/_launchers.py`` (one per op family). This module wraps them in ``torch.library`` custom ops (with fake
impls, so a caller compiles with ``torch.compile(fullgraph=True)``) and registers their backward. A ``PPOObjective``
crosses the custom-op boundary packed as ``list[float]`` and is unpacked on the other side, then read by name.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastppo import _dispatch
from fastppo._contract import KL_KINDS, NUM_TERMS, PPO_TERMS
from fastppo._contract import TERM as _T
from fastppo.objective import PPOObjective

__all__ = ["KL_KINDS", "PPO_TERMS"]  # re-exported: the contract's names, defined in fastppo/_contract.py


def _launchers(backend: str):
    mod = _dispatch.launcher_module(backend)
    if mod is None:
        raise _dispatch.BackendUnavailableError(f"backend {backend!r} has no launchers loaded")
    return mod


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,), dtype=torch.float32)


def _opt(t: Tensor) -> Tensor | None:
    # custom ops cannot take/return None tensors in every position; an empty tensor stands for "absent".
    return t if t.numel() > 0 else None


# ----------------------------------------------------------------------------------------- logprobs family
def _backward_into(
    out: Tensor,
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    entropy: Tensor,
    grad_logp: Tensor,
    grad_entropy: Tensor,
    temperature: float,
    backend: str,
) -> None:
    _launchers(backend).logprobs_backward(
        logits, labels, lse, _opt(entropy), _opt(grad_logp), _opt(grad_entropy), temperature, out
    )


@torch.library.custom_op("fastppo::logprobs_bwd", mutates_args=())
def logprobs_bwd(
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    entropy: Tensor,
    grad_logp: Tensor,
    grad_entropy: Tensor,
    temperature: float,
    backend: str,
) -> Tensor:
    """dlogits ``[B, T, V]`` in logits' dtype (a fresh contiguous buffer)."""
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _backward_into(out, logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, backend)
    return out


@logprobs_bwd.register_fake
def _(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("fastppo::logprobs_bwd_", mutates_args=("logits",))
def logprobs_bwd_(
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    entropy: Tensor,
    grad_logp: Tensor,
    grad_entropy: Tensor,
    temperature: float,
    backend: str,
) -> None:
    """In-place backward: dlogits overwrite ``logits`` (memory = one logits buffer)."""
    _backward_into(logits, logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, backend)


@logprobs_bwd_.register_fake
def _(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, backend):
    return None


def _vec_grad(g: Tensor | None, ref: Tensor) -> Tensor:
    # Upstream grads may be stride-0 expansions (from .sum()) or None; launchers take contiguous fp32 [N].
    if g is None:
        return _empty(ref)
    return g.to(torch.float32).contiguous()


def _dlogits(
    logits: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor, g_lp: Tensor, g_h: Tensor, temperature: float,
    backend: str, inplace: bool,
) -> Tensor:
    """dlogits from per-token grads: written over ``logits`` when ``inplace``, else into a fresh buffer."""
    if inplace:
        torch.ops.fastppo.logprobs_bwd_(logits, labels, lse, entropy, g_lp, g_h, temperature, backend)
        return logits
    return torch.ops.fastppo.logprobs_bwd(logits, labels, lse, entropy, g_lp, g_h, temperature, backend)


# Autograd is attached to a thin differentiable wrapper op so that `temperature`, `backend` and `inplace`
# travel as op arguments (register_autograd's setup_context sees them).
@torch.library.custom_op("fastppo::logprobs", mutates_args=())
def logprobs_op(
    logits: Tensor, labels: Tensor, temperature: float, with_entropy: bool, backend: str, inplace: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``[B, T, V], [N] -> (logp [N], entropy [N] or empty, lse [N])``, float32."""
    logp, ent, lse = _launchers(backend).logprobs_forward(logits, labels, temperature, with_entropy)
    return logp, (ent if ent is not None else _empty(logits)), lse


@logprobs_op.register_fake
def _(logits, labels, temperature, with_entropy, backend, inplace):
    n = logits.shape[0] * logits.shape[1]
    return (
        logits.new_empty((n,), dtype=torch.float32),
        logits.new_empty((n,), dtype=torch.float32) if with_entropy else _empty(logits),
        logits.new_empty((n,), dtype=torch.float32),
    )


def _logprobs_setup(ctx, inputs, output):
    logits, labels, temperature, with_entropy, backend, inplace = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.temperature, ctx.backend, ctx.inplace = temperature, backend, inplace
    ctx.mark_non_differentiable(lse)


def _logprobs_backward(ctx, g_logp, g_entropy, _g_lse):
    logits, labels, lse, entropy = ctx.saved_tensors
    g_lp = _vec_grad(g_logp, entropy)
    g_h = _vec_grad(g_entropy, entropy) if entropy.numel() > 0 else _empty(entropy)
    dlogits = _dlogits(logits, labels, lse, entropy, g_lp, g_h, ctx.temperature, ctx.backend, ctx.inplace)
    return dlogits, None, None, None, None, None


logprobs_op.register_autograd(_logprobs_backward, setup_context=_logprobs_setup)


# ----------------------------------------------------------------------------------------- fused PPO loss
@torch.library.custom_op("fastppo::ppo_loss_terms", mutates_args=())
def ppo_loss_terms(
    logits: Tensor,
    labels: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    objective: list[float],
    backend: str,
    inplace: bool,
) -> Tensor:
    """Per-token PPO terms ``[len(PPO_TERMS), N]`` float32 in one pass over ``logits [B, T, V]``; ``objective`` is a
    packed ``PPOObjective`` (``PPOObjective.pack``), ``ref_logp`` empty: none."""
    return _launchers(backend).ppo_loss_forward(logits, labels, old_logp, adv, _opt(ref_logp), mask,
                                                PPOObjective.unpack(objective))


@ppo_loss_terms.register_fake
def _(logits, labels, old_logp, adv, ref_logp, mask, objective, backend, inplace):
    n = logits.shape[0] * logits.shape[1]
    return logits.new_empty((NUM_TERMS, n), dtype=torch.float32)


def _ppo_setup(ctx, inputs, output):
    logits, labels, *_, objective, backend, inplace = inputs
    ctx.objective, ctx.backend, ctx.inplace = PPOObjective.unpack(objective), backend, inplace
    ctx.save_for_backward(logits, labels, output)


def per_token_grads(terms: Tensor, weight: Tensor, objective: PPOObjective) -> tuple[Tensor, Tensor | None]:
    """``(g_lp, g_h)``: d(sum(weight * loss_tok))/d(logp) and d/d(entropy) per token ``[N]``, from the launcher's
    terms (``weight``: the upstream gradient of each token's loss)."""
    obj = objective
    d_lp = terms[_T["dpg"]] if obj.kl_coef == 0.0 else terms[_T["dpg"]] + obj.kl_coef * terms[_T["dkl"]]
    g_lp = (weight * d_lp).contiguous()  # kl_coef == 0: no 0 * inf = NaN from an infinite dkl (k2 at ref = -inf)
    g_h = (weight * -obj.entropy_coef).contiguous() if obj.entropy_coef != 0.0 else None
    return g_lp, g_h


def _ppo_backward(ctx, g_terms):
    logits, labels, terms = ctx.saved_tensors
    # Only the per-token loss row is differentiable: the other rows are statistics (callers detach them).
    g_lp, g_h = per_token_grads(terms, g_terms[_T["loss"]].to(torch.float32), ctx.objective)
    lse, entropy = terms[_T["lse"]].contiguous(), terms[_T["entropy"]].contiguous()
    dlogits = _dlogits(logits, labels, lse, entropy, g_lp, _empty(terms) if g_h is None else g_h,
                       ctx.objective.temperature, ctx.backend, ctx.inplace)
    return (dlogits,) + (None,) * 8


ppo_loss_terms.register_autograd(_ppo_backward, setup_context=_ppo_setup)


# ------------------------------------------------------------------------------------------------------ GAE
# Whether a TorchDispatchMode (FakeTensorMode, make_fx, ...) is active. torch has no public query for it; this
# private one is named by tests/ops/test_torch_private_apis.py, which fails with its name if a torch release drops
# or changes it. Without it every call takes the custom op (correct, only slower).
_dispatch_stack_len = getattr(torch._C, "_len_torch_dispatch_stack", None)


def direct_call_ok(*tensors: Tensor | None) -> bool:
    """Whether an eager call may run a launcher directly instead of through its custom op.

    The custom op exists for tracing (``torch.compile(fullgraph=True)``, ``torch.jit.trace``, FakeTensor,
    ``make_fx``) and for the autograd of inputs that require grad; around a short kernel its dispatch
    costs as much as the kernel. So only a call outside any tracer or dispatch mode, on plain tensors none of
    which requires grad, skips it.
    """
    if _dispatch_stack_len is None or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if _dispatch_stack_len() > 0:
        return False
    return all(t is None or (type(t) is Tensor and not t.requires_grad) for t in tensors)


def gae_launch(
    rewards: Tensor, values: Tensor, mask: Tensor, bootstrap: Tensor | None, gamma: float, lam: float, whiten: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """The body of ``fastppo::gae`` (``bootstrap`` None: none), callable directly when ``direct_call_ok``."""
    mod = _launchers(backend)
    args = (rewards, values, mask, bootstrap, gamma, lam)
    return mod.gae_whiten_forward(*args) if whiten else mod.gae_forward(*args)


@torch.library.custom_op("fastppo::gae", mutates_args=())
def gae_op(
    rewards: Tensor, values: Tensor, mask: Tensor, bootstrap: Tensor, gamma: float, lam: float, whiten: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``(advantages, returns)`` float32 ``[B, T]`` from float32 ``rewards/values [B, T]``, bool ``mask [B, T]``,
    float32 ``bootstrap [B]`` (empty: none). ``whiten`` needs the backend's fused ``gae_whiten_forward``.
    A custom op so that compiled callers trace through it; its backward recomputes the reference (below)."""
    return gae_launch(rewards, values, mask, _opt(bootstrap), gamma, lam, whiten, backend)


@gae_op.register_fake
def _(rewards, values, mask, bootstrap, gamma, lam, whiten, backend):
    return torch.empty_like(rewards, dtype=torch.float32), torch.empty_like(rewards, dtype=torch.float32)


def _gae_setup(ctx, inputs, output):
    rewards, values, mask, bootstrap, gamma, lam, whiten, _backend = inputs
    ctx.save_for_backward(rewards, values, mask, bootstrap)
    ctx.gamma, ctx.lam, ctx.whiten = gamma, lam, whiten


def _gae_backward(ctx, g_adv, g_ret):
    """GAE is linear in rewards, values and bootstrap (whitening aside), so its backward is the vector-Jacobian
    product of the reference recursion (``fastppo.reference.gae``), recomputed here. Advantages and returns are
    usually targets (detached); this keeps a caller that does differentiate through them correct on every
    backend instead of failing inside torch. Not a fast path."""
    from fastppo import reference as ref  # the executable spec (imported late: only a differentiating caller needs it)

    rewards, values, mask, bootstrap = ctx.saved_tensors
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3] and bootstrap.numel() > 0)
    with torch.enable_grad():
        r, v, boot = (t.detach().requires_grad_(n) for t, n in zip((rewards, values, bootstrap), need, strict=True))
        adv, ret = ref.gae(r, v, mask, gamma=ctx.gamma, lam=ctx.lam, bootstrap_value=_opt(boot))
        if ctx.whiten:
            adv = ref.masked_whiten(adv, mask) * mask.to(adv.dtype)
        inputs = [t for t, n in zip((r, v, boot), need, strict=True) if n]
        zeros = torch.zeros_like(adv)
        grads = iter(torch.autograd.grad(
            (adv, ret), inputs, (zeros if g_adv is None else g_adv, zeros if g_ret is None else g_ret),
            allow_unused=True,
        ))
    g_r, g_v, g_boot = (next(grads) if n else None for n in need)
    return g_r, g_v, None, g_boot, None, None, None, None


gae_op.register_autograd(_gae_backward, setup_context=_gae_setup)
