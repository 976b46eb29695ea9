"""Autograd glue of the fused LM head: chunked over tokens, the ``[N, V]`` logits never exist at once.

Per chunk of ``C`` rows: ``logits_c = h_c @ W.T (+ b)`` (one matmul into a ``[C, V]`` buffer, the inputs' dtype),
then the row kernels of the chosen backend (``logprobs_forward`` / ``ppo_loss_forward`` / ``logprobs_backward``
of the launcher contract in ``fastppo/autograd.py``; on ``torch`` the same formulas in PyTorch) compute the
per-token outputs and, when a gradient is wanted, write dlogits over that same buffer; then
``dh_c = dlogits_c @ W``, ``dW += dlogits_c.T @ h_c``, ``db += dlogits_c.sum(0)``. Memory is ``O(C * V)`` plus
the gradients themselves, on every backend.

- ``fastppo::linear_logprobs`` returns per-token outputs, so the upstream gradient is any ``[N]`` vector: the
  backward recomputes each chunk's logits (four matmuls in all).
- ``fastppo::linear_ppo_loss`` returns the aggregated scalar loss. Aggregation is linear (``sum(w * loss_tok)``),
  so the gradient is known up to the scalar upstream gradient during the forward: it is computed there (three
  matmuls in all, each chunk's logits read twice while hot) and the backward only scales it.
- ``linear_sequence_pass``: the same three matmuls for an objective with per-sequence statistics (GSPO, the
  off-policy mask), each chunk holding whole sequences so that its share of the loss is known once its rows are.

Weight-gradient accumulation is float32 (bf16/fp16 weights: a float32 accumulator, cast once at the end).
Chunk size: ``chunk_rows`` (a function of V, H, dtype, device and a memory budget, never of N).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fastppo import _dispatch
from fastppo._contract import PPO_TERMS, kernel_epilogue_supports
from fastppo._contract import TERM as _T
from fastppo.objective import PPOObjective
from fastppo.reference.losses import ppo_term_rows
from fastppo.reference.sampling import support_threshold

# Memory for one chunk's logits (plus its fp32 hidden-sized rows) when the caller names no chunk size. CPU: every
# chunk reads W twice and reads + writes the dW accumulator, so small chunks turn the three matmuls memory-bound
# (measured at N=1024, H=512, V=151936 fp32 on 2 cores: 1.7x the matmul floor at 32 MiB = 56 rows, 1.1-1.2x at
# 150-220 MiB); 192 MiB stays well under the weight gradient + one sequence's logits that Liger's chunked loss
# holds. GPU: large enough that each matmul keeps the tensor cores busy.
DEFAULT_BUDGET_BYTES = {"cpu": 192 * 2**20, "cuda": 512 * 2**20}


# The ``torch`` backend's row math holds about five float32 copies of a chunk (scaled logits, log-probs,
# probabilities, products) where the kernels hold none: it gets this fraction of the budget, so its peak stays near
# theirs (measured at N=1024, H=512, V=151936 fp32: 1676 MiB peak extra with the full 192 MiB budget).
TORCH_PATH_BUDGET_SHARE = 0.25


def chunk_rows(v: int, h: int, dtype: torch.dtype, device: torch.device, budget_bytes: int | None = None,
               backend: str | None = None) -> int:
    """Tokens per chunk: as many ``[V]`` logits rows (+ an fp32 ``[H]`` row) as fit in ``budget_bytes``
    (default: the device's ``DEFAULT_BUDGET_BYTES``, a quarter of it for ``backend="torch"``).

    A function of V, H, dtype and device (and the budget) only, never of the number of tokens, so a token's result
    does not depend on what else is in the batch. Rounded down to a multiple of 8 (matmul tiles) when >= 8.
    """
    if budget_bytes is None:
        budget_bytes = DEFAULT_BUDGET_BYTES.get(device.type, DEFAULT_BUDGET_BYTES["cuda"])
        if backend == "torch":
            budget_bytes = int(budget_bytes * TORCH_PATH_BUDGET_SHARE)
    per_row = v * torch.empty((), dtype=dtype).element_size() + 4 * h
    rows = max(1, int(budget_bytes) // per_row)
    return rows - rows % 8 if rows >= 8 else rows


def _empty(like: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return like.new_empty((0,), dtype=dtype)


def _opt(t: Tensor) -> Tensor | None:
    return t if t.numel() > 0 else None


def _launchers(backend: str):
    mod = _dispatch.launcher_module(backend)
    if mod is None:
        raise _dispatch.BackendUnavailableError(f"backend {backend!r} has no launchers loaded")
    return mod


Support = tuple[int, float]  # (top_k, top_p): (0, 1.0) is the full vocabulary
FULL: Support = (0, 1.0)


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float = 1.0,
                  support: Support = FULL) -> Tensor:
    """``[C, H] -> [C, V]`` logits of one chunk in the inputs' dtype (one BLAS call); with a truncated ``support``
    (top-k / top-p) the tokens outside it are set to ``-inf`` in place (the chunk's buffer is ours), so the row
    kernels compute the renormalised log-probs and give those tokens zero gradient."""
    x = torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())
    top_k, top_p = support
    if top_k > 0 or top_p < 1.0:
        z = x.to(torch.promote_types(x.dtype, torch.float32)) / temperature
        x.masked_fill_(z < support_threshold(z, top_k, top_p).unsqueeze(-1), float("-inf"))
    return x


# ------------------------------------------------------------------------------ row work on one chunk's buffer
def rows_forward(x: Tensor, labels: Tensor, temperature: float, with_entropy: bool, backend: str
                 ) -> tuple[Tensor, Tensor | None, Tensor]:
    """``x [C, V]`` logits -> ``(logp [C], entropy [C] | None, lse [C])`` (the backend's ``logprobs_forward``)."""
    return _launchers(backend).logprobs_forward(x.unsqueeze(0), labels, temperature, with_entropy)


def rows_backward_(x: Tensor, labels: Tensor, lse: Tensor, ent: Tensor | None, g_lp: Tensor | None,
                   g_h: Tensor | None, temperature: float, backend: str) -> None:
    """Overwrite ``x [C, V]`` with dlogits for per-token grads ``g_lp``, ``g_h`` (``[C]``, None: zero)."""
    x3 = x.unsqueeze(0)
    _launchers(backend).logprobs_backward(x3, labels, lse, ent, g_lp, g_h, temperature, x3)


@dataclass(frozen=True)
class TokenRows:
    """The per-token inputs of the fused LM head's PPO loss, ``[N]`` each: labels (int64), old log-probs (None:
    on-policy, each token's own), advantages, reference log-probs (None: none), mask, the aggregation weights of the
    policy and KL terms and of the entropy (``loss = sum(weights * (pg + kl_coef kl)) - entropy_coef *
    sum(entropy_weights * H)``), and the rollout-correction weights (None: none)."""

    labels: Tensor
    old: Tensor | None
    adv: Tensor
    ref: Tensor | None
    mask: Tensor
    weights: Tensor
    entropy_weights: Tensor
    is_weight: Tensor | None

    def take(self, index: Tensor | slice) -> TokenRows:
        """The rows at ``index`` (a slice: views; an index tensor: copies)."""
        if isinstance(index, slice):
            pick = lambda t: None if t is None else t[index]  # noqa: E731
        else:
            pick = lambda t: None if t is None else t.index_select(0, index)  # noqa: E731
        return TokenRows(*(pick(getattr(self, f.name)) for f in dataclasses.fields(self)))


def _rows_loss_and_grads(t: Tensor, rows: TokenRows, obj: PPOObjective) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(loss [], g_lp [C], g_h [C] | None)`` of a chunk's terms: the weighted sum of its policy, KL and entropy
    terms and its derivatives w.r.t. each token's log-prob and entropy."""
    w, w_h = rows.weights.to(t.dtype), rows.entropy_weights.to(t.dtype)
    loss = (w * t[_T["pg"]]).sum()
    d_lp = t[_T["dpg"]]
    if obj.kl_coef != 0.0:  # kl_coef == 0: no 0 * inf = NaN from an infinite dkl (k2 at ref = -inf)
        loss = loss + obj.kl_coef * (w * t[_T["kl"]]).sum()
        d_lp = d_lp + obj.kl_coef * t[_T["dkl"]]
    g_h = None
    if obj.entropy_coef != 0.0:
        loss = loss - obj.entropy_coef * (w_h * t[_T["entropy"]]).sum()
        g_h = (w_h * -obj.entropy_coef).contiguous()
    return loss, (w * d_lp).contiguous(), g_h


def chunk_terms(x: Tensor, rows: TokenRows, obj: PPOObjective, backend: str) -> Tensor:
    """The terms ``[len(PPO_TERMS), C]`` of one chunk's logits ``x [C, V]``: the backend's fused epilogue
    (``ppo_loss_forward``) where it computes the objective, else the backend's row statistics and the reference's
    per-token math (``ppo_term_rows``); ``rows.old`` None: the chunk's own log-probs."""
    old = rows_forward(x, rows.labels, obj.temperature, False, backend)[0] if rows.old is None else rows.old
    if kernel_epilogue_supports(obj) and rows.is_weight is None:
        return _launchers(backend).ppo_loss_forward(x.unsqueeze(0), rows.labels, old, rows.adv, rows.ref, rows.mask,
                                                    obj)
    logp, ent, lse = rows_forward(x, rows.labels, obj.temperature, True, backend)
    return ppo_term_rows(logp, ent, lse, old, rows.adv, rows.ref, rows.mask, obj, is_weight=rows.is_weight)


@dataclass(frozen=True)
class NeedGrads:
    """Which gradients a chunked pass computes: hidden, weight, bias."""

    hidden: bool
    weight: bool
    bias: bool

    def any(self) -> bool:
        return self.hidden or self.weight or self.bias


# ------------------------------------------------------------------------------------- tiled Triton kernel
def use_tiled(backend: str, support: Support = FULL) -> bool:
    """Whether the tiled Triton kernel (``kernels/linear.py``: logits tiles never written to memory) replaces the
    chunked path. ``FASTPPO_LM_HEAD``: ``chunked`` / ``tiled`` / ``auto`` (default). ``auto`` keeps the chunked
    path: the tiled kernel is only chosen where a GPU benchmark has shown it faster, and none has yet."""
    mode = os.environ.get("FASTPPO_LM_HEAD", "auto").strip().lower() or "auto"
    if mode not in ("auto", "chunked", "tiled"):
        raise ValueError(f"FASTPPO_LM_HEAD must be auto, chunked or tiled, got {mode!r}")
    if mode != "tiled":
        return False
    if support != FULL:
        raise NotImplementedError("FASTPPO_LM_HEAD=tiled computes the full-vocabulary softmax only; top_k/top_p need "
                                  "the chunked path (FASTPPO_LM_HEAD=chunked or auto)")
    if backend != "triton" or not _dispatch.implements("triton", "linear_tiled"):
        raise _dispatch.BackendUnavailableError(
            f"FASTPPO_LM_HEAD=tiled needs backend='triton' with the tiled kernels (this call runs on {backend!r})")
    return True


# --------------------------------------------------------------------------------------------- chunk driver
class _GradSink:
    """The three gradients of one chunked pass: ``dh [N, H]`` (rows written per chunk), ``dW [V, H]`` and
    ``db [V]`` accumulated over chunks (fp32 accumulators for low-precision weights, cast once in ``result``)."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, n_chunks: int, need: NeedGrads) -> None:
        need_w, need_b = need.weight, need.bias
        self.dh = torch.empty_like(hidden) if need.hidden else None
        # One chunk: the matmul's own fp32 accumulation and a single rounding, exactly like unchunked PyTorch.
        self.acc_dtype = weight.dtype if n_chunks <= 1 or weight.dtype == torch.float64 else torch.float32
        self.need_w = need_w
        self.dw: Tensor | None = None  # the first chunk's product initialises it (no zero-fill pass over [V, H])
        self.db = torch.zeros(weight.shape[0], dtype=torch.promote_types(weight.dtype, torch.float32),
                              device=weight.device) if need_b and bias is not None else None
        self.weight, self.bias = weight, bias

    def add(self, s: int, e: int, dl: Tensor, h: Tensor) -> None:
        if self.dh is not None:
            torch.mm(dl, self.weight, out=self.dh[s:e])
        if self.need_w:
            if self.dw is None:
                self.dw = torch.mm(dl.t(), h).to(self.acc_dtype)
            elif self.dw.dtype == dl.dtype:
                self.dw.addmm_(dl.t(), h)
            else:
                self.dw.add_(torch.mm(dl.t(), h))
        if self.db is not None:
            self.db.add_(dl.sum(0, dtype=self.db.dtype))

    def result(self) -> tuple[Tensor, Tensor, Tensor]:
        dh = self.dh if self.dh is not None else _empty(self.weight, self.weight.dtype)
        if self.need_w and self.dw is None:  # no chunk at all (N = 0)
            self.dw = torch.zeros(self.weight.shape, dtype=self.weight.dtype, device=self.weight.device)
        dw = self.dw.to(self.weight.dtype) if self.dw is not None else _empty(self.weight, self.weight.dtype)
        db = self.db.to(self.bias.dtype) if self.db is not None else _empty(self.weight, self.weight.dtype)
        self.dh = self.dw = self.db = None  # the caller owns them now (no second reference keeps fp32 copies)
        return dh, dw, db


def valid_rows_on_cpu(mask: Tensor) -> Tensor | None:
    """Indices ``[M]`` of the valid (non-zero) entries of ``mask`` (flattened), when only those tokens should go
    through the LM head: on CPU, where finding them is free on the host (on a GPU it would sync it), and when some
    but not all are valid. Else None: compute every row."""
    if mask.device.type != "cpu":
        return None
    keep = (mask.reshape(-1) != 0).nonzero().squeeze(1)
    return keep if 0 < keep.numel() < mask.numel() else None


def _rows_with_gradient(g_lp: Tensor | None, g_h: Tensor | None) -> Tensor | None:
    """``valid_rows_on_cpu`` of the rows whose upstream log-prob or entropy gradient is not 0 (NaN counts as not
    0); None where every row (or none) has one, or off CPU."""
    grads = [g for g in (g_lp, g_h) if g is not None]
    if not grads:
        return None
    nonzero = grads[0] != 0
    for g in grads[1:]:
        nonzero = nonzero | (g != 0)
    return valid_rows_on_cpu(nonzero)


def _chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def _empty_grads(hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # three distinct empties: custom-op outputs may not alias each other
    return tuple(_empty(hidden, hidden.dtype) for _ in range(3))  # type: ignore[return-value]


def linear_logprobs_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float,
                            with_entropy: bool, chunk: int, backend: str, support: Support = FULL
                            ) -> tuple[Tensor, Tensor | None, Tensor]:
    """``hidden [N, H]`` -> ``(logp [N], entropy [N] | None, lse [N])`` float32 (float64 for float64 inputs)."""
    if use_tiled(backend, support):
        return _launchers("triton").linear_forward(hidden, weight, bias, labels, temperature, with_entropy)
    n = hidden.shape[0]
    out_dtype = torch.promote_types(hidden.dtype, torch.float32)
    logp = hidden.new_empty((n,), dtype=out_dtype)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if with_entropy else None
    for s, e in _chunks(n, chunk):
        x = _chunk_logits(hidden[s:e], weight, bias, temperature, support)
        lp, h, ls = rows_forward(x, labels[s:e], temperature, with_entropy, backend)
        logp[s:e], lse[s:e] = lp, ls
        if ent is not None:
            ent[s:e] = h
        del x
    return logp, ent, lse


def linear_logprobs_backward(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, lse: Tensor,
                             ent: Tensor | None, g_lp: Tensor | None, g_h: Tensor | None, temperature: float,
                             chunk: int, backend: str, need: NeedGrads, support: Support = FULL,
                             fresh_lse: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Recompute each chunk's logits, dlogits over them, then ``(dh, dW, db)`` (empty where not needed).

    On CPU only the rows with a non-zero upstream gradient are recomputed: a row whose log-prob and entropy
    gradients are both 0 (a masked token, e.g. the prompt positions a trainer scores and then drops) has dlogits
    exactly 0, so it adds nothing to dW or db and its dh row is 0. Those rows' logits then come from a GEMM of
    another shape than the forward's, which rounds differently, so their log-sum-exp and entropy are recomputed
    from the new logits (``fresh_lse``): the softmax then sums to 1 over exactly the logits it is applied to, and an
    exactly-zero gradient (a one-token support) stays exactly zero."""
    if use_tiled(backend, support):
        grads = _launchers("triton").linear_backward(hidden, weight, bias, labels, lse, ent, g_lp, g_h, temperature,
                                                     need.hidden, need.weight, need.bias)
        return tuple(_empty(hidden, hidden.dtype) if g is None else g for g in grads)
    keep = _rows_with_gradient(g_lp, g_h)
    if keep is not None:
        take = lambda t: None if t is None else t.index_select(0, keep)  # noqa: E731
        dh_k, dw, db = linear_logprobs_backward(take(hidden), weight, bias, take(labels), take(lse), take(ent),
                                                take(g_lp), take(g_h), temperature, chunk, backend, need, support,
                                                fresh_lse=True)
        dh = dh_k
        if dh_k.numel() > 0:
            dh = hidden.new_zeros(hidden.shape)
            dh[keep] = dh_k
        return dh, dw, db
    n = hidden.shape[0]
    spans = _chunks(n, chunk)
    sink = _GradSink(hidden, weight, bias, len(spans), need)
    for s, e in spans:
        x = _chunk_logits(hidden[s:e], weight, bias, temperature, support)
        lse_c, ent_c = lse[s:e], None if ent is None else ent[s:e]
        if fresh_lse:
            _, ent_c, lse_c = rows_forward(x, labels[s:e], temperature, ent is not None, backend)
        rows_backward_(x, labels[s:e], lse_c, ent_c,
                       None if g_lp is None else g_lp[s:e], None if g_h is None else g_h[s:e], temperature, backend)
        sink.add(s, e, x, hidden[s:e])
        del x
    return sink.result()


def linear_ppo_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, rows: TokenRows, objective: PPOObjective,
                       chunk: int, backend: str, need: NeedGrads) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss [], terms [len(PPO_TERMS), N], dh, dW, db)`` of a token-separable objective: the weighted sum of the
    terms (``_rows_loss_and_grads``) and its gradients for a unit upstream gradient (empty where not needed).
    ``rows.old`` None: on-policy, each token's old log-prob is its own log-prob (ratio 1), as TRL does when the
    update is exactly on-policy.

    On CPU only the valid (mask != 0) tokens go through the LM head: a masked token's terms and gradient are 0
    whatever its logits, so padding costs no matmul (finding the valid rows is free on the host; on a GPU it would
    be a sync, so there every row is computed)."""
    keep = valid_rows_on_cpu(rows.mask)
    if keep is None:
        return _linear_ppo_rows(hidden, weight, bias, rows, objective, chunk, backend, need)
    loss, t_k, dh_k, dw, db = _linear_ppo_rows(hidden.index_select(0, keep), weight, bias, rows.take(keep), objective,
                                               chunk, backend, need)
    terms = t_k.new_zeros((t_k.shape[0], hidden.shape[0]))
    terms[:, keep] = t_k
    dh = dh_k
    if dh_k.numel() > 0:
        dh = hidden.new_zeros(hidden.shape)
        dh[keep] = dh_k
    return loss, terms, dh, dw, db


def _linear_ppo_rows(hidden: Tensor, weight: Tensor, bias: Tensor | None, rows: TokenRows, objective: PPOObjective,
                     chunk: int, backend: str, need: NeedGrads) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``linear_ppo_forward`` over every row given."""
    obj = objective
    support = (obj.top_k, obj.top_p)
    if use_tiled(backend, support):
        mod = _launchers("triton")
        logp, ent, lse = mod.linear_forward(hidden, weight, bias, rows.labels, obj.temperature, True)
        terms = ppo_term_rows(logp, ent, lse, logp if rows.old is None else rows.old, rows.adv, rows.ref, rows.mask,
                              obj, is_weight=rows.is_weight)
        loss, g_lp, g_h = _rows_loss_and_grads(terms, rows, obj)
        grads = (None, None, None)
        if need.any():
            grads = mod.linear_backward(hidden, weight, bias, rows.labels, lse, ent, g_lp, g_h, obj.temperature,
                                        need.hidden, need.weight, need.bias)
        return (loss, terms, *(_empty(hidden, hidden.dtype) if g is None else g for g in grads))
    n = hidden.shape[0]
    spans = _chunks(n, chunk)
    out_dtype = torch.promote_types(hidden.dtype, torch.float32)
    terms = hidden.new_empty((len(PPO_TERMS), n), dtype=out_dtype)
    loss = hidden.new_zeros((), dtype=out_dtype)
    sink = _GradSink(hidden, weight, bias, len(spans), need) if need.any() else None
    for s, e in spans:
        x = _chunk_logits(hidden[s:e], weight, bias, obj.temperature, support)
        r = rows.take(slice(s, e))
        t = chunk_terms(x, r, obj, backend)
        terms[:, s:e] = t
        loss_c, g_lp, g_h = _rows_loss_and_grads(t, r, obj)
        loss = loss + loss_c
        if sink is not None:
            lse, ent = t[_T["lse"]].contiguous(), t[_T["entropy"]].contiguous()
            rows_backward_(x, r.labels, lse, ent, g_lp, g_h, obj.temperature, backend)
            sink.add(s, e, x, hidden[s:e])
        del x
    if sink is None:
        return (loss, terms, *_empty_grads(hidden))
    return (loss, terms, *sink.result())


# ------------------------------------------------------------ objectives with per-sequence statistics
GroupLoss = Callable[[int, int, Tensor, Tensor], Tensor]


def sequence_groups(valid_per_seq: list[int], chunk: int) -> list[tuple[int, int, int, int]] | None:
    """Consecutive whole sequences packed into chunks of at most ``chunk`` valid tokens: ``[(q0, q1, r0, r1)]``,
    sequences ``q0:q1`` whose valid tokens are rows ``r0:r1`` of the compacted valid rows. None when one sequence
    alone has more valid tokens than a chunk holds (its statistic would need two chunks)."""
    groups: list[tuple[int, int, int, int]] = []
    q0 = r0 = rows = 0
    for q, n in enumerate(valid_per_seq):
        if n > chunk:
            return None
        if rows + n > chunk:
            groups.append((q0, q, r0, r0 + rows))
            q0, r0, rows = q, r0 + rows, 0
        rows += n
    if rows > 0:  # a tail of empty sequences adds nothing to the loss or its gradient
        groups.append((q0, len(valid_per_seq), r0, r0 + rows))
    return groups


def linear_sequence_pass(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, pos: Tensor,
                         seq_len: int, groups: list[tuple[int, int, int, int]], group_loss: GroupLoss,
                         obj: PPOObjective, backend: str, need: NeedGrads
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One pass over the LM head for an objective whose statistics stay inside a sequence (GSPO's sequence ratio,
    the off-policy sequence mask): each chunk holds whole sequences (``sequence_groups``), so once its log-probs
    exist its share of the loss, ``group_loss(q0, q1, logp [q1-q0, T], entropy [q1-q0, T])`` (a leaf each, zero at
    masked tokens; the caller's aggregation weights are batch-wide, so the shares add up to the loss), is known and
    differentiated before the next chunk: three matmuls, as for a token-separable objective, instead of a forward and
    a recomputing backward. ``hidden [M, H]`` and ``labels [M]`` are the valid rows, ``pos [M]`` their flat position
    in the ``[S, T]`` batch. Returns ``(logp [M], entropy [M], lse [M], dh [M, H], dW, db)`` for a unit upstream
    gradient (empty where not needed)."""
    # The matmuls and row kernels are not recorded by autograd (they write into buffers); only each chunk's
    # PyTorch objective is, to differentiate it w.r.t. its log-probs and entropies.
    with torch.no_grad():
        m = hidden.shape[0]
        out_dtype = torch.promote_types(hidden.dtype, torch.float32)
        logp_all, ent_all, lse_all = (hidden.new_empty((m,), dtype=out_dtype) for _ in range(3))
        sink = _GradSink(hidden, weight, bias, len(groups), need)
        for q0, q1, r0, r1 in groups:
            x = _chunk_logits(hidden[r0:r1], weight, bias, obj.temperature, (obj.top_k, obj.top_p))
            lab = labels[r0:r1]
            lp, ent, lse = rows_forward(x, lab, obj.temperature, True, backend)
            logp_all[r0:r1], ent_all[r0:r1], lse_all[r0:r1] = lp, ent, lse
            idx = pos[r0:r1] - q0 * seq_len
            lp_pad, ent_pad = (v.new_zeros((q1 - q0) * seq_len).index_put_((idx,), v).view(q1 - q0, seq_len)
                               .requires_grad_() for v in (lp, ent))
            with torch.enable_grad():
                loss = group_loss(q0, q1, lp_pad, ent_pad)
            g_lp = g_h = None
            if loss.requires_grad:
                d_lp, d_h = torch.autograd.grad(loss, (lp_pad, ent_pad), allow_unused=True)
                g_lp = None if d_lp is None else d_lp.reshape(-1)[idx].contiguous()
                g_h = None if d_h is None else d_h.reshape(-1)[idx].contiguous()
            rows_backward_(x, lab, lse, ent, g_lp, g_h, obj.temperature, backend)
            sink.add(r0, r1, x, hidden[r0:r1])
            del x
        return (logp_all, ent_all, lse_all, *sink.result())


class PrecomputedGrads(torch.autograd.Function):
    """``loss`` (a detached value) attached to ``hidden``, ``weight``, ``bias`` with gradients already computed for
    a unit upstream gradient (``grads = [dh, dW, db]``): the backward scales and hands them out, as
    ``LinearPPOLoss``'s does."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, loss, grads):
        ctx.grads = list(grads)
        ctx.n_inputs = 5
        return loss.clone()

    @staticmethod
    def backward(ctx, g_loss):
        return _ppo_backward(ctx, g_loss)


# ------------------------------------------------------------------------------------------ custom ops
def _b(bias: Tensor) -> Tensor | None:
    return bias if bias.numel() > 0 else None


@torch.library.custom_op("fastppo::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd(
    hidden: Tensor, weight: Tensor, bias: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor, grad_logp: Tensor,
    grad_entropy: Tensor, temperature: float, chunk: int, backend: str, need: list[bool], top_k: int, top_p: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dhidden [N, H], dweight [V, H], dbias [V])`` (empty where not needed) from per-token grads ``[N]``;
    ``need``: [hidden, weight, bias]."""
    return linear_logprobs_backward(hidden, weight, _b(bias), labels, lse, _opt(entropy), _opt(grad_logp),
                                    _opt(grad_entropy), temperature, chunk, backend, NeedGrads(*need), (top_k, top_p))


@linear_logprobs_bwd.register_fake
def _(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, temperature, chunk, backend, need, top_k,
      top_p):
    e = lambda: hidden.new_empty((0,))  # noqa: E731
    return (torch.empty_like(hidden) if need[0] else e(), torch.empty_like(weight) if need[1] else e(),
            torch.empty_like(bias) if need[2] and bias.numel() > 0 else e())


@torch.library.custom_op("fastppo::linear_logprobs", mutates_args=())
def linear_logprobs_op(
    hidden: Tensor, weight: Tensor, bias: Tensor, labels: Tensor, temperature: float, with_entropy: bool, chunk: int,
    backend: str, top_k: int, top_p: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``hidden [N, H], weight [V, H], bias [V] or empty, labels [N] -> (logp [N], entropy [N] or empty, lse [N])``;
    ``top_k`` / ``top_p``: over the sampler's truncated support ((0, 1.0): the whole vocabulary)."""
    logp, ent, lse = linear_logprobs_forward(hidden, weight, _b(bias), labels, temperature, with_entropy, chunk,
                                             backend, (top_k, top_p))
    return logp, (ent if ent is not None else _empty(hidden, logp.dtype)), lse


@linear_logprobs_op.register_fake
def _(hidden, weight, bias, labels, temperature, with_entropy, chunk, backend, top_k, top_p):
    n = hidden.shape[0]
    dt = torch.promote_types(hidden.dtype, torch.float32)
    vec = lambda: hidden.new_empty((n,), dtype=dt)  # noqa: E731
    return vec(), (vec() if with_entropy else hidden.new_empty((0,), dtype=dt)), vec()


def _lp_setup(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, _with_entropy, chunk, backend, top_k, top_p = inputs
    _, ent, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, ent)
    ctx.temperature, ctx.chunk, ctx.backend, ctx.support = temperature, chunk, backend, (top_k, top_p)
    ctx.mark_non_differentiable(lse)


def _lp_backward(ctx, g_logp, g_ent, _g_lse):
    hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and bias.numel() > 0
    vec = lambda g: _empty(lse, lse.dtype) if g is None else g.to(lse.dtype).contiguous()  # noqa: E731
    g_h = vec(g_ent) if ent.numel() > 0 else _empty(lse, lse.dtype)
    dh, dw, db = torch.ops.fastppo.linear_logprobs_bwd(hidden, weight, bias, labels, lse, ent, vec(g_logp), g_h,
                                                       ctx.temperature, ctx.chunk, ctx.backend,
                                                       [need_h, need_w, need_b], *ctx.support)
    return (dh if need_h else None, dw if need_w else None, db if need_b else None) + (None,) * 7


linear_logprobs_op.register_autograd(_lp_backward, setup_context=_lp_setup)


@torch.library.custom_op("fastppo::linear_ppo_loss", mutates_args=())
def linear_ppo_loss_op(
    hidden: Tensor, weight: Tensor, bias: Tensor, labels: Tensor, old_logp: Tensor, adv: Tensor, ref_logp: Tensor,
    mask: Tensor, weights: Tensor, entropy_weights: Tensor, is_weight: Tensor, objective: list[float], chunk: int,
    backend: str, need: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss [], terms [len(PPO_TERMS), N], dh, dW, db)`` over ``hidden [N, H]`` for a token-separable objective
    (a packed ``PPOObjective``); ``weights [N]`` / ``entropy_weights [N]`` aggregate; ``old_logp`` empty: on-policy
    (the tokens' own log-probs); ``ref_logp`` / ``is_weight`` empty: none; ``need``: [hidden, weight, bias]."""
    rows = TokenRows(labels, _opt(old_logp), adv, _opt(ref_logp), mask, weights, entropy_weights, _opt(is_weight))
    return linear_ppo_forward(hidden, weight, _b(bias), rows, PPOObjective.unpack(objective), chunk, backend,
                              NeedGrads(*need))


@linear_ppo_loss_op.register_fake
def _(hidden, weight, bias, labels, old_logp, adv, ref_logp, mask, weights, entropy_weights, is_weight, objective,
      chunk, backend, need):
    dt = torch.promote_types(hidden.dtype, torch.float32)
    e = lambda: hidden.new_empty((0,))  # noqa: E731
    return (hidden.new_empty((), dtype=dt), hidden.new_empty((len(PPO_TERMS), hidden.shape[0]), dtype=dt),
            torch.empty_like(hidden) if need[0] else e(), torch.empty_like(weight) if need[1] else e(),
            torch.empty_like(bias) if need[2] and bias.numel() > 0 else e())




def _ppo_setup(ctx, inputs, output):
    _, terms, dh, dw, db = output
    # Held as plain attributes, not saved tensors: the backward hands them on and drops its reference, so autograd
    # can adopt them as .grad instead of copying (a copy of dW would double the op's peak memory).
    ctx.grads = [dh, dw, db]
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(terms, dh, dw, db)


def _ppo_backward(ctx, g_loss, _g_terms=None, _g_dh=None, _g_dw=None, _g_db=None):
    if ctx.grads is None:
        raise RuntimeError("ppo_loss_from_hidden computed its gradients during the forward and hands them out once; "
                           "a second backward through the same graph (retain_graph=True) is not supported")
    dh, dw, db = ctx.grads
    ctx.grads = None
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    # The forward computed the gradients for a unit upstream gradient; scale them (in place: they are ours).
    # loss.backward() passes 1: on CPU that is checked for free and the pass over dW skipped (no GPU sync).
    unit = g_loss.device.type == "cpu" and not torch.compiler.is_compiling() and bool(g_loss == 1)

    def scaled(t: Tensor, need: bool) -> Tensor | None:
        if not need or t.numel() == 0:
            return None
        return t if unit else t.mul_(g_loss.to(t.dtype))
    out = (scaled(dh, need_h), scaled(dw, need_w), scaled(db, need_b))
    del dh, dw, db
    return out + (None,) * (ctx.n_inputs - 3)


linear_ppo_loss_op.register_autograd(_ppo_backward, setup_context=_ppo_setup)


class LinearPPOLoss(torch.autograd.Function):
    """Eager autograd for ``fastppo::linear_ppo_loss``: returns ``(loss, terms)`` only. The gradients the op computed
    stay inside (not outputs): autograd then adopts the returned dW as ``.grad`` instead of copying it, which it
    does for a custom op's own outputs (measured: one extra weight-sized buffer). ``torch.compile`` traces the
    custom op and its registered autograd instead (``fastppo.linear``)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, *rest):
        loss, terms, dh, dw, db = torch.ops.fastppo.linear_ppo_loss(hidden, weight, bias, *rest)
        ctx.grads = [dh, dw, db]
        ctx.n_inputs = 3 + len(rest)
        ctx.mark_non_differentiable(terms)
        return loss, terms

    @staticmethod
    def backward(ctx, g_loss, _g_terms):
        return _ppo_backward(ctx, g_loss)
