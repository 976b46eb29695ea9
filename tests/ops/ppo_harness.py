"""The four PPO loss entry points as one callable, for tests parametrised over them (a one-rank gloo group for the
vocabulary-parallel ones)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist

import fastppo
from fastppo import reference as ref
from fastppo.distributed import vocab_parallel_ppo_loss, vocab_parallel_ppo_loss_from_hidden

B, T, H, V = 3, 5, 8, 37

ENTRIES = [
    pytest.param("logits", "torch", id="logits-torch"),
    pytest.param("logits", "cpp", id="logits-cpp"),
    pytest.param("logits", "triton", id="logits-triton"),
    pytest.param("hidden", "torch", id="hidden-torch"),
    pytest.param("hidden", "cpp", id="hidden-cpp"),
    pytest.param("hidden", "triton", id="hidden-triton"),
    pytest.param("vp_logits", None, id="vocab-parallel-logits"),
    pytest.param("vp_hidden", None, id="vocab-parallel-hidden"),
]


@pytest.fixture(scope="module")
def one_rank_group():
    """A real one-rank gloo process group for the vocabulary-parallel entry points (torn down after the module)."""
    if dist.is_initialized():  # another module left one: use it
        yield
        return
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'store')}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def make_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """Hidden states, an LM-head weight and the per-token inputs of a PPO loss (two padded tokens, one in the last
    row); old/ref/rollout log-probs near the current ones so ratios fall on both sides of the clips."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.7
    labels = torch.randint(0, V, (B, T), generator=g)
    lp = ref.token_logprobs((hidden @ weight.T).double(), labels).float()
    mask = torch.ones(B, T)
    mask[0, -2:] = 0
    mask[2, -1] = 0
    noise = lambda s: s * torch.randn(B, T, generator=g)  # noqa: E731
    return {"hidden": hidden, "weight": weight, "labels": labels, "old": lp + noise(0.2),
            "adv": torch.randn(B, T, generator=g), "ref": lp + noise(0.2), "rollout": lp + noise(0.3), "mask": mask}


def call(entry: str, backend: str | None, x: dict, old=..., adv=..., mask=..., ref_logprobs=..., rollout_logprobs=None,
         **settings):
    """One call of ``entry`` on the inputs ``x`` (``x["logits"]`` if present, else ``hidden @ weight.T``); per-token
    arguments default to ``x``'s."""
    old = x["old"] if old is ... else old
    adv = x["adv"] if adv is ... else adv
    mask = x["mask"] if mask is ... else mask
    ref_lp = x["ref"] if ref_logprobs is ... else ref_logprobs
    kw = {"ref_logprobs": ref_lp, "rollout_logprobs": rollout_logprobs, **settings}
    h, w, lab = x["hidden"], x["weight"], x["labels"]
    if entry == "logits":
        return fastppo.ppo_loss_from_logits(x.get("logits", h @ w.T), lab, old, adv, mask, backend=backend, **kw)
    if entry == "hidden":
        return fastppo.ppo_loss_from_hidden(h, w, lab, old, adv, mask, backend=backend, **kw)
    if entry == "vp_logits":
        return vocab_parallel_ppo_loss(x.get("logits", h @ w.T), lab, old, adv, mask, **kw)
    return vocab_parallel_ppo_loss_from_hidden(h, w, lab, old, adv, mask, **kw)
