"""The sampling reference's own rules: the filters, tie handling, and the seed -> uniform map."""

from __future__ import annotations

import torch

from fastppo.engine import streams
from fastppo.reference.sampling import filter_logits, mix64, sample_tokens, seed_uniforms


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]], dtype=torch.float64))
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))  # 0.5 + 0.3 reaches 0.7: the third is dropped
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
    kept = torch.isfinite(filter_logits(logits, top_p=0.1))  # the top token always survives
    assert kept.sum(1).tolist() == [1, 1]
    kept = torch.isfinite(filter_logits(logits, top_k=3, top_p=0.8))  # top-p over the top-3 renormalised mass
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]


def test_ties_are_kept_or_dropped_together():
    z = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    assert torch.isfinite(filter_logits(z, top_k=2)).tolist() == [[True, True, True, True, False]]
    p = torch.softmax(z, -1)[0]
    # the mass strictly above the tied tokens is p0 < top_p: all three stay, although p0 + p1 already exceeds it
    top_p = float(p[0] + 0.5 * p[1])
    assert torch.isfinite(filter_logits(z, top_p=top_p)).tolist() == [[True, True, True, True, False]]


def _splitmix64(x: int) -> int:
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_seed_uniforms_are_splitmix64_and_match_the_engine_streams():
    seeds = torch.tensor([0, 1, -1, 2**62 + 12345, -(2**63)], dtype=torch.int64)
    want = [_splitmix64(int(s) & ((1 << 64) - 1)) for s in seeds]
    got = [int(v) & ((1 << 64) - 1) for v in mix64(seeds)]
    assert got == want
    u = seed_uniforms(seeds)
    assert ((u > 0) & (u < 1)).all()
    assert torch.equal(u, torch.tensor([((w >> 11) + 0.5) * 2.0**-53 for w in want], dtype=torch.float64))
    assert torch.equal(u, streams.seed_to_uniform(seeds))  # the engine's per-sample streams draw the same uniforms


def test_inverse_cdf_picks_the_token_whose_interval_holds_u():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 5, dtype=torch.float64))
    u = torch.tensor([0.05, 0.1 + 1e-9, 0.3 + 1e-9, 0.6 + 1e-9, 1 - 1e-12], dtype=torch.float64)
    assert sample_tokens(logits, u).tolist() == [0, 1, 2, 3, 3]
