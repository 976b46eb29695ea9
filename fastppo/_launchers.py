"""The launcher interface, once: one typed protocol per op family, from which dispatch's tables are derived.

Every backend (Triton in ``fastppo.kernels.launchers``, C++ and CUDA through ``fastppo._native_launchers``) exposes
the launchers of the families it implements; a family is implemented when all its launchers are present. Launchers
know nothing of autograd (``fastppo/autograd*.py`` wrap them). Shapes: ``N = B*T`` rows; per-row vectors are
contiguous ``[N]``; ``logits``/``out`` are 3-D ``[B, T, V]`` views with arbitrary strides on B and T and stride 1 on
V; offsets are 64-bit. Inputs are checked with ``fastppo._contract``'s functions and converted by nobody: the public
ops are the one place that reshapes, copies or casts user inputs into this form.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Protocol

from torch import Tensor

if TYPE_CHECKING:
    from fastppo.objective import PPOObjective


class LogprobsLaunchers(Protocol):
    def logprobs_forward(self, logits: Tensor, labels: Tensor, temperature: float, with_entropy: bool
                         ) -> tuple[Tensor, Tensor | None, Tensor]:
        """labels int64 ``[N]`` -> float32 ``(logp, entropy | None, lse)`` ``[N]``: ``lse = logsumexp(x/T)``,
        ``logp = x_t/T - lse``, ``entropy = lse - sum(softmax(x/T) * x/T)``."""

    def logprobs_backward(self, logits: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor | None,
                          grad_logp: Tensor | None, grad_entropy: Tensor | None, temperature: float, out: Tensor
                          ) -> Tensor:
        """Writes ``dx_j = [g_lp*(1[j=t] - p_j) - g_H*p_j*(log p_j + H)] / T`` into ``out`` (``[B, T, V]``, logits'
        dtype; may be ``logits`` itself for the in-place backward) and returns it. Grads float32 ``[N]`` or None
        (zero); rows where both are zero get zeros without computing exp."""


class PPOLossLaunchers(Protocol):
    def ppo_loss_forward(self, logits: Tensor, labels: Tensor, old_logp: Tensor, adv: Tensor, ref_logp: Tensor | None,
                         mask: Tensor, objective: PPOObjective) -> Tensor:
        """float32 ``[N]`` inputs (mask 0/1 as float32), the objective read by field name -> ``terms`` float32
        ``[len(PPO_TERMS), N]`` in ``PPO_TERMS`` order, equal to ``fastppo.reference.losses.ppo_term_rows`` (the
        spec); masked rows are skipped and get zeros in every term."""

    def logprobs_backward(self, logits: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor | None,
                          grad_logp: Tensor | None, grad_entropy: Tensor | None, temperature: float, out: Tensor
                          ) -> Tensor:
        """As in ``LogprobsLaunchers``: the PPO loss's backward is the log-prob/entropy backward."""


class GAELaunchers(Protocol):
    def gae_forward(self, rewards: Tensor, values: Tensor, mask: Tensor, bootstrap: Tensor | None, gamma: float,
                    lam: float) -> tuple[Tensor, Tensor]:
        """float32 contiguous ``[B, T]`` rewards/values, bool ``[B, T]`` mask, float32 ``[B]`` bootstrap or None ->
        float32 ``(advantages, returns) [B, T]`` with the carry-forward semantics of ``fastppo.reference.gae``."""


class GAEWhitenLaunchers(Protocol):
    def gae_whiten_forward(self, rewards: Tensor, values: Tensor, mask: Tensor, bootstrap: Tensor | None,
                           gamma: float, lam: float) -> tuple[Tensor, Tensor]:
        """``gae_forward`` with the advantages whitened over the valid tokens (unbiased variance) in the same
        launch sequence; returns are from the raw advantages."""


class SamplingLaunchers(Protocol):
    def sample_forward(self, logits: Tensor, uniforms: Tensor, temperature: float, top_k: int, top_p: float
                       ) -> Tensor:
        """``logits [B, V]`` (unit stride on V), ``uniforms [B]`` float64 in (0, 1) -> tokens ``[B]`` int64 (the
        inverse-CDF draw of ``fastppo.reference.sampling``)."""


class LinearTiledLaunchers(Protocol):
    def linear_forward(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float,
                       with_entropy: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        """``(logp [N], entropy [N] | None, lse [N])`` float32 of ``softmax((hidden @ weight.T + bias) / T)``."""

    def linear_backward(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, lse: Tensor,
                        entropy: Tensor | None, grad_logp: Tensor | None, grad_entropy: Tensor | None,
                        temperature: float, need_h: bool, need_w: bool, need_b: bool
                        ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(dhidden [N, H], dweight [V, H], dbias [V])`` in the inputs' dtype (None where not needed)."""


FAMILIES: dict[str, type] = {
    "logprobs": LogprobsLaunchers,
    "ppo_loss": PPOLossLaunchers,
    "gae": GAELaunchers,
    "gae_whiten": GAEWhitenLaunchers,
    "sampling": SamplingLaunchers,
    "linear_tiled": LinearTiledLaunchers,  # the tiled fused LM head (Triton only)
}


def launcher_names(protocol: type) -> tuple[str, ...]:
    """The launcher functions a family's protocol declares."""
    return tuple(name for name, _ in inspect.getmembers(protocol, inspect.isfunction) if not name.startswith("_"))


# family -> the launcher names a backend needs to implement it (what dispatch checks)
FAMILY_LAUNCHERS: dict[str, tuple[str, ...]] = {family: launcher_names(p) for family, p in FAMILIES.items()}
ALL_LAUNCHERS: tuple[str, ...] = tuple(sorted({n for names in FAMILY_LAUNCHERS.values() for n in names}))
