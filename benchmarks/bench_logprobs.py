"""Benchmark: per-token logprobs + entropy from logits ``[B, T, V]`` (forward, and forward + backward).

Providers: every fastppo backend, eager PyTorch (the formulas TRL/verl write: ``log_softmax``+gather and
``logsumexp - sum(softmax*x)`` in the logits' dtype), ``torch.compile`` of those formulas, TRL
``selective_log_softmax`` + ``entropy_from_logits``, verl ``logprobs_from_logits`` + ``entropy_from_logits``,
OpenRLHF ``log_probs_from_logits`` + ``compute_entropy``, flash-attn ``cross_entropy_loss`` (logprobs only);
verl ``linear_cross_entropy`` is listed as missing on a from-logits benchmark (it fuses the lm_head matmul);
``copy``, a device copy of ``min_bytes`` (``copy_baseline``), the bandwidth yardstick.

Minimum bytes (``e`` = bytes per logit, ``N = B*T``):
  fwd      ``N*V*e`` (read logits once) + ``8N`` (int64 labels) + ``8N`` (write fp32 logp and entropy)
  fwd+bwd  ``3*N*V*e`` (forward reads logits, backward reads them again and writes dlogits)
           + ``8N`` labels + ``8N`` outputs + ``8N`` (read the two fp32 upstream gradients)
"""

from __future__ import annotations

import torch
from torch import Tensor

import fastppo
from fastppo import reference as ref

from .copy_baseline import copy_provider
from .providers import (
    Missing,
    Provider,
    Skipped,
    compiled,
    fastppo_backends,
    fastppo_name,
    needs_cuda,
    openrlhf_attr,
    peer_attr,
)
from .runner import Case, ErrorMeter

OP = "logprobs"
MODES = ("fwd", "fwd+bwd")
SEQ_LEN = 1024  # tokens per sequence: N tokens are laid out as [N // T, T]


def shapes(device: torch.device, quick: bool) -> list[tuple[int, int]]:
    """``[(N, V)]``: real vocabularies (Llama-2 32000, Qwen-2 151936) on GPU, small on CPU.

    The full GPU run is one batch of N=16384 tokens (the GPU logprobs targets' shape at V=151936) at both
    vocabularies; more shapes would not fit the one-command GPU run (``gpu_run.sh``) in 10 minutes, as every case
    costs its own ``torch.compile`` and a float64 check of every provider.
    """
    if device.type == "cuda":
        if quick:
            return [(2048, 32000), (2048, 128256)]
        return [(16384, v) for v in (32000, 151936)]
    if quick:
        return [(256, 4096)]
    return [(2048, v) for v in (4096, 16384, 32000)]


DTYPES = (torch.float32, torch.bfloat16)
# On GPU, fp32 logits only up to this many elements (2 GiB): RLHF trainers hold [16k, 152k] logits in bf16
# (10 GB in fp32, and eager fp32 fwd+bwd needs about seven such buffers, more than an 80 GB GPU has).
GPU_FP32_MAX_LOGITS = 16384 * 32000


def dtypes(quick: bool) -> tuple[torch.dtype, ...]:
    """``--quick`` (the CI smoke run) times fp32 only: each dtype costs its own torch.compile (seconds on CPU)."""
    return DTYPES[:1] if quick else DTYPES


def grid(device: torch.device, quick: bool, shape_list: list[tuple[int, int]] | None = None,
         ) -> list[tuple[int, int, torch.dtype]]:
    """``[(N, V, dtype)]`` a logits suite runs: ``shape_list`` (default: ``shapes``) x ``dtypes``, less the GPU
    fp32 cases above ``GPU_FP32_MAX_LOGITS``."""
    if shape_list is None:
        shape_list = shapes(device, quick)
    return [(n, v, dt) for n, v in shape_list for dt in dtypes(quick)
            if not (device.type == "cuda" and dt == torch.float32 and n * v > GPU_FP32_MAX_LOGITS)]


def min_bytes(n: int, v: int, dtype: torch.dtype, mode: str) -> int:
    e = torch.empty((), dtype=dtype).element_size()
    if mode == "fwd":
        return n * v * e + 8 * n + 8 * n
    return 3 * n * v * e + 8 * n + 8 * n + 8 * n


def make_inputs(n: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict[str, Tensor]:
    """Random logits ``[B, T, V]`` at the scale of real LM heads (std 2), labels ``[B, T]``, upstream grads."""
    t = min(n, SEQ_LEN)
    b = n // t
    # Generated on the device itself: GPU-sized logits (16k x 152k) would take long to draw on the host.
    g = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g, device=device) * 2.0).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g, device=device)
    g_logp = torch.randn(b, t, generator=g, device=device)
    g_ent = torch.randn(b, t, generator=g, device=device)
    return {"logits": logits, "labels": labels, "g_logp": g_logp, "g_ent": g_ent}


# ------------------------------------------------------------------------------------------------ reference
def make_check(inputs: dict[str, Tensor], mode: str):
    """Error (``ErrorMeter``) of logp, entropy and (fwd+bwd) dlogits vs fastppo.reference in float64.

    The reference runs on the input as rounded to its dtype (so bf16 providers are judged against exact math on
    the same bf16 numbers), in row chunks of about 256 MiB of float64 so that GPU-sized cases fit.
    """
    logits, labels = inputs["logits"], inputs["labels"]
    v = logits.shape[-1]
    flat = logits.reshape(-1, v)
    lab = labels.reshape(-1)
    g_lp, g_h = inputs["g_logp"].reshape(-1), inputs["g_ent"].reshape(-1)
    rows = max(1, (1 << 25) // v)

    def check(out: dict[str, Tensor]) -> float:
        meter = ErrorMeter()
        lp_out = out.get("logp")
        h_out = out.get("entropy")
        gx_out = out.get("grad")
        for s in range(0, flat.shape[0], rows):
            sl = slice(s, s + rows)
            x = flat[sl].to(torch.float64).requires_grad_(mode != "fwd")
            lp, h = ref.logprobs_and_entropy(x, lab[sl])
            if lp_out is not None:
                meter.add("logp", lp_out.reshape(-1)[sl], lp)
            if h_out is not None:
                meter.add("entropy", h_out.reshape(-1)[sl], h)
            if mode != "fwd":
                if gx_out is None:
                    raise ValueError("fwd+bwd provider returned no gradient")
                # Providers without entropy (flash-attn) are checked against the gradient of logp alone.
                gh = g_h[sl].double() if h_out is not None else torch.zeros_like(h)
                (gx,) = torch.autograd.grad((lp, h), x, (g_lp[sl].double(), gh))
                meter.add("grad", gx_out.reshape(-1, v)[sl], gx)
            if meter.nan:  # no need to look further
                break
        return meter.value()

    return check


# ------------------------------------------------------------------------------------------------ providers
def eager_logprobs_entropy(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The plain formulas as TRL/verl users write them, in the logits' dtype."""
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    p = torch.softmax(logits, dim=-1)
    entropy = torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)
    return logp, entropy


def _runner(case: Case, fn, *, entropy: bool = True, clone_input: bool = False):
    """A zero-arg callable doing fn's forward (no_grad) or forward + backward with the case's upstream grads."""
    x0, labels = case.inputs["logits"], case.inputs["labels"]
    g_lp, g_h = case.inputs["g_logp"], case.inputs["g_ent"]
    if case.mode == "fwd":
        def run():
            with torch.no_grad():
                lp, h = fn(x0, labels)
            return {"logp": lp, "entropy": h} if entropy else {"logp": lp}
        return run

    def run_bwd():
        # Providers whose backward overwrites the logits get their own copy each call (copy time included:
        # it is what their users pay to keep the logits) -- only flash-attn's inplace mode would need it.
        x = (x0.clone() if clone_input else x0).detach().requires_grad_(True)
        lp, h = fn(x, labels)
        if entropy:
            (gx,) = torch.autograd.grad((lp, h), x, (g_lp.to(lp.dtype), g_h.to(h.dtype)))
            return {"logp": lp.detach(), "entropy": h.detach(), "grad": gx}
        (gx,) = torch.autograd.grad(lp, x, g_lp.to(lp.dtype))
        return {"logp": lp.detach(), "grad": gx}
    return run_bwd


def _fastppo(backend: str, why: str | None) -> Provider:
    def setup(case: Case):
        if why is not None:
            raise Missing(why)
        return _runner(case, lambda x, lab: fastppo.logprobs_and_entropy(x, lab, backend=backend))
    return Provider(fastppo_name(backend), "fastppo", setup)


def _fastppo_inplace(backend: str, why: str | None) -> Provider:
    """``inplace_backward=True``: the backward writes dlogits over the logits, so no logits-sized buffer is added.

    The provider owns a copy of the logits made at setup (outside the timed calls and the memory probe, as the
    logits a trainer holds anyway): the first call, whose outputs are checked, reads the case's logits; each
    later call reads the previous call's dlogits (same shape and dtype, finite), which costs the kernels the same
    traffic and math. Forward-only cases are skipped: the flag changes the backward only.
    """
    def setup(case: Case):
        if why is not None:
            raise Missing(why)
        if case.mode == "fwd":
            raise Skipped(f"inplace_backward changes the backward only (forward: {fastppo_name(backend)})")
        buf = case.inputs["logits"].clone()
        labels, g_lp, g_h = case.inputs["labels"], case.inputs["g_logp"], case.inputs["g_ent"]

        def run():
            x = buf.detach().requires_grad_(True)
            lp, h = fastppo.logprobs_and_entropy(x, labels, backend=backend, inplace_backward=True)
            (gx,) = torch.autograd.grad((lp, h), x, (g_lp, g_h))
            return {"logp": lp.detach(), "entropy": h.detach(), "grad": gx}
        return run
    return Provider(inplace_name(backend), "fastppo", setup, "inplace_backward=True: dlogits over the logits")


def inplace_name(backend: str) -> str:
    return f"{fastppo_name(backend)}-inplace"


def _eager(case: Case):
    return _runner(case, eager_logprobs_entropy)


def _compile(case: Case):
    return _runner(case, compiled(eager_logprobs_entropy))


def _trl(case: Case):
    sls = peer_attr("trl.trainer.utils", "selective_log_softmax")
    ent = peer_attr("trl.trainer.utils", "entropy_from_logits")
    return _runner(case, lambda x, lab: (sls(x, lab), ent(x)))


def _verl(case: Case):
    lp = peer_attr("verl.utils.torch_functional", "logprobs_from_logits")
    ent = peer_attr("verl.utils.torch_functional", "entropy_from_logits")
    # verl's actor turns the in-place flash-attn backward off whenever it also computes entropy (both
    # backwards need the logits), so that is how its users run the pair.
    return _runner(case, lambda x, lab: (lp(x, lab, inplace_backward=False), ent(x)))


def _openrlhf(case: Case):
    lp = openrlhf_attr("utils", "log_probs_from_logits")
    ent = openrlhf_attr("utils", "compute_entropy")
    return _runner(case, lambda x, lab: (lp(x, lab), ent(x)))


def _flash_attn(case: Case):
    needs_cuda(case.device, "flash-attn's Triton cross_entropy_loss")
    ce = peer_attr("flash_attn.ops.triton.cross_entropy", "cross_entropy_loss")

    def fn(x: Tensor, lab: Tensor) -> tuple[Tensor, None]:
        v = x.shape[-1]
        losses, _ = ce(x.reshape(-1, v), lab.reshape(-1), inplace_backward=False)
        return (-losses).view(lab.shape), None
    return _runner(case, fn, entropy=False)


def _verl_linear_ce(case: Case):
    needs_cuda(case.device, "verl's Triton linear_cross_entropy")
    peer_attr("verl.utils.kernel.linear_cross_entropy", "linear_cross_entropy")
    raise Missing("linear_cross_entropy fuses the lm_head matmul (takes hidden states + weight, not logits); "
                  "not comparable on a from-logits benchmark")


def providers(device: torch.device) -> list[Provider]:
    out = [Provider("eager", "baseline", _eager), Provider("torch.compile", "baseline", _compile), copy_provider()]
    backends = fastppo_backends("logprobs", device)
    out += [_fastppo(b, why) for b, why in backends]
    # The reference backend ignores inplace_backward and the interpreter is never timed, so only the kernel
    # backends get an in-place row.
    out += [_fastppo_inplace(b, why) for b, why in backends if b not in ("torch", "triton-interpret")]
    out += [
        Provider("trl", "peer", _trl, "selective_log_softmax + entropy_from_logits"),
        Provider("verl", "peer", _verl, "logprobs_from_logits + entropy_from_logits"),
        Provider("openrlhf", "peer", _openrlhf, "log_probs_from_logits + compute_entropy"),
        Provider("flash-attn", "peer", _flash_attn, "cross_entropy_loss: logprobs only, no entropy"),
        Provider("verl-linear-ce", "peer", _verl_linear_ce, "linear_cross_entropy"),
    ]
    return out


def cases(device: torch.device, quick: bool, suite: str = "ops"):
    """Yield ``Case`` objects (inputs are built lazily, one case at a time, to bound memory)."""
    for n, v, dtype in grid(device, quick):
        inputs = make_inputs(n, v, dtype, device)
        b, t = inputs["labels"].shape
        for mode in MODES:
            yield Case(suite, OP, mode, device, dtype, {"N": n, "V": v, "B": b, "T": t}, inputs,
                       min_bytes(n, v, dtype, mode), make_check(inputs, mode))
        del inputs

