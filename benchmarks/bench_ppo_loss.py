"""Benchmark: the PPO loss from logits ``[B, T, V]``, forward + backward (dlogits).

Objective per valid token (token-mean over the mask): clipped surrogate (clip 0.2) + ``KL_COEF`` * k3 KL to a
reference policy; no entropy bonus (Liger's kernel has none, so every provider computes the same number).
Advantages are per sequence (``[B]`` broadcast over T), which is what Liger's GRPO kernel takes.

Providers: every fastppo backend (``ppo_loss_from_logits``: one pass forward, one read + one write backward),
eager PyTorch (log_softmax + gather + the elementwise formulas), ``torch.compile`` of it, TRL
(``selective_log_softmax`` + the formulas), verl (``logprobs_from_logits`` + ``kl_penalty`` +
``compute_policy_loss_vanilla``), Liger ``GrpoLossFunction`` (GPU), ``LigerFusedLinearGRPOLoss`` (reported
missing: it fuses the lm_head projection, so it takes hidden states, not logits).

Minimum bytes: ``3*N*V*e`` (forward reads logits, backward reads them again and writes dlogits) + ``21N``
(int64 labels, fp32 old/ref logprobs and advantages, a 1-byte mask).
"""

from __future__ import annotations

import torch
from torch import Tensor

import fastppo
from fastppo import reference as ref

from . import bench_logprobs
from .providers import Missing, Provider, compiled, fastppo_backends, fastppo_name, needs_cuda, peer_attr
from .runner import Case, ErrorMeter

OP = "ppo_loss"
CLIP = 0.2
KL_COEF = 0.04


def shapes(device: torch.device, quick: bool) -> list[tuple[int, int]]:
    return bench_logprobs.shapes(device, quick)


def min_bytes(n: int, v: int, dtype: torch.dtype) -> int:
    e = torch.empty((), dtype=dtype).element_size()
    return 3 * n * v * e + 21 * n


def make_inputs(n: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 1) -> dict[str, Tensor]:
    base = bench_logprobs.make_inputs(n, v, dtype, device, seed)
    logits, labels = base["logits"], base["labels"]
    b, t = labels.shape
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    with torch.no_grad():  # the current policy's logprobs, one sequence at a time to bound memory
        lp = torch.stack([ref.token_logprobs(logits[i], labels[i]) for i in range(b)]).cpu()
    # Old and reference logprobs near the current ones (ratios around 1, some clipped), as in a PPO epoch.
    old = lp + 0.15 * torch.randn(b, t, generator=g)
    ref_lp = lp + 0.15 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, generator=g)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]  # right padding, as a batch of responses has
    to = lambda x: x.to(device).contiguous()  # noqa: E731
    return {"logits": logits, "labels": labels, "old": to(old), "ref": to(ref_lp), "adv_seq": to(adv),
            "adv": to(adv[:, None].expand(b, t)), "mask": to(mask)}


def make_check(inputs: dict[str, Tensor]):
    """Error (``ErrorMeter``) of the loss and dlogits vs the reference building blocks in float64, per sequence."""
    logits, labels, mask = inputs["logits"], inputs["labels"], inputs["mask"]
    old, ref_lp, adv = inputs["old"].double(), inputs["ref"].double(), inputs["adv"].double()
    m = mask.double()
    total = m.sum()

    def check(out: dict[str, Tensor]) -> float:
        meter = ErrorMeter()
        loss64 = torch.zeros((), dtype=torch.float64, device=logits.device)
        scale = 0.0
        for i in range(logits.shape[0]):
            x = logits[i].to(torch.float64).requires_grad_(True)
            lp = ref.token_logprobs(x, labels[i])
            pg = ref.ppo_token_terms(lp, old[i], adv[i], clip_low=CLIP)[0]
            kl = ref.kl_penalty(lp, ref_lp[i], "k3")
            # sum over this sequence / all valid tokens: summing these gives the token-mean loss, and the
            # gradient of the piece is the gradient of the whole loss w.r.t. this sequence's logits.
            per_tok = (pg + KL_COEF * kl) * m[i]
            piece = per_tok.sum() / total
            (gx,) = torch.autograd.grad(piece, x)
            loss64 = loss64 + piece.detach()
            scale += float(per_tok.detach().abs().sum() / total)
            meter.add("grad", out["grad"][i], gx)
        # the token-mean can sit near 0; measure it against the mean magnitude of its terms
        meter.add("loss", out["loss"].reshape(()), loss64, scale=scale)
        return meter.value()

    return check


# ------------------------------------------------------------------------------------------------ providers
def eager_ppo_loss(logits: Tensor, labels: Tensor, old: Tensor, ref_lp: Tensor, adv: Tensor, mask: Tensor) -> Tensor:
    """Plain formulas: log_softmax + gather in the logits' dtype, then the clipped surrogate + k3 KL in fp32."""
    lp = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1).float()
    return _loss_from_logprobs(lp, old, ref_lp, adv, mask)


def _loss_from_logprobs(lp: Tensor, old: Tensor, ref_lp: Tensor, adv: Tensor, mask: Tensor) -> Tensor:
    ratio = torch.exp(lp - old)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP))
    d = ref_lp - lp
    kl = torch.exp(d) - d - 1
    m = mask.float()
    return ((pg + KL_COEF * kl) * m).sum() / m.sum()


def _runner(case: Case, fn):
    """Forward + backward: ``fn(logits) -> scalar loss``; returns the loss and dlogits."""
    x0 = case.inputs["logits"]

    def run():
        x = x0.detach().requires_grad_(True)
        loss = fn(x)
        (gx,) = torch.autograd.grad(loss, x)
        return {"loss": loss.detach(), "grad": gx}
    return run


def _args(case: Case) -> tuple[Tensor, ...]:
    i = case.inputs
    return i["labels"], i["old"], i["ref"], i["adv"], i["mask"]


def _eager(case: Case):
    lab, old, ref_lp, adv, mask = _args(case)
    return _runner(case, lambda x: eager_ppo_loss(x, lab, old, ref_lp, adv, mask))


def _compile(case: Case):
    lab, old, ref_lp, adv, mask = _args(case)
    f = compiled(eager_ppo_loss)
    return _runner(case, lambda x: f(x, lab, old, ref_lp, adv, mask))


def _fastppo(backend: str, why: str | None) -> Provider:
    def setup(case: Case):
        if why is not None:
            raise Missing(why)
        lab, old, ref_lp, adv, mask = _args(case)

        def fn(x: Tensor) -> Tensor:
            return fastppo.ppo_loss_from_logits(x, lab, old, adv, mask, ref_logprobs=ref_lp, kl_coef=KL_COEF,
                                                kl_kind="k3", clip_low=CLIP, backend=backend)[0]
        return _runner(case, fn)
    return Provider(fastppo_name(backend), "fastppo", setup)


def _trl(case: Case):
    sls = peer_attr("trl.trainer.utils", "selective_log_softmax")
    lab, old, ref_lp, adv, mask = _args(case)
    return _runner(case, lambda x: _loss_from_logprobs(sls(x, lab).float(), old, ref_lp, adv, mask))


def _verl(case: Case):
    lp_fn = peer_attr("verl.utils.torch_functional", "logprobs_from_logits")
    policy_loss = peer_attr("verl.trainer.ppo.core_algos", "compute_policy_loss_vanilla")
    kl_penalty = peer_attr("verl.trainer.ppo.core_algos", "kl_penalty")
    agg_loss = peer_attr("verl.trainer.ppo.core_algos", "agg_loss")
    actor_config = peer_attr("verl.workers.config", "ActorConfig")
    try:
        cfg = actor_config(strategy="fsdp", clip_ratio=CLIP, ppo_micro_batch_size_per_gpu=1, ppo_mini_batch_size=1,
                           rollout_n=1)
    except Exception as exc:
        raise Missing(f"cannot build verl ActorConfig ({type(exc).__name__}: {exc})") from None
    lab, old, ref_lp, adv, mask = _args(case)

    def fn(x: Tensor) -> Tensor:
        # As verl's actor does it: logprobs (in-place flash-attn backward when no entropy is needed), the
        # vanilla clipped loss (dual clip c=3 always on: inactive at these ratios) and the k3 ("low_var_kl")
        # penalty aggregated token-mean.
        lp = lp_fn(x, lab, inplace_backward=True).float()
        pg, _ = policy_loss(old, lp, adv, mask, loss_agg_mode="token-mean", config=cfg)
        kl = kl_penalty(lp, ref_lp, "low_var_kl")
        return pg + KL_COEF * agg_loss(loss_mat=kl, loss_mask=mask, loss_agg_mode="token-mean")
    if case.device.type == "cuda":
        # flash-attn's in-place backward overwrites the logits: give verl its own copy (copy time included).
        return _runner(case, lambda x: fn(x.clone()))
    return _runner(case, fn)


def _liger(case: Case):
    needs_cuda(case.device, "Liger's Triton GrpoLossFunction")
    grpo = peer_attr("liger_kernel.ops.grpo_loss", "GrpoLossFunction")
    i = case.inputs
    logits = i["logits"]
    # Liger takes logits for T+1 positions (the last one is dropped), like a causal LM's raw output.
    padded = torch.cat([logits, logits[:, -1:]], dim=1).contiguous()
    lab = i["labels"].contiguous()
    mask = i["mask"].long().contiguous()  # TRL hands Liger an int64 attention-style mask

    def run():
        x = padded.detach().requires_grad_(True)
        loss, _, _ = grpo.apply(x, i["old"], i["ref"], lab, i["adv_seq"], mask, 1.0, KL_COEF, CLIP, CLIP, False,
                                "bnpo")
        (gx,) = torch.autograd.grad(loss, x)
        return {"loss": loss.detach(), "grad": gx[:, :-1]}
    return run


def _liger_fused_linear(case: Case):
    needs_cuda(case.device, "LigerFusedLinearGRPOLoss")
    peer_attr("liger_kernel.chunked_loss", "LigerFusedLinearGRPOLoss")
    raise Missing("LigerFusedLinearGRPOLoss fuses the lm_head matmul (takes hidden states + weight, not logits); "
                  "not comparable on a from-logits benchmark")


def providers(device: torch.device) -> list[Provider]:
    out = [Provider("eager", "baseline", _eager), Provider("torch.compile", "baseline", _compile)]
    out += [_fastppo(b, why) for b, why in fastppo_backends("ppo_loss", device)]
    out += [
        Provider("trl", "peer", _trl, "selective_log_softmax + clipped loss + k3"),
        Provider("verl", "peer", _verl, "logprobs_from_logits + compute_policy_loss_vanilla + kl_penalty"),
        Provider("liger", "peer", _liger, "GrpoLossFunction (loss_type=bnpo)"),
        Provider("liger-fused-linear", "peer", _liger_fused_linear, "LigerFusedLinearGRPOLoss"),
    ]
    return out


def cases(device: torch.device, quick: bool, suite: str = "ops"):
    for n, v, dtype in bench_logprobs.grid(device, quick, shapes(device, quick)):
        inputs = make_inputs(n, v, dtype, device)
        b, t = inputs["labels"].shape
        yield Case(suite, OP, "fwd+bwd", device, dtype, {"N": n, "V": v, "B": b, "T": t}, inputs,
                   min_bytes(n, v, dtype), make_check(inputs))
        del inputs
