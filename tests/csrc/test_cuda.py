"""CUDA extension (fastppo._C_cuda) against the float64 reference, on a GPU: row kernels (values, gradients,
-inf, NaN, strides, in-place, bf16), PPO terms and the chunked GAE scan. Skipped on machines without a CUDA
device; on a GPU machine a missing extension fails with its import error."""

from __future__ import annotations

import pytest
import torch

import fastppo
from fastppo import _native
from fastppo import reference as ref
from tests.helpers import random_logits, ref_dlogits
from tests.tolerances import assert_close, assert_no_worse_than_torch

pytestmark = pytest.mark.gpu

F32 = torch.float32
NEG_INF = float("-inf")


@pytest.fixture(scope="module")
def cu():
    launchers = _native.launchers("cuda")
    assert launchers is not None, f"fastppo._C_cuda did not load: {_native.import_error('cuda')}"
    return launchers


def _logits(shape, v, seed, dtype=F32, scale=2.0):
    x, labels = random_logits(shape, v, seed, scale, dtype)
    return x.cuda(), labels.cuda()


@pytest.mark.parametrize("b,t,v,temperature", [(1, 41, 1271, 1.0), (3, 7, 1271, 0.7), (2, 64, 32000, 1.0),
                                               (1, 5, 1, 1.0), (2, 3, 151936, 1.3)])
def test_row_kernels_match_fp64(cu, b, t, v, temperature):
    x, lab = _logits((b, t), v, seed=v + t)
    x[0, 0, : v // 2] = NEG_INF
    n = b * t
    logp, ent, lse = cu.logprobs_forward(x, lab.reshape(-1), temperature, True)
    e_lp, e_h = ref.logprobs_and_entropy(x.double(), lab, temperature=temperature)
    assert_close(logp, e_lp.reshape(-1), F32)
    assert_close(ent, e_h.reshape(-1), F32)
    g = torch.Generator().manual_seed(1)
    g_lp, g_h = torch.randn(n, generator=g).cuda(), torch.randn(n, generator=g).cuda()
    out = torch.empty_like(x)
    cu.logprobs_backward(x, lab.reshape(-1), lse, ent, g_lp, g_h, temperature, out)
    assert_close(out, ref_dlogits(x, lab, temperature, g_lp, g_h), F32, "grad")
    buf = x.clone()  # in-place
    cu.logprobs_backward(buf, lab.reshape(-1), lse, ent, g_lp, g_h, temperature, buf)
    assert torch.equal(buf, out)


def test_strided_nan_and_bf16(cu):
    big, _ = _logits((3, 9), 1031, seed=5)
    view = big[:, :-1, :]
    lab = torch.randint(0, 1031, (3, 8), device="cuda")
    logp, ent, _ = cu.logprobs_forward(view, lab.reshape(-1), 1.0, True)
    e_lp, e_h = ref.logprobs_and_entropy(view.double(), lab)
    assert_close(logp, e_lp.reshape(-1), F32)
    assert_close(ent, e_h.reshape(-1), F32)
    bad = big.clone()
    bad[1, 2, 7] = float("nan")  # (the public op turns this into a device-side assert on CUDA)
    bad[2, 4, 9] = float("inf")
    bad[0, 3] = NEG_INF
    _, _, lse_bad = cu.logprobs_forward(bad, torch.zeros(27, dtype=torch.int64, device="cuda"), 1.0, True)
    assert torch.isnan(lse_bad[1 * 9 + 2]) and not torch.isfinite(lse_bad[2 * 9 + 4])
    assert lse_bad[3] == NEG_INF and torch.isfinite(lse_bad).sum() == 24
    xb, labb = _logits((41,), 1271, seed=7, dtype=torch.bfloat16)
    lp_b = fastppo.token_logprobs(xb, labb, backend="cuda")
    eager = torch.log_softmax(xb, -1).gather(-1, labb[:, None]).squeeze(-1)
    assert_no_worse_than_torch(lp_b, ref.token_logprobs(xb.double(), labb), eager)


@pytest.mark.parametrize("b,t", [(7, 33), (1, 1), (4, 16384), (256, 1024), (3, 5000)])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.0, 0.0)])
def test_gae_chunked_scan_matches_fp64(cu, b, t, gamma, lam):
    g = torch.Generator().manual_seed(b + t)
    r, v = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    if b > 2:
        mask[1] = False
    boot = torch.randn(b, generator=g)
    adv, ret = cu.gae_forward(r.cuda(), v.cuda(), mask.cuda(), boot.cuda(), gamma, lam)
    e_adv, e_ret = ref.gae(r.double(), v.double(), mask, gamma=gamma, lam=lam, bootstrap_value=boot.double())
    if gamma == 1.0 and lam == 1.0 and t > 4096:  # undiscounted 16k-token sums: held to the fp32 loop's drift
        f_adv, _ = ref.gae(r, v, mask, gamma=gamma, lam=lam, bootstrap_value=boot)
        assert_no_worse_than_torch(adv.cpu(), e_adv, f_adv, slack=2.0)
    else:
        assert_close(adv.cpu(), e_adv, F32)
        assert_close(ret.cpu(), e_ret, F32)
