"""Benchmark: the clipped PPO value loss over ``[B, T]`` (fwd, fwd+bwd w.r.t. the predicted values).

``0.5 * max((v - R)^2, (old + clamp(v - old, +-CLIP) - R)^2)``, token-mean over the mask. Elementwise: fastppo
runs it in PyTorch on every backend.

Providers: fastppo ``value_loss``, eager PyTorch (the TRL/verl formula), ``torch.compile`` of it, verl
``compute_value_loss``, OpenRLHF ``ValueLoss``.

Minimum bytes (``N = B*T``): fwd ``13N`` (read values, old values, returns in fp32 and a 1-byte mask);
fwd+bwd ``17N`` (plus write d/dvalues; the upstream gradient is a scalar).
"""

from __future__ import annotations

import torch
from torch import Tensor

import fastppo
from fastppo import reference as ref

from . import bench_kl
from .providers import Provider, compiled, fastppo_backends, fastppo_name, openrlhf_attr, peer_attr
from .runner import Case, ErrorMeter

OP = "value_loss"
MODES = ("fwd", "fwd+bwd")
CLIP = 0.2


def shapes(device: torch.device, quick: bool) -> list[tuple[int, int]]:
    return bench_kl.shapes(device, quick)


def min_bytes(n: int, mode: str) -> int:
    return 13 * n if mode == "fwd" else 17 * n


def make_inputs(b: int, t: int, device: torch.device, seed: int = 3) -> dict[str, Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    old = torch.randn(b, t, generator=g)
    values = old + 0.3 * torch.randn(b, t, generator=g)  # some beyond the clip range, some inside
    returns = old + torch.randn(b, t, generator=g)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return {k: x.to(device) for k, x in {"v": values, "old": old, "ret": returns, "mask": mask}.items()}


def make_check(inputs: dict[str, Tensor], mode: str):
    v64 = inputs["v"].double().requires_grad_(mode != "fwd")
    loss64, _ = ref.value_loss(v64, inputs["old"].double(), inputs["ret"].double(), inputs["mask"], clip=CLIP)
    g64 = torch.autograd.grad(loss64, v64)[0] if mode != "fwd" else None

    def check(out: dict[str, Tensor]) -> float:
        meter = ErrorMeter()
        meter.add("loss", out["loss"].reshape(()), loss64.detach())
        if g64 is not None:
            meter.add("grad", out["grad"], g64)
        return meter.value()

    return check


def eager_value_loss(v: Tensor, old: Tensor, ret: Tensor, mask: Tensor) -> Tensor:
    v_clip = old + (v - old).clamp(-CLIP, CLIP)
    per_tok = 0.5 * torch.maximum((v - ret).square(), (v_clip - ret).square())
    m = mask.float()
    return (per_tok * m).sum() / m.sum()


def _runner(case: Case, fn):
    i = case.inputs
    if case.mode == "fwd":
        def run():
            with torch.no_grad():
                return {"loss": fn(i["v"], i["old"], i["ret"], i["mask"])}
        return run

    def run_bwd():
        v = i["v"].detach().requires_grad_(True)
        loss = fn(v, i["old"], i["ret"], i["mask"])
        (gv,) = torch.autograd.grad(loss, v)
        return {"loss": loss.detach(), "grad": gv}
    return run_bwd


def _fastppo(backend: str) -> Provider:
    def fn(v, old, ret, mask):
        return fastppo.value_loss(v, old, ret, mask, clip=CLIP, backend=backend)[0]
    return Provider(fastppo_name(backend), "fastppo", lambda case: _runner(case, fn))


def _verl(case: Case):
    vl = peer_attr("verl.trainer.ppo.core_algos", "compute_value_loss")
    # verl's argument order: (vpreds, returns, values=old values, response_mask, cliprange_value)
    return _runner(case, lambda v, old, ret, mask: vl(v, ret, old, mask, CLIP, loss_agg_mode="token-mean")[0])


def _openrlhf(case: Case):
    cls = openrlhf_attr("loss", "ValueLoss")
    crit = cls(clip_eps=CLIP)
    return _runner(case, lambda v, old, ret, mask: crit(v, old, ret, mask.float()))


def providers(device: torch.device) -> list[Provider]:
    out = [
        Provider("eager", "baseline", lambda case: _runner(case, eager_value_loss)),
        Provider("torch.compile", "baseline", lambda case: _runner(case, compiled(eager_value_loss))),
    ]
    out += [_fastppo(b) for b, _ in fastppo_backends(None, device)]
    out += [
        Provider("verl", "peer", _verl, "compute_value_loss"),
        Provider("openrlhf", "peer", _openrlhf, "ValueLoss"),
    ]
    return out


def cases(device: torch.device, quick: bool, suite: str = "ops"):
    for b, t in shapes(device, quick):
        inputs = make_inputs(b, t, device)
        for mode in MODES:
            yield Case(suite, OP, mode, device, torch.float32, {"N": b * t, "B": b, "T": t}, inputs,
                       min_bytes(b * t, mode), make_check(inputs, mode))
