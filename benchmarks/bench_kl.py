"""Benchmark: the per-token k3 KL estimate between policy and reference logprobs ``[B, T]`` (fwd, fwd+bwd).

An elementwise op over fp32 vectors: fastppo runs it in PyTorch on every backend (a kernel buys nothing here),
so the interesting rows are the peers' formulations and ``torch.compile``'s fusion.

Providers: fastppo ``kl_penalty(kind="k3")``, eager PyTorch (``exp(ref-lp) - (ref-lp) - 1``, the TRL/GRPO
line), ``torch.compile`` of it, verl ``kl_penalty(..., "low_var_kl")`` (clamped at +-10; inactive at these
inputs), OpenRLHF ``compute_approx_kl(..., kl_estimator="k3")``.

Minimum bytes (fp32, ``N = B*T``): fwd ``12N`` (read two vectors, write one); fwd+bwd ``20N`` (plus read the
upstream gradient and write d/dlogprob).
"""

from __future__ import annotations

import torch
from torch import Tensor

import fastppo
from fastppo import reference as ref

from .providers import Provider, compiled, fastppo_backends, fastppo_name, openrlhf_attr, peer_attr
from .runner import Case, ErrorMeter

OP = "kl"
MODES = ("fwd", "fwd+bwd")


def shapes(device: torch.device, quick: bool) -> list[tuple[int, int]]:
    """``[(B, T)]``: a PPO batch of token logprobs (the GAE shapes, 256k tokens) and a larger one (4x on CPU, 8x
    on GPU). Elementwise ops: only B*T matters, so one shape per size (64 x 4096 would repeat 256 x 1024)."""
    if quick:
        return [(32, 1024)]
    return [(256, 1024), (256, 4096)] if device.type == "cpu" else [(256, 1024), (512, 4096)]


def min_bytes(n: int, mode: str) -> int:
    return 12 * n if mode == "fwd" else 20 * n


def make_inputs(b: int, t: int, device: torch.device, seed: int = 2) -> dict[str, Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    lp = -torch.rand(b, t, generator=g) * 5.0
    ref_lp = lp + 0.3 * torch.randn(b, t, generator=g)
    return {"lp": lp.to(device), "ref": ref_lp.to(device), "g": torch.randn(b, t, generator=g).to(device)}


def make_check(inputs: dict[str, Tensor], mode: str):
    lp64 = inputs["lp"].double().requires_grad_(mode != "fwd")
    kl64 = ref.kl_penalty(lp64, inputs["ref"].double(), "k3")
    g64 = torch.autograd.grad(kl64, lp64, inputs["g"].double())[0] if mode != "fwd" else None

    def check(out: dict[str, Tensor]) -> float:
        meter = ErrorMeter()
        meter.add("kl", out["kl"], kl64)
        if g64 is not None:
            meter.add("grad", out["grad"], g64)
        return meter.value()

    return check


def eager_k3(lp: Tensor, ref_lp: Tensor) -> Tensor:
    d = ref_lp - lp
    return torch.exp(d) - d - 1


def _runner(case: Case, fn):
    lp0, ref_lp, g = case.inputs["lp"], case.inputs["ref"], case.inputs["g"]
    if case.mode == "fwd":
        def run():
            with torch.no_grad():
                return {"kl": fn(lp0, ref_lp)}
        return run

    def run_bwd():
        lp = lp0.detach().requires_grad_(True)
        kl = fn(lp, ref_lp)
        (gl,) = torch.autograd.grad(kl, lp, g)
        return {"kl": kl.detach(), "grad": gl}
    return run_bwd


def _fastppo(backend: str) -> Provider:
    return Provider(fastppo_name(backend), "fastppo",
                    lambda case: _runner(case, lambda lp, r: fastppo.kl_penalty(lp, r, "k3", backend=backend)))


def _verl(case: Case):
    kl = peer_attr("verl.trainer.ppo.core_algos", "kl_penalty")
    return _runner(case, lambda lp, r: kl(lp, r, "low_var_kl"))


def _openrlhf(case: Case):
    kl = openrlhf_attr("utils", "compute_approx_kl")
    return _runner(case, lambda lp, r: kl(lp, r, kl_estimator="k3"))


def providers(device: torch.device) -> list[Provider]:
    out = [
        Provider("eager", "baseline", lambda case: _runner(case, eager_k3)),
        Provider("torch.compile", "baseline", lambda case: _runner(case, compiled(eager_k3))),
    ]
    out += [_fastppo(b) for b, _ in fastppo_backends(None, device)]
    out += [
        Provider("verl", "peer", _verl, "kl_penalty(low_var_kl)"),
        Provider("openrlhf", "peer", _openrlhf, "compute_approx_kl(k3)"),
    ]
    return out


def cases(device: torch.device, quick: bool, suite: str = "ops"):
    for b, t in shapes(device, quick):
        inputs = make_inputs(b, t, device)
        for mode in MODES:
            yield Case(suite, OP, mode, device, torch.float32, {"N": b * t, "B": b, "T": t}, inputs,
                       min_bytes(b * t, mode), make_check(inputs, mode))
