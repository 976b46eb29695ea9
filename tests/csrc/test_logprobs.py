"""What is specific to the C++ CPU row kernels, on each SIMD level: fp32 accuracy at a large vocabulary, the
online rescaling across L1 blocks, -inf and NaN at block and vector boundaries, strided ``out`` views, batch
invariance, auto dispatch and fullgraph compilation. Values, grads, layouts, dtypes, in place and the PPO terms
are tested for every backend (each SIMD level included) in tests/contract."""

from __future__ import annotations

import pytest
import torch

import fastppo
from fastppo import reference as ref
from tests.helpers import random_logits, random_vector, ref_dlogits
from tests.tolerances import assert_close

NEG_INF = float("-inf")
F32 = torch.float32


# ------------------------------------------------------------------------------------------- launchers
def test_large_vocab_fp32_error_within_1e5(cpp):
    """The C++ CPU targets' shape: N=2048, V=32000 fp32, max abs err <= 1e-5 on logp and entropy."""
    x, lab = random_logits((2048,), 32000, seed=7, scale=3.0)
    logp, ent, _ = cpp.logprobs_forward(x.view(1, 2048, 32000), lab, 1.0, True)
    for lo in range(0, 2048, 512):  # the fp64 reference in slices keeps memory modest
        e_lp, e_h = ref.logprobs_and_entropy(x[lo:lo + 512].double(), lab[lo:lo + 512])
        assert float((logp[lo:lo + 512] - e_lp).abs().max()) <= 1e-5
        assert float((ent[lo:lo + 512] - e_h).abs().max()) <= 1e-5


def test_online_rescaling_across_blocks(cpp, simd):
    """Rows longer than one 2048-element block: the max rises block after block, leading -inf blocks."""
    v = 7000
    x, lab = random_logits((4,), v, seed=3)
    x[0] = torch.linspace(-30, 30, v)  # every block raises the max
    x[1, :4096] = NEG_INF  # two whole -inf blocks before any finite value
    x[2, ::2] = NEG_INF
    x[3] = torch.linspace(30, -30, v)  # the max comes first
    lab[1] = 5000
    logp, ent, lse = cpp.logprobs_forward(x.view(1, 4, v), lab, 0.9, True)
    e_lp, e_h = ref.logprobs_and_entropy(x.double(), lab, temperature=0.9)
    assert_close(logp, e_lp, F32)
    assert_close(ent, e_h, F32)
    g_lp, g_h = random_vector(4, 5), random_vector(4, 6)
    out = torch.empty_like(x).view(1, 4, v)
    cpp.logprobs_backward(x.view(1, 4, v), lab, lse, ent, g_lp, g_h, 0.9, out)
    assert_close(out.view(4, v), ref_dlogits(x, lab, 0.9, g_lp, g_h), F32, "grad")


def test_neg_inf_entries_and_labels(cpp, simd):
    x, lab = random_logits((6,), 1271, seed=11)
    x[0, 100:900] = NEG_INF
    x[1, lab[1]] = NEG_INF  # the label itself is masked: logp = -inf, like the reference
    x[2, :-1] = NEG_INF  # a single finite entry: p = 1, entropy = 0
    lab[2] = 1270
    logp, ent, lse = cpp.logprobs_forward(x.view(1, 6, -1), lab, 1.0, True)
    e_lp, e_h = ref.logprobs_and_entropy(x.double(), lab)
    assert logp[1] == NEG_INF and e_lp[1] == NEG_INF
    assert_close(logp, e_lp, F32)
    assert_close(ent, e_h, F32)
    assert float(ent[2]) == 0.0 and float(logp[2]) == 0.0
    keep = torch.tensor([0, 2, 3, 4, 5])  # row 1 has an infinite logp: its reference gradient is undefined
    g_lp, g_h = random_vector(6, 1), random_vector(6, 2)
    out = torch.empty_like(x).view(1, 6, -1)
    cpp.logprobs_backward(x.view(1, 6, -1), lab, lse, ent, g_lp, g_h, 1.0, out)
    got = out.view(6, -1)[keep]
    assert_close(got, ref_dlogits(x[keep], lab[keep], 1.0, g_lp[keep], g_h[keep]), F32, "grad")
    masked = torch.zeros(1271, dtype=torch.bool)
    masked[100:900] = True
    masked[lab[0]] = False  # a masked label still gets g_lp / T
    assert torch.all(out.view(6, -1)[0, masked] == 0)


@pytest.mark.parametrize("bad", ["nan", "pos_inf", "all_neg_inf"])
def test_non_finite_rows_give_non_finite_lse(cpp, simd, bad):
    x, lab = random_logits((3,), 3000, seed=2)
    if bad == "nan":
        x[1, 2500] = float("nan")
    elif bad == "pos_inf":
        x[1, 17] = float("inf")
    else:
        x[1] = NEG_INF
    logp, ent, lse = cpp.logprobs_forward(x.view(1, 3, -1), lab, 1.0, True)
    assert not torch.isfinite(lse[1])
    assert torch.isfinite(lse[[0, 2]]).all() and torch.isfinite(logp[[0, 2]]).all()
    if bad == "nan":
        assert torch.isnan(logp[1]) and torch.isnan(ent[1])


def test_strided_logits_and_out(cpp, simd):
    big, _ = random_logits((3, 9), 1031, seed=5)
    view = big[:, :-1, :]  # non-contiguous rows
    lab = torch.randint(0, 1031, (3, 8), generator=torch.Generator().manual_seed(1))
    n = 24
    logp, ent, lse = cpp.logprobs_forward(view, lab.reshape(-1), 1.0, True)
    e_lp, e_h = ref.logprobs_and_entropy(view.double(), lab)
    assert_close(logp, e_lp.reshape(-1), F32)
    assert_close(ent, e_h.reshape(-1), F32)
    g_lp, g_h = random_vector(n, 3), random_vector(n, 4)
    out_big = torch.full((3, 10, 1031), 7.0)
    out = out_big[:, 1:9, :]  # a strided destination
    cpp.logprobs_backward(view, lab.reshape(-1), lse, ent, g_lp, g_h, 1.0, out)
    assert_close(out, ref_dlogits(view, lab, 1.0, g_lp, g_h), F32, "grad")
    assert torch.all(out_big[:, 0] == 7.0) and torch.all(out_big[:, 9] == 7.0)  # nothing outside written
    tr = big.transpose(0, 1)  # [9, 3, V]: stride(0) < stride(1)
    lab_t = torch.randint(0, 1031, (9, 3), generator=torch.Generator().manual_seed(2))
    lp_t, ent_t, _ = cpp.logprobs_forward(tr, lab_t.reshape(-1), 1.0, True)
    e_lp, e_h = ref.logprobs_and_entropy(tr.double(), lab_t)
    assert_close(lp_t, e_lp.reshape(-1), F32)
    assert_close(ent_t, e_h.reshape(-1), F32)


def test_batch_invariance(cpp, simd):
    """A row's outputs do not depend on what else is in the batch (bitwise)."""
    x, lab = random_logits((64,), 3001, seed=21)
    logp, ent, lse = cpp.logprobs_forward(x.view(1, 64, -1), lab, 1.0, True)
    for i in (0, 17, 63):
        lp1, ent1, lse1 = cpp.logprobs_forward(x[i:i + 1].view(1, 1, -1), lab[i:i + 1], 1.0, True)
        assert torch.equal(lp1, logp[i:i + 1]) and torch.equal(ent1, ent[i:i + 1]) and torch.equal(lse1, lse[i:i + 1])


# ------------------------------------------------------------------------------------------- public ops
def test_auto_dispatch_picks_cpp_for_cpu_tensors():
    from fastppo import _dispatch

    assert fastppo.backends()["cpp"].available
    assert _dispatch.resolve(None, torch.device("cpu"), "logprobs") == "cpp"
    assert _dispatch.resolve(None, torch.device("cpu"), "ppo_loss") == "cpp"
    assert _dispatch.resolve(None, torch.device("cpu"), "gae") == "cpp"


def test_torch_compile_fullgraph():
    x, lab = random_logits((2, 5), 777, seed=15)

    def f(logits, labels):
        lp, h = fastppo.logprobs_and_entropy(logits, labels, temperature=0.9, backend="cpp")
        return lp.sum() + 0.5 * h.sum()

    compiled = torch.compile(f, fullgraph=True)  # default inductor backend: the custom ops stay opaque
    xg = x.clone().requires_grad_()
    out = compiled(xg, lab)
    out.backward()
    e_lp, e_h = ref.logprobs_and_entropy(x.double(), lab, temperature=0.9)
    assert_close(out, e_lp.sum() + 0.5 * e_h.sum(), F32)
    assert_close(xg.grad, ref_dlogits(x, lab, 0.9, torch.ones(10), torch.full((10,), 0.5)), F32, "grad")
