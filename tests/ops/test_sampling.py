"""``fastppo.sample_tokens`` on every CPU-reachable backend (torch reference, C++ extension, Triton interpreter).

Two kinds of evidence: (1) given the same seeds every backend draws exactly the token the float64 reference draws
(the draw is inverse-CDF over one uniform per row, so this is a per-row identity, not a statistic); (2) the draws
follow the filtered softmax, the distribution ``softmax`` + ``torch.multinomial`` samples: chi-square tests with a
fixed seed budget (deterministic, p-value threshold 1e-4), against the exact probabilities and against
multinomial's own draws.
"""

from __future__ import annotations

import pytest
import torch

import fastppo
from fastppo.reference import sampling as ref

BACKENDS = ["torch", "cpp", "triton"]


def _on(backend: str, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Triton runs on the GPU when there is one (on CPU tensors only under the interpreter, set by conftest)."""
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    return [t.to(dev) for t in tensors]


def _logits(b: int, v: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, v, generator=g) * 3).to(dtype)


def _seeds(b: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, (b,), generator=g, dtype=torch.int64)


def _expected_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The filtered softmax in float64, with the classic sort-and-cumsum nucleus rule (no ties in these logits)."""
    z = logits.double() / temperature
    if top_k:
        kth = torch.topk(z, top_k, -1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1:
        srt, order = torch.sort(z, -1, descending=True)
        pr = srt.softmax(-1)
        drop = (pr.cumsum(-1) - pr) >= top_p
        z = z.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return z.softmax(-1)


def _chi2_pvalue(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson goodness of fit over the cells with expected count > 0; p = Q(df/2, stat/2)."""
    keep = expected > 0
    assert counts[~keep].sum() == 0, "drew a token with probability 0"
    c, e = counts[keep].double(), expected[keep].double()
    stat = ((c - e) ** 2 / e).sum()
    df = torch.tensor(float(keep.sum() - 1))
    return float(torch.special.gammaincc(df / 2, stat / 2))


_FILTERS = [(1.0, 0, 1.0), (0.7, 50, 1.0), (1.3, 0, 0.9), (0.8, 40, 0.95)]
_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The Triton interpreter runs one program per row and each bisection step re-reads the row: every dtype unfiltered,
# every filter in fp32, on a few rows (the C++ and torch paths take every combination on 41 rows).
_CASES = [(be, dt, f) for be in ("torch", "cpp") for dt in _DTYPES for f in _FILTERS]
_CASES += [("triton", dt, _FILTERS[0]) for dt in _DTYPES] + [("triton", torch.float32, f) for f in _FILTERS[1:]]


@pytest.mark.parametrize("backend,dtype,filters", _CASES)
def test_same_token_as_float64_reference(backend, dtype, filters):
    temperature, top_k, top_p = filters
    b, v = (4, 1271) if backend == "triton" else (41, 1271)
    x = _logits(b, v, dtype=dtype)
    seeds = _seeds(b)
    xd, sd = _on(backend, x, seeds)
    got = fastppo.sample_tokens(xd, temperature=temperature, top_k=top_k, top_p=top_p, seeds=sd, backend=backend).cpu()
    want = ref.sample_tokens(x.double(), ref.seed_uniforms(seeds), temperature=temperature, top_k=top_k, top_p=top_p)
    assert got.dtype == torch.int64 and got.shape == (b,)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_chunks_and_strided_rows(backend):
    """V over the kernels' chunk sizes (C++ scan chunks of 256, Triton blocks of 4096) and rows of a wider buffer."""
    big = _logits(5, 9000, seed=3)
    x = big[:, 100:100 + 8193]  # row stride 9000, unit stride on V
    seeds = _seeds(5, seed=4)
    want = ref.sample_tokens(x.double(), ref.seed_uniforms(seeds))
    big, seeds = _on(backend, big, seeds)
    x = big[:, 100:100 + 8193]
    got = fastppo.sample_tokens(x, seeds=seeds, backend=backend).cpu()
    assert torch.equal(got, want)
    got_t = fastppo.sample_tokens(x.t().contiguous().t(), seeds=seeds, backend=backend).cpu()  # non-unit V stride
    assert torch.equal(got_t, want)


# The Triton kernel is held to the reference's exact token per seed above (the interpreter is too slow for tens
# of thousands of rows), so its distribution is the reference's.
@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 4, 1.0), (1.5, 0, 0.8), (1.0, 5, 0.7)])
def test_distribution_matches_softmax(backend, temperature, top_k, top_p):
    v, n = 7, 40000
    row = torch.tensor([1.2, -0.3, 0.5, 2.0, -1.5, 0.9, 0.0])
    x = row.expand(n, v).contiguous()
    tok = fastppo.sample_tokens(x, temperature=temperature, top_k=top_k, top_p=top_p, seeds=_seeds(n, seed=7),
                                backend=backend)
    probs = _expected_probs(row, temperature, top_k, top_p)
    counts = torch.bincount(tok, minlength=v)
    assert _chi2_pvalue(counts, probs * n) > 1e-4
    # two-sample test against torch.multinomial's draws from the same filtered softmax
    g = torch.Generator().manual_seed(11)
    other = torch.bincount(torch.multinomial(probs.float(), n, replacement=True, generator=g), minlength=v)
    keep = (counts + other) > 0
    stat = (((counts - other).double()[keep]) ** 2 / (counts + other).double()[keep]).sum()
    df = torch.tensor(float(keep.sum() - 1))
    assert float(torch.special.gammaincc(df / 2, stat / 2)) > 1e-4


def test_low_probability_tail_at_real_vocab():
    """V = 151936 with one dominant token: the rest of the mass (~10%) spread thinly must still be drawn at its rate."""
    v, n = 151936, 64
    x = torch.zeros(n, v)
    x[:, 5] = 14.0  # exp(14) ~ 1.2e6 against 151935 tokens of weight 1: p(token 5) ~ 0.889
    tok = fastppo.sample_tokens(x, seeds=_seeds(n, seed=5), backend="cpp")
    assert torch.equal(tok, ref.sample_tokens(x.double(), ref.seed_uniforms(_seeds(n, seed=5))))
    p5 = float(torch.softmax(x[0].double(), -1)[5])
    hits = int((tok == 5).sum())
    # binomial(64, 0.889): 3 sd ~ 7.5 draws
    assert abs(hits - n * p5) < 3 * (n * p5 * (1 - p5)) ** 0.5 + 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_draw_depends_on_its_seed_only(backend):
    x, seeds = _on(backend, _logits(6, 300, seed=8), _seeds(6, seed=9))
    full = fastppo.sample_tokens(x, seeds=seeds, backend=backend)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0)).to(x.device)
    assert torch.equal(fastppo.sample_tokens(x[perm], seeds=seeds[perm], backend=backend), full[perm])
    assert torch.equal(fastppo.sample_tokens(x[3:5], seeds=seeds[3:5], backend=backend), full[3:5])


def test_generator_and_leading_shape():
    x = _logits(6, 50).view(2, 3, 50)
    a = fastppo.sample_tokens(x, generator=torch.Generator().manual_seed(3))
    b = fastppo.sample_tokens(x, generator=torch.Generator().manual_seed(3))
    c = fastppo.sample_tokens(x, generator=torch.Generator().manual_seed(4))
    assert a.shape == (2, 3) and torch.equal(a, b) and not torch.equal(a, c)
    assert ((a >= 0) & (a < 50)).all()


def test_masked_vocabulary_is_never_drawn():
    x = _logits(200, 64, seed=2)
    x[:, ::2] = float("-inf")
    tok = fastppo.sample_tokens(x, seeds=_seeds(200), backend="cpp")
    assert (tok % 2 == 1).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seeds": torch.zeros(3, dtype=torch.int32)}, "seeds"),
        ({"seeds": torch.zeros(4, dtype=torch.int64)}, "seeds"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastppo.sample_tokens(_logits(3, 10), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "all-inf"])
def test_non_finite_logits_raise(backend, bad):
    x = _logits(3, 10)
    if bad == "all-inf":
        x[1] = float("-inf")
    else:
        x[1, 4] = bad
    (x,) = _on(backend, x)
    with pytest.raises((ValueError, RuntimeError), match="non-finite"):  # CUDA: a device-side assert
        fastppo.sample_tokens(x, backend=backend)
        torch.cuda.synchronize() if x.is_cuda else None
