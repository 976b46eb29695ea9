"""The tiled fused-LM-head Triton kernels (``kernels/linear.py``, selected by ``FASTPPO_LM_HEAD=tiled``) against the
float64 reference, under ``TRITON_INTERPRET=1`` on CPU (on the GPU when there is one)."""

from __future__ import annotations

import pytest
import torch

import fastppo
from fastppo import _dispatch
from fastppo.kernels import linear as kl
from fastppo.reference import linear as RL
from tests.helpers import input_grads, leaves, linear_inputs
from tests.kernels.aot import assert_compiles_for_hopper_without_spills
from tests.tolerances import assert_close, assert_no_worse_than_torch

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16


@pytest.fixture
def tiled(monkeypatch):
    monkeypatch.setenv("FASTPPO_LM_HEAD", "tiled")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n,h,v", [(37, 23, 101), (5, 40, 33), (1, 7, 1)])
def test_logprobs_entropy_and_grads_fp32(tiled, device, n, h, v, bias):
    hid, w, b, lab = linear_inputs(n, h, v, bias=bias, seed=n, device=device)
    g = torch.Generator().manual_seed(1)
    g_lp, g_h = torch.randn(n, generator=g).to(device), torch.randn(n, generator=g).to(device)
    x = leaves(hid, w, b)
    lp, ent = fastppo.linear_logprobs_and_entropy(x[0], x[1], lab, bias=x[2], temperature=0.8, backend="triton")
    grads = input_grads((lp * g_lp + ent * g_h).sum(), x)
    r = leaves(hid, w, b, dtype=F64)
    e_lp, e_ent = RL.linear_logprobs_and_entropy(r[0], r[1], lab, bias=r[2], temperature=0.8)
    e_grads = input_grads((e_lp * g_lp.double() + e_ent * g_h.double()).sum(), r)
    assert_close(lp, e_lp, F32)
    assert_close(ent, e_ent, F32)
    for a, e in zip(grads, e_grads, strict=True):
        if e is not None:
            assert_close(a, e, F32, "grad")


def test_bf16_no_worse_than_pytorch(tiled, device):
    hid, w, b, lab = linear_inputs(29, 24, 77, BF16, seed=3, device=device)
    x = leaves(hid, w, b)
    lp = fastppo.linear_logprobs(x[0], x[1], lab, bias=x[2], backend="triton")
    grads = input_grads(lp.sum(), x)
    r = leaves(hid, w, b, dtype=F64)
    e_lp = RL.linear_logprobs(r[0], r[1], lab, bias=r[2])
    e_grads = input_grads(e_lp.sum(), r)
    y = leaves(hid, w, b)
    t_lp = torch.log_softmax(torch.nn.functional.linear(y[0], y[1], y[2]), -1).gather(-1, lab[:, None]).squeeze(-1)
    t_grads = input_grads(t_lp.sum(), y)
    assert_no_worse_than_torch(lp, e_lp, t_lp)
    for a, e, t in zip(grads, e_grads, t_grads, strict=True):
        assert a.dtype == BF16
        assert_no_worse_than_torch(a, e, t)


def test_ppo_loss_from_hidden_tiled(tiled, device):
    hid, w, b, lab = linear_inputs(24, 19, 65, seed=5, device=device)
    hid, lab = hid.view(3, 8, 19), lab.view(3, 8)
    with torch.no_grad():
        lp = RL.linear_logprobs(hid.double(), w.double(), lab, bias=b.double())
    g = torch.Generator().manual_seed(6)
    old = (lp.cpu() + 0.3 * torch.randn(3, 8, generator=g, dtype=F64)).float().to(device)
    ref_lp = (lp.cpu() + 0.3 * torch.randn(3, 8, generator=g, dtype=F64)).float().to(device)
    adv = torch.randn(3, 8, generator=g).to(device)
    mask = (torch.rand(3, 8, generator=g) > 0.3).to(device)
    kw = dict(ref_logprobs=ref_lp, kl_coef=0.05, entropy_coef=0.02, dual_clip=3.0, temperature=0.9,
              agg="seq-mean-token-mean")
    x = leaves(hid, w, b)
    loss, stats = fastppo.ppo_loss_from_hidden(x[0], x[1], lab, old, adv, mask, bias=x[2], backend="triton", **kw)
    grads = input_grads(loss * 1.3, x)
    r = leaves(hid, w, b, dtype=F64)
    e_loss, e_stats = RL.ppo_loss_from_hidden(r[0], r[1], lab, old.double(), adv.double(), mask, bias=r[2],
                                              **{**kw, "ref_logprobs": ref_lp.double()})
    e_grads = input_grads(e_loss * 1.3, r)
    assert_close(loss, e_loss, F32)
    for a, e in zip(grads, e_grads, strict=True):
        assert_close(a, e, F32, "grad")
    for k in e_stats:
        assert_close(stats[k], e_stats[k], F32)


def test_launchers_skip_unneeded_grads_and_empty_batch(device):
    hid, w, b, lab = linear_inputs(6, 8, 20, device=device)
    lp, ent, lse = kl.linear_forward(hid, w, b, lab, 1.0, False)
    assert ent is None
    dh, dw, db = kl.linear_backward(hid, w, b, lab, lse, None, torch.ones_like(lp), None, 1.0, True, False, False)
    assert dh.shape == hid.shape and dw is None and db is None
    e = kl.linear_forward(hid[:0], w, b, lab[:0], 1.0, True)
    assert all(t.shape == (0,) for t in e)


def test_mode_selection(monkeypatch):
    assert _dispatch.implements("triton", "linear_tiled")
    monkeypatch.setenv("FASTPPO_LM_HEAD", "tiled")
    hid, w, _, lab = linear_inputs(4, 8, 20)
    with pytest.raises(_dispatch.BackendUnavailableError, match="needs backend='triton'"):
        fastppo.linear_logprobs(hid, w, lab, backend="torch")
    monkeypatch.setenv("FASTPPO_LM_HEAD", "fastest")
    with pytest.raises(ValueError, match="FASTPPO_LM_HEAD"):
        fastppo.linear_logprobs(hid, w, lab, backend="torch")


# ---------------------------------------------------------------------------------- ahead-of-time (sm_90)
def tiled_variants() -> list[tuple]:
    """Every (kernel, signature, constants, warps) of the tiled LM head, forward and backward, bf16 and fp32."""
    common = {"h_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "lab_ptr": "*i64"}
    fwd = {**common, "logp_ptr": "*fp32", "ent_ptr": "*fp32", "lse_ptr": "*fp32", "N": "i32", "V": "i32", "H": "i32",
           "stride_h": "i64", "stride_w": "i64", "inv_temp": "fp32"}
    bwd = {**common, "lse_ptr": "*fp32", "ent_ptr": "*fp32", "glp_ptr": "*fp32", "gh_ptr": "*fp32",
           "dh_ptr": "*fp32", "dw_ptr": "*fp32", "db_ptr": "*fp32", "N": "i32", "V": "i32", "H": "i32",
           "stride_h": "i64", "stride_w": "i64", "inv_temp": "fp32"}
    out = []
    for dt, torch_dt, prec in (("bf16", torch.bfloat16, "tf32"), ("fp32", torch.float32, "ieee")):
        ptrs = {k: f"*{dt}" for k in ("h_ptr", "w_ptr", "b_ptr")}
        for backward in (False, True):
            bm, bv, bk, warps = kl.tile_config(torch_dt, backward)
            tiles = dict(BM=bm, BV=bv, BK=bk, PREC=prec, UPCAST=False)
            if backward:
                flags = dict(HAS_BIAS=True, HAS_GLP=True, HAS_GH=True, NEED_H=True, NEED_W=True, NEED_B=True)
                out.append((kl._bwd_kernel, {**bwd, **ptrs}, {**flags, **tiles}, warps))
            else:
                out.append((kl._fwd_kernel, {**fwd, **ptrs}, dict(HAS_BIAS=False, WITH_ENTROPY=True, **tiles), warps))
    return out


def test_tiled_kernels_compile_for_hopper_without_spills():
    assert_compiles_for_hopper_without_spills("tests.kernels.test_linear:tiled_variants")
