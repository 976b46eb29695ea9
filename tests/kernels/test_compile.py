"""Compilation: ``torch.compile(fullgraph=True)`` of callers of the kernel ops, and ahead-of-time compilation of
every Triton kernel variant the launchers use for a Hopper GPU (sm_90), which needs no GPU: it proves on the
CPU-only CI that the kernels get through Triton's real compiler and ptxas, not only the interpreter.
"""

from __future__ import annotations

import torch

import fastppo
from tests.kernels.aot import assert_compiles_for_hopper_without_spills
from tests.tolerances import assert_close

F32 = torch.float32


def _inputs(device, b=2, t=5, v=257, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, v, generator=g).to(device)
    lab = torch.randint(0, v, (b, t), generator=g).to(device)
    return x, lab


def test_compile_fullgraph_logprobs_and_entropy(device):
    def step(x, lab):
        lp, h = fastppo.logprobs_and_entropy(x, lab, temperature=0.9, backend="triton")
        return (lp * 2.0).sum() + h.mean()

    x, lab = _inputs(device)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    xc = x.clone().requires_grad_()
    out = compiled(xc, lab)
    out.backward()
    xe = x.clone().requires_grad_()
    expected = step(xe, lab)
    expected.backward()
    assert_close(out, expected.double(), F32)
    assert_close(xc.grad, xe.grad.double(), F32, "grad")


def test_compile_fullgraph_ppo_loss(device):
    def step(x, lab, old, adv, mask):
        loss, stats = fastppo.ppo_loss_from_logits(x, lab, old, adv, mask, entropy_coef=0.01, backend="triton")
        return loss, stats["clipfrac"]

    x, lab = _inputs(device, seed=1)
    g = torch.Generator().manual_seed(2)
    old = (torch.randn(2, 5, generator=g) * 0.3 - 5.5).to(device)
    adv = torch.randn(2, 5, generator=g).to(device)
    mask = (torch.rand(2, 5, generator=g) > 0.3).to(device)
    mask[0, 0] = True
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    xc = x.clone().requires_grad_()
    loss, clipfrac = compiled(xc, lab, old, adv, mask)
    loss.backward()
    xe = x.clone().requires_grad_()
    e_loss, e_clipfrac = step(xe, lab, old, adv, mask)
    e_loss.backward()
    assert_close(loss, e_loss.double(), F32)
    assert_close(clipfrac, e_clipfrac.double(), F32)
    assert_close(xc.grad, xe.grad.double(), F32, "grad")


# ---------------------------------------------------------------------------------- ahead-of-time (sm_90)
_ROW_FWD = {
    "x_ptr": "*bf16", "stride_xb": "i64", "stride_xt": "i64", "n_t": "i32", "labels_ptr": "*i64", "V": "i32",
    "inv_temp": "fp32", "logp_ptr": "*fp32", "ent_ptr": "*fp32", "lse_ptr": "*fp32", "old_ptr": "*fp32",
    "adv_ptr": "*fp32", "ref_ptr": "*fp32", "mask_ptr": "*fp32", "terms_ptr": "*fp32", "N": "i32",
    "clip_low": "fp32", "clip_high": "fp32", "dual_clip": "fp32", "kl_coef": "fp32", "entropy_coef": "fp32",
}
_ROW_BWD = {
    "x_ptr": "*bf16", "stride_xb": "i64", "stride_xt": "i64", "n_t": "i32", "labels_ptr": "*i64", "V": "i32",
    "inv_temp": "fp32", "lse_ptr": "*fp32", "ent_ptr": "*fp32", "glp_ptr": "*fp32", "gh_ptr": "*fp32",
    "out_ptr": "*bf16", "stride_ob": "i64", "stride_ot": "i64",
}
_GAE = {
    "r_ptr": "*fp32", "v_ptr": "*fp32", "m_ptr": "*u8", "boot_ptr": "*fp32", "adv_ptr": "*fp32", "ret_ptr": "*fp32",
    "summ_ptr": "*fp32", "stats_ptr": "*fp32", "B": "i32", "T": "i32", "NC": "i32", "gamma": "fp32", "gl": "fp32",
}


def row_and_gae_variants() -> list[tuple]:
    """Every (kernel, signature, constants, warps) the row and GAE launchers use."""
    from fastppo.kernels import gae
    from fastppo.kernels import logprobs as lp
    out = []
    for dtype in ("bf16", "fp32"):
        fwd = {**_ROW_FWD, "x_ptr": f"*{dtype}"}
        bwd = {**_ROW_BWD, "x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"}
        block = 8192 if dtype == "bf16" else 4096
        out.append((lp._row_forward_kernel, fwd, dict(BLOCK=block, WITH_ENTROPY=True, PPO=False, HAS_REF=False,
                                                      DUAL=False, KL_KIND=0), 16))
        for kl_kind in range(4):
            out.append((lp._row_forward_kernel, fwd, dict(BLOCK=block, WITH_ENTROPY=True, PPO=True, HAS_REF=True,
                                                          DUAL=kl_kind % 2 == 0, KL_KIND=kl_kind), 16))
        for glp, gh in ((True, True), (True, False), (False, True)):
            out.append((lp._row_backward_kernel, bwd, dict(BLOCK=block, HAS_GLP=glp, HAS_GH=gh), 16))
    out.append((lp._row_forward_kernel, {**_ROW_FWD, "x_ptr": "*fp16"},
                dict(BLOCK=1024, WITH_ENTROPY=False, PPO=False, HAS_REF=False, DUAL=False, KL_KIND=0), 4))
    for phase, stats in ((0, False), (1, False), (1, True)):
        out.append((gae._gae_kernel, _GAE, dict(CHUNK=256, NC_P2=64, PHASE=phase, HAS_BOOT=phase == 1,
                                                 STATS=stats), 4))
    out.append((gae._moments_kernel, {"stats_ptr": "*fp32", "out_ptr": "*fp32", "P": "i32", "eps": "fp32"},
                dict(RB=1024), 4))
    out.append((gae._whiten_kernel, {"adv_ptr": "*fp32", "m_ptr": "*u8", "mom_ptr": "*fp32", "N": "i32"},
                dict(SHIFT_MEAN=True, BLOCK=1024), 4))
    return out


def test_triton_kernels_compile_for_hopper_without_spills():
    assert_compiles_for_hopper_without_spills("tests.kernels.test_compile:row_and_gae_variants")
