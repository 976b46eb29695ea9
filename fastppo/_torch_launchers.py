"""The ``torch`` backend's launchers: the launcher protocols of ``fastppo._launchers`` over the plain-PyTorch
reference (``fastppo.reference``), so code that works row by row (the fused LM head's chunks) has one code path for
every backend, and the contract suite checks the reference's row math like every kernel's.

They check the launcher contract of ``fastppo._contract`` as the kernels do, with one difference: float64 logits are
accepted (the reference path of float64 inputs), and then the per-row vectors are float64 too. The public ops over
whole logits tensors call the reference directly on this backend (autograd through the reference).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastppo._contract import DTYPES, NUM_TERMS, check_logits, check_out, check_vector
from fastppo.objective import PPOObjective
from fastppo.reference.logprobs import logprobs_entropy_grad, row_statistics
from fastppo.reference.losses import ppo_term_rows

_DTYPES = (*DTYPES, torch.float64)


def _rows(logits: Tensor, labels: Tensor) -> tuple[Tensor, int, torch.dtype]:
    """``([N, V] view of logits, N, the per-row vectors' dtype)`` after the contract's checks."""
    check_logits(logits, _DTYPES)
    n = logits.shape[0] * logits.shape[1]
    check_vector("labels", labels, (n,), torch.int64, logits.device)
    return logits.reshape(n, logits.shape[2]), n, torch.promote_types(logits.dtype, torch.float32)


class TorchLaunchers:
    """logprobs and ppo_loss (``fastppo._launchers``) in PyTorch; outputs float32 (float64 for float64 logits)."""

    kind = "torch"

    def logprobs_forward(self, logits: Tensor, labels: Tensor, temperature: float, with_entropy: bool
                         ) -> tuple[Tensor, Tensor | None, Tensor]:
        x, _, _ = _rows(logits, labels)
        logp, ent, lse = row_statistics(x, labels, temperature=temperature)
        return logp, (ent if with_entropy else None), lse

    def logprobs_backward(self, logits: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor | None,
                          grad_logp: Tensor | None, grad_entropy: Tensor | None, temperature: float, out: Tensor
                          ) -> Tensor:
        x, n, vec = _rows(logits, labels)
        check_out(out, logits)
        if grad_entropy is not None and entropy is None:
            raise ValueError("grad_entropy needs the forward entropy")
        for name, t in (("lse", lse), ("entropy", entropy), ("grad_logp", grad_logp), ("grad_entropy", grad_entropy)):
            if t is not None:
                check_vector(name, t, (n,), vec, logits.device)
        dx = logprobs_entropy_grad(x, labels, lse, entropy, grad_logp, grad_entropy, temperature=temperature)
        out.copy_(dx.view(out.shape))  # every read of the logits is done: out may be the logits themselves
        return out

    def ppo_loss_forward(self, logits: Tensor, labels: Tensor, old_logp: Tensor, adv: Tensor, ref_logp: Tensor | None,
                         mask: Tensor, objective: PPOObjective) -> Tensor:
        x, n, vec = _rows(logits, labels)
        for name, t in (("old_logp", old_logp), ("adv", adv), ("ref_logp", ref_logp), ("mask", mask)):
            if t is not None:
                check_vector(name, t, (n,), vec, logits.device)
        if n == 0:
            return x.new_zeros((NUM_TERMS, 0), dtype=vec)
        logp, ent, lse = row_statistics(x, labels, temperature=objective.temperature)
        return ppo_term_rows(logp, ent, lse, old_logp, adv, ref_logp, mask, objective)


LAUNCHERS = TorchLaunchers()
