"""C++ CPU row kernels (logprobs, entropy, backward) against the float64 reference: through the launchers
(``fastppo._native_launchers`` over ``fastppo._C_cpu``) and through the public ops with ``backend="cpp"``."""

from __future__ import annotations

import pytest
import torch

import fastppo
from fastppo import reference as ref
from tests.csrc.checks import check_row_offsets_past_int32, random_logits, random_vector, ref_dlogits
from tests.tolerances import assert_close, assert_no_worse_than_torch

NEG_INF = float("-inf")
F32 = torch.float32


# ------------------------------------------------------------------------------------------- launchers
@pytest.mark.parametrize(
    "b,t,v,temperature",
    [(1, 41, 1271, 1.0), (3, 7, 1271, 0.7), (1, 5, 1, 1.0), (2, 3, 17, 2.0), (1, 6, 4100, 1.3), (2, 2, 9000, 1.0)],
)
def test_forward_backward_launchers_match_fp64(cpp, simd, b, t, v, temperature):
    x, lab = random_logits((b, t), v, seed=b * t + v)
    n = b * t
    logp, ent, lse = cpp.logprobs_forward(x, lab.reshape(-1), temperature, True)
    e_lp, e_h = ref.logprobs_and_entropy(x.double(), lab, temperature=temperature)
    assert logp.dtype == ent.dtype == lse.dtype == F32 and logp.shape == (n,)
    assert_close(logp, e_lp.reshape(-1), F32)
    assert_close(ent, e_h.reshape(-1), F32)
    assert_close(lse, torch.logsumexp(x.double() / temperature, -1).reshape(-1), F32)
    # without entropy: the same logp/lse
    lp2, none, lse2 = cpp.logprobs_forward(x, lab.reshape(-1), temperature, False)
    assert none is None and torch.equal(lp2, logp) and torch.equal(lse2, lse)

    g_lp, g_h = random_vector(n, 1), random_vector(n, 2)
    out = torch.empty_like(x)
    cpp.logprobs_backward(x, lab.reshape(-1), lse, ent, g_lp, g_h, temperature, out)
    assert_close(out, ref_dlogits(x, lab, temperature, g_lp, g_h), F32, "grad")
    # logp only / entropy only
    cpp.logprobs_backward(x, lab.reshape(-1), lse, None, g_lp, None, temperature, out)
    assert_close(out, ref_dlogits(x, lab, temperature, g_lp, None), F32, "grad")
    cpp.logprobs_backward(x, lab.reshape(-1), lse, ent, None, g_h, temperature, out)
    assert_close(out, ref_dlogits(x, lab, temperature, None, g_h), F32, "grad")


def test_large_vocab_fp32_error_within_1e5(cpp):
    """The issue's shape: N=2048, V=32000 fp32, max abs err <= 1e-5 on logp and entropy."""
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


def test_row_offsets_past_int32(cpp):
    check_row_offsets_past_int32(cpp)


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


def test_inplace_backward_and_zero_grad_rows(cpp, simd):
    x, lab = random_logits((1, 9), 2100, seed=9)
    logp, ent, lse = cpp.logprobs_forward(x, lab.reshape(-1), 1.1, True)
    g_lp, g_h = random_vector(9, 1), random_vector(9, 2)
    g_lp[[2, 5]] = 0.0
    g_h[[2, 5]] = 0.0
    x[0, 5] = float("nan")  # rows with both grads zero are never read: zeros, no exp (no NaN either)
    expected = ref_dlogits(torch.nan_to_num(x), lab, 1.1, g_lp, g_h)
    buf = x.clone()
    ret = cpp.logprobs_backward(buf, lab.reshape(-1), lse, ent, g_lp, g_h, 1.1, buf)
    assert ret.data_ptr() == buf.data_ptr()
    keep = [0, 1, 3, 4, 6, 7, 8]
    assert_close(buf[0, keep], expected[0, keep], F32, "grad")
    assert torch.all(buf[0, [2, 5]] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_pytorch(cpp, simd, dtype):
    x, lab = random_logits((2, 21), 1271, seed=13, dtype=dtype)
    x[0, 3, :50] = NEG_INF
    logp, ent, lse = cpp.logprobs_forward(x, lab.reshape(-1), 1.0, True)
    e_lp, e_h = ref.logprobs_and_entropy(x.double(), lab)  # the reference on the rounded inputs
    eager_lp = torch.log_softmax(x, -1).gather(-1, lab[..., None]).squeeze(-1)
    p = torch.softmax(x, -1)
    eager_h = -(torch.where(p > 0, p * torch.log_softmax(x, -1), torch.zeros_like(p))).sum(-1)
    assert_no_worse_than_torch(logp, e_lp.reshape(-1), eager_lp.reshape(-1))
    assert_no_worse_than_torch(ent, e_h.reshape(-1), eager_h.reshape(-1))
    # backward: dlogits in the input dtype, no worse than eager autograd in that dtype (whose p*log p has no
    # finite gradient at -inf, so the backward check takes the finite stand-in -1e4)
    x = torch.where(torch.isinf(x), torch.full_like(x, -1e4), x)
    logp, ent, lse = cpp.logprobs_forward(x, lab.reshape(-1), 1.0, True)
    g_lp, g_h = random_vector(42, 1), random_vector(42, 2)
    out = torch.empty_like(x)
    cpp.logprobs_backward(x, lab.reshape(-1), lse, ent, g_lp, g_h, 1.0, out)
    assert out.dtype == dtype
    xe = x.clone().requires_grad_()
    lpe = torch.log_softmax(xe, -1)
    pe = lpe.exp()
    he = -(torch.where(pe > 0, pe * lpe, torch.zeros_like(pe))).sum(-1)
    ((lpe.gather(-1, lab[..., None]).squeeze(-1) * g_lp.view(2, 21).to(dtype)).sum()
     + (he * g_h.view(2, 21).to(dtype)).sum()).backward()
    expected = ref_dlogits(x, lab, 1.0, g_lp, g_h)
    assert_no_worse_than_torch(out, expected, xe.grad)


def test_batch_invariance(cpp, simd):
    """A row's outputs do not depend on what else is in the batch (bitwise)."""
    x, lab = random_logits((64,), 3001, seed=21)
    logp, ent, lse = cpp.logprobs_forward(x.view(1, 64, -1), lab, 1.0, True)
    for i in (0, 17, 63):
        lp1, ent1, lse1 = cpp.logprobs_forward(x[i:i + 1].view(1, 1, -1), lab[i:i + 1], 1.0, True)
        assert torch.equal(lp1, logp[i:i + 1]) and torch.equal(ent1, ent[i:i + 1]) and torch.equal(lse1, lse[i:i + 1])


# ------------------------------------------------------------------------------------------- public ops
@pytest.mark.parametrize("shape,v,temperature", [((41,), 1271, 1.0), ((3, 7), 1271, 0.8), ((2, 3, 5), 257, 1.7)])
def test_public_op_values_and_grads(shape, v, temperature):
    x, lab = random_logits(shape, v, seed=sum(shape) + v)
    xg = x.clone().requires_grad_()
    lp, h = fastppo.logprobs_and_entropy(xg, lab, temperature=temperature, backend="cpp")
    e_lp, e_h = ref.logprobs_and_entropy(x.double(), lab, temperature=temperature)
    assert lp.shape == shape and lp.dtype == F32
    assert_close(lp, e_lp, F32)
    assert_close(h, e_h, F32)
    g_lp = random_vector(lp.numel(), 8).view(shape)
    g_h = random_vector(lp.numel(), 9).view(shape)
    torch.autograd.backward((lp, h), (g_lp, g_h))
    assert_close(xg.grad, ref_dlogits(x, lab, temperature, g_lp, g_h), F32, "grad")
    assert_close(fastppo.token_logprobs(x, lab, temperature=temperature, backend="cpp"), e_lp, F32)
    assert_close(fastppo.token_entropy(x, temperature=temperature, backend="cpp"), e_h, F32)


def test_public_op_stride0_upstream_grad_and_noncontiguous():
    big, _ = random_logits((2, 8), 613, seed=4)
    view = big[:, :-1, :]
    lab = torch.randint(0, 613, (2, 7), generator=torch.Generator().manual_seed(3))
    xg = view.detach().clone().requires_grad_()
    xs = big.detach().clone().requires_grad_()
    lp, h = fastppo.logprobs_and_entropy(xs[:, :-1, :], lab, backend="cpp")
    (lp.sum() + 2.0 * h.sum()).backward()  # .sum() hands stride-0 expanded grads to the backward
    expected = ref_dlogits(xg, lab, 1.0, torch.ones(14), torch.full((14,), 2.0))
    assert_close(xs.grad[:, :-1, :], expected, F32, "grad")
    assert torch.all(xs.grad[:, -1] == 0)


def test_public_op_inplace_backward():
    x, lab = random_logits((3, 5), 1500, seed=6)
    xg = x.clone().requires_grad_()
    lp = fastppo.token_logprobs(xg, lab, backend="cpp", inplace_backward=True)
    g = random_vector(15, 7).view(3, 5)
    lp.backward(g)
    assert_close(xg.grad, ref_dlogits(x, lab, 1.0, g, None), F32, "grad")


@pytest.mark.parametrize("bad", ["nan", "pos_inf", "all_neg_inf"])
def test_public_op_rejects_non_finite(bad):
    x, lab = random_logits((4,), 300, seed=1)
    if bad == "nan":
        x[2, 7] = float("nan")
    elif bad == "pos_inf":
        x[2, 7] = float("inf")
    else:
        x[2] = NEG_INF
    with pytest.raises(ValueError, match="non-finite"):
        fastppo.logprobs_and_entropy(x, lab, backend="cpp")
    with pytest.raises(ValueError, match="non-finite"):
        fastppo.token_entropy(x, backend="cpp")


def test_public_op_bf16():
    x, lab = random_logits((41,), 1271, seed=12, dtype=torch.bfloat16)
    lp = fastppo.token_logprobs(x, lab, backend="cpp")
    assert lp.dtype == F32
    eager = torch.log_softmax(x, -1).gather(-1, lab[:, None]).squeeze(-1)
    assert_no_worse_than_torch(lp, ref.token_logprobs(x.double(), lab), eager)


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
