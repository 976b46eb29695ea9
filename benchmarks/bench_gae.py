"""Benchmark: generalised advantage estimation over ``[B, T]`` (forward only; GAE is computed without grad).

Inputs: per-token rewards and values, a right-padded response mask (lengths in ``[T/2, T]``), gamma=1,
lambda=0.95 (the RLHF defaults). All providers agree on valid tokens for right-padded masks; errors are
measured there only.

Providers: every fastppo backend (``torch`` is the reference loop vectorised over the batch; ``cpp`` and
``triton`` are scans), eager PyTorch (the classic reversed Python loop TRL's PPOTrainer used, masked values and
rewards zeroed first), verl ``compute_gae_advantage_return`` (its loop; it also whitens the advantages, so its
advantages are checked against the whitened reference), OpenRLHF ``get_advantages_and_returns``; ``copy``, a
device copy of ``min_bytes`` (``copy_baseline``), the bandwidth yardstick; ``row-serial``, a Triton kernel with
one program per sequence walking T serially (``gae_row_serial``, GPU only), the naive GPU port.
``torch.compile`` of the loop is reported as skipped: dynamo unrolls all T steps, so compile time grows with T.

Minimum bytes: ``17*B*T`` (read fp32 rewards and values and a 1-byte mask, write fp32 advantages and returns).
"""

from __future__ import annotations

import torch
from torch import Tensor

import fastppo
from fastppo import reference as ref

from .copy_baseline import copy_provider
from .providers import Missing, Provider, Skipped, fastppo_backends, fastppo_name, openrlhf_gae, peer_attr
from .runner import Case, ErrorMeter

OP = "gae"
GAMMA = 1.0
LAM = 0.95


def shapes(device: torch.device, quick: bool) -> list[tuple[int, int]]:
    """``[(B, T)]``: many short, fewer medium, few very long responses (256k tokens each)."""
    if quick:
        return [(32, 512)]
    return [(256, 1024), (64, 4096), (4, 16384)]


def min_bytes(b: int, t: int) -> int:
    return 17 * b * t


def make_inputs(b: int, t: int, device: torch.device, seed: int = 4) -> dict[str, Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    rewards = 0.1 * torch.randn(b, t, generator=g)  # per-token KL penalties ...
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    rewards[torch.arange(b), lengths - 1] += torch.randn(b, generator=g)  # ... plus a score on the last token
    values = torch.randn(b, t, generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    rewards = rewards * mask
    return {"rewards": rewards.to(device), "values": values.to(device), "mask": mask.to(device)}


def make_check(inputs: dict[str, Tensor]):
    mask = inputs["mask"]
    adv64, ret64 = ref.gae(inputs["rewards"].double(), inputs["values"].double(), mask, gamma=GAMMA, lam=LAM)
    white64 = ref.masked_whiten(adv64, mask)

    def check(out: dict[str, Tensor]) -> float:
        exp_adv = white64 if out.get("whitened") is not None else adv64
        meter = ErrorMeter()
        meter.add("adv", out["adv"], exp_adv, mask)
        meter.add("ret", out["ret"], ret64, mask)
        return meter.value()

    return check


def eager_gae(rewards: Tensor, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The classic loop (TRL's former PPOTrainer): values/rewards zeroed past the response, then reversed."""
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    t_len = rewards.shape[1]
    last = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(t_len)):
        next_v = values[:, t + 1] if t < t_len - 1 else 0.0
        delta = rewards[:, t] + GAMMA * next_v - values[:, t]
        last = delta + GAMMA * LAM * last
        out.append(last)
    adv = torch.stack(out[::-1], dim=1)
    return adv, adv + values


def _run(fn, whitened: bool = False):
    def run():
        with torch.no_grad():
            adv, ret = fn()
        out = {"adv": adv, "ret": ret}
        if whitened:
            out["whitened"] = adv
        return out
    return run


def _fastppo(backend: str, why: str | None) -> Provider:
    def setup(case: Case):
        if why is not None:
            raise Missing(why)
        i = case.inputs
        return _run(lambda: fastppo.gae(i["rewards"], i["values"], i["mask"], gamma=GAMMA, lam=LAM, backend=backend))
    return Provider(fastppo_name(backend), "fastppo", setup)


def _eager(case: Case):
    i = case.inputs
    return _run(lambda: eager_gae(i["rewards"], i["values"], i["mask"]))


def _row_serial_fn(inputs: dict[str, Tensor]):
    from .gae_row_serial import gae_row_serial

    i = inputs
    return lambda: gae_row_serial(i["rewards"], i["values"], i["mask"], gamma=GAMMA, lam=LAM)


def _row_serial(case: Case):
    if case.device.type != "cuda":
        raise Missing("a Triton kernel: runs on CUDA (on CPU only under TRITON_INTERPRET=1, a debugging mode, "
                      "not timed)")
    try:
        fn = _row_serial_fn(case.inputs)
    except ImportError as exc:
        raise Missing(f"cannot import triton ({exc})") from None
    return _run(fn)


def _compile(case: Case):
    raise Skipped("torch.compile unrolls the T-step Python loop (compile time grows with T)")


def _verl(case: Case):
    fn = peer_attr("verl.trainer.ppo.core_algos", "compute_gae_advantage_return")
    i = case.inputs
    m = i["mask"].float()
    return _run(lambda: fn(i["rewards"], i["values"], m, GAMMA, LAM), whitened=True)


def _openrlhf(case: Case):
    fn = openrlhf_gae()
    i = case.inputs
    m = i["mask"].float()
    return _run(lambda: fn(i["values"], i["rewards"], m, GAMMA, LAM))


def providers(device: torch.device) -> list[Provider]:
    out = [Provider("eager", "baseline", _eager), Provider("torch.compile", "baseline", _compile), copy_provider(),
           Provider("row-serial", "baseline", _row_serial, "Triton, one program per sequence walking T serially")]
    out += [_fastppo(b, why) for b, why in fastppo_backends("gae", device)]
    out += [
        Provider("verl", "peer", _verl, "compute_gae_advantage_return (includes whitening)"),
        Provider("openrlhf", "peer", _openrlhf, "get_advantages_and_returns"),
    ]
    return out


def cases(device: torch.device, quick: bool, suite: str = "gae"):
    for b, t in shapes(device, quick):
        inputs = make_inputs(b, t, device)
        yield Case(suite, OP, "fwd", device, torch.float32, {"N": b * t, "B": b, "T": t}, inputs,
                   min_bytes(b, t), make_check(inputs))
