"""The fused LM head's one-pass route for objectives with per-sequence statistics (GSPO, GSPO-token, the off-policy
sequence mask, sequence-level rollout correction): chunks of whole sequences, each chunk's loss share differentiated
in the same pass. It must give the float64 reference's loss, stats and gradients, and so must the two-pass route it
falls back to (a sequence longer than a chunk, the batch-wide top-entropy mask)."""

from __future__ import annotations

import pytest
import torch

import fastppo
import fastppo.linear as linear_mod
from fastppo import PPOObjective
from fastppo import reference as ref
from fastppo.autograd_linear import sequence_groups
from tests.tolerances import assert_close

B, T, H, V = 6, 7, 12, 53
BASE = {"kl_coef": 0.05, "entropy_coef": 0.01, "temperature": 0.9, "kl_kind": "k3"}
SEQUENCE_VARIANTS = {
    "gspo": {"importance_sampling_level": "sequence", "agg": "seq-mean-token-mean"},
    "gspo-token": {"importance_sampling_level": "sequence_token", "clip_high": 0.28},
    "gspo-cispo-dapo": {"policy_loss": "cispo", "importance_sampling_level": "sequence", "clip_low": 1.0,
                        "clip_high": 4.0, "loss_normalizer": 20.0},
    "off-policy-mask": {"off_policy_mask_threshold": 0.02},
    "mis-sequence": {"importance_sampling_level": "sequence", "rollout_is_level": "sequence",
                     "rollout_is_mode": "mask", "rollout_is_min": 0.5, "rollout_is_max": 2.0},
    "sapo-dr-grpo-entropy-token-mean": {"policy_loss": "sapo", "importance_sampling_level": "sequence",
                                        "agg": "seq-mean-token-sum-norm", "max_completion_length": 9,
                                        "entropy_agg": "token-mean"},
}
# (backend, input dtype): torch runs in float64 against the float64 reference; the kernels take float32.
BACKENDS = [("torch", torch.float64), ("cpp", torch.float32), ("triton", torch.float32)]


def _inputs(seed: int, dtype: torch.dtype) -> dict:
    """Right-padded sequences of 7, 0 (all padding), 4, 7, 2 and 5 valid tokens; log-probs near the current ones."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.6
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    labels = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([7, 0, 4, 7, 2, 5])
    mask = torch.arange(T) < lengths.unsqueeze(1)
    lp = ref.token_logprobs(hidden @ weight.T + bias, labels)
    noise = lambda s: s * torch.randn(B, T, generator=g, dtype=torch.float64)  # noqa: E731
    x = {"hidden": hidden, "weight": weight, "bias": bias, "labels": labels, "mask": mask, "old": lp + noise(0.2),
         "adv": torch.randn(B, T, generator=g, dtype=torch.float64), "ref": lp + noise(0.2),
         "rollout": lp + noise(0.3)}
    # Padding may hold anything: NaN at masked positions of the per-token inputs must not reach the result.
    for k in ("old", "ref", "rollout", "adv"):
        x[k] = torch.where(mask, x[k], torch.full_like(x[k], float("nan")))
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in x.items()}


@pytest.fixture
def sequence_pass_calls(monkeypatch):
    """How many times ``ppo_loss_from_hidden`` took the one-pass route (the real function, counted)."""
    calls = []
    real = linear_mod.linear_sequence_pass

    def counted(*args, **kwargs):
        calls.append(args[6])  # the groups
        return real(*args, **kwargs)
    monkeypatch.setattr(linear_mod, "linear_sequence_pass", counted)
    return calls


@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=[b for b, _ in BACKENDS])
@pytest.mark.parametrize("name", list(SEQUENCE_VARIANTS))
@pytest.mark.parametrize("chunk_size,one_pass", [(None, True), (7, True), (12, True), (6, False)],
                         ids=["default-chunk", "one-sequence-per-chunk", "sequences-packed", "sequence-outgrows-chunk"])
@pytest.mark.parametrize("on_policy", [False, True], ids=["old-logprobs", "on-policy"])
def test_sequence_objectives_equal_the_reference_on_both_routes(name, backend, dtype, chunk_size, one_pass, on_policy,
                                                                sequence_pass_calls):
    obj = PPOObjective(**{**BASE, **SEQUENCE_VARIANTS[name]})
    x = _inputs(seed=len(name) + 7 * (chunk_size or 0), dtype=dtype)
    old = None if on_policy else x["old"]
    rollout = x["rollout"] if obj.rollout_is_level is not None or obj.off_policy_mask_threshold is not None else None
    h, w, b = (x[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    loss, stats = fastppo.ppo_loss_from_hidden(h, w, x["labels"], old, x["adv"], x["mask"], bias=b,
                                               ref_logprobs=x["ref"], rollout_logprobs=rollout, objective=obj,
                                               backend=backend, chunk_size=chunk_size)
    upstream = torch.randn((), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = torch.autograd.grad(loss * upstream.to(loss.dtype), (h, w, b))
    assert len(sequence_pass_calls) == int(one_pass)
    if one_pass and chunk_size == 12:  # 7+0+4 | 7+2 | 5 valid tokens: several sequences share a chunk
        assert sequence_pass_calls[0] == [(0, 3, 0, 11), (3, 5, 11, 20), (5, 6, 20, 25)]

    h64, w64, b64 = (x[k].double().requires_grad_() for k in ("hidden", "weight", "bias"))
    d = lambda t: None if t is None else t.double()  # noqa: E731
    want, want_stats = ref.ppo_loss_from_logits(h64 @ w64.T + b64, x["labels"], d(old), d(x["adv"]), x["mask"],
                                                ref_logprobs=d(x["ref"]), rollout_logprobs=d(rollout), objective=obj)
    want_grads = torch.autograd.grad(want * upstream, (h64, w64, b64))
    assert_close(loss, want, dtype)
    for got, exp in zip(grads, want_grads, strict=True):
        assert_close(got, exp, dtype, "grad")
    assert set(stats) == set(want_stats), set(stats) ^ set(want_stats)
    for k in want_stats:
        assert_close(stats[k], want_stats[k], dtype)


def test_top_entropy_mask_is_batch_wide_so_it_takes_the_two_pass_route(sequence_pass_calls):
    obj = PPOObjective(**BASE, importance_sampling_level="sequence", top_entropy_quantile=0.5)
    x = _inputs(seed=1, dtype=torch.float64)
    h = x["hidden"].clone().requires_grad_()
    loss, _ = fastppo.ppo_loss_from_hidden(h, x["weight"], x["labels"], x["old"], x["adv"], x["mask"],
                                           bias=x["bias"], ref_logprobs=x["ref"], objective=obj, backend="torch")
    (g,) = torch.autograd.grad(loss, h)
    h64 = x["hidden"].clone().requires_grad_()
    want, _ = ref.ppo_loss_from_logits(h64 @ x["weight"].T + x["bias"], x["labels"], x["old"], x["adv"], x["mask"],
                                       ref_logprobs=x["ref"], objective=obj)
    (want_g,) = torch.autograd.grad(want, h64)
    assert sequence_pass_calls == []
    assert_close(loss, want, torch.float64)
    assert_close(g, want_g, torch.float64, "grad")


def test_sequence_groups_pack_whole_sequences_up_to_the_chunk():
    assert sequence_groups([3, 0, 4, 2, 5], 6) == [(0, 2, 0, 3), (2, 4, 3, 9), (4, 5, 9, 14)]
    assert sequence_groups([6, 6], 6) == [(0, 1, 0, 6), (1, 2, 6, 12)]
    assert sequence_groups([2, 3, 0, 0], 10) == [(0, 4, 0, 5)]
    assert sequence_groups([2, 0, 0], 2) == [(0, 3, 0, 2)]  # empty sequences ride along
    assert sequence_groups([0, 0], 4) == []
    assert sequence_groups([2, 7, 1], 6) is None  # one sequence needs two chunks: the two-pass route
