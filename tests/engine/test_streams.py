"""Per-sample random streams: a sample's seed, and the tokens sampled with it, do not depend on the batch the sample
sits in (world-size invariance of the rollout), and the draw follows the filtered softmax."""

from __future__ import annotations

import torch

from fastppo.engine.models import build_causal_lm, build_tokenizer
from fastppo.engine.rollout import generate, sample_next
from fastppo.engine.streams import sample_seeds, seed_to_uniform, stream_seed, token_seeds
from tests.engine.tiny import tiny_config


def test_seeds_are_per_sample_and_differ_across_step_seed_position():
    idx = torch.arange(64)
    base = sample_seeds(0, 3, idx)
    assert torch.equal(sample_seeds(0, 3, idx[40:]), base[40:])  # a sample's seed ignores its batch
    assert len(set(base.tolist())) == 64
    assert not torch.equal(sample_seeds(1, 3, idx), base)
    assert not torch.equal(sample_seeds(0, 4, idx), base)
    assert not torch.equal(token_seeds(base, 0), token_seeds(base, 1))
    assert stream_seed(0, 1, 2) != stream_seed(0, 2, 1) and 0 <= stream_seed(5, 6) < 2**63
    u = seed_to_uniform(token_seeds(sample_seeds(7, 0, torch.arange(200_000)), 3))
    assert 0.0 < float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002


def test_seeded_draw_follows_the_filtered_softmax():
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0, float("-inf")]]).repeat(40_000, 1)
    seeds = sample_seeds(0, 0, torch.arange(40_000))
    tok = sample_next(logits, 0.8, 3, 1.0, False, seeds=seeds)
    freq = torch.bincount(tok, minlength=5).double() / tok.numel()
    want = torch.softmax(torch.tensor([2.0, 0.5, -1e9, 1.0, -1e9]) / 0.8, -1).double()
    assert freq[2] == 0 and freq[4] == 0
    assert torch.allclose(freq, want, atol=0.01)


def test_sampled_tokens_do_not_depend_on_the_batch():
    torch.manual_seed(1)
    cfg = tiny_config(tiny_hidden_size=32, tiny_layers=2)
    tok = build_tokenizer(cfg)
    lm = build_causal_lm(cfg, tok).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.normal_(0.0, 0.3)
    prompts = ["3 1 =", "9 8 7 6 5 4 =", "0 =", "4 4 2 1 =", "5 5 =", "1 2 3 ="]
    seeds = sample_seeds(0, 2, torch.arange(len(prompts)))

    def gen(ps, sd):
        enc = tok(ps, padding=True, return_tensors="pt")
        ro = generate(lm, enc["input_ids"], enc["attention_mask"], max_new_tokens=8, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, seeds=sd)
        return [r[m.bool()].tolist() for r, m in zip(ro.response_ids, ro.response_mask, strict=True)]

    whole = gen(prompts, seeds)
    halves = gen(prompts[:3], seeds[:3]) + gen(prompts[3:], seeds[3:])
    assert whole == halves
    assert len({tuple(r) for r in whole}) > 1
    assert gen(prompts, sample_seeds(0, 3, torch.arange(len(prompts)))) != whole
