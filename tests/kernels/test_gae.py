"""Triton GAE (chunked reverse scan) against the float64 reference loop.

Under ``TRITON_INTERPRET=1`` the scan's combine runs element by element in Python, so CPU shapes stay small;
``small_chunk`` forces 16-step chunks so that short sequences still cross many chunk boundaries.
"""

from __future__ import annotations

import pytest
import torch

import fastppo
from fastppo import reference as ref
from fastppo.kernels import launchers as fk
from tests.tolerances import tol

gae_forward = fk.gae_forward


def _inputs(b: int, t: int, seed: int, p_valid: float = 0.75, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(b, t, generator=g)
    v = torch.randn(b, t, generator=g)
    m = torch.rand(b, t, generator=g) < p_valid
    boot = torch.randn(b, generator=g)
    return r.to(device), v.to(device), m.to(device), boot.to(device)


def _check(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 table tolerance, with the absolute part scaled by the sequence magnitude: a scan reassociates a
    T-long sum, so its fp32 error grows with the size of the partial sums, not of each output."""
    a, e = actual.double().cpu(), expected.double().cpu()
    assert not torch.isnan(a).any()
    atol, rtol = tol(torch.float32, "value")
    bound = atol * (1.0 + e.abs().amax()) + rtol * e.abs()
    bad = (a - e).abs() > bound
    assert not bad.any(), f"{int(bad.sum())} off; max err {float((a - e).abs().max()):.3e}"


def _ref(r, v, m, boot, gamma, lam):
    return ref.gae(r.double(), v.double(), m, gamma=gamma, lam=lam,
                   bootstrap_value=None if boot is None else boot.double())


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.0, 0.95), (0.99, 0.0), (0.0, 0.0)])
@pytest.mark.parametrize("bootstrap", [False, True])
def test_launcher_matches_reference_many_chunks(gamma, lam, bootstrap, small_chunk, device):
    r, v, m, boot = _inputs(5, 53, seed=1, device=device)  # 53 = 3 chunks of 16 and a partial one
    m[1] = False  # all-masked row
    m[2] = True  # contiguous row
    m[3, 30:] = False  # right padding
    m[4, :20] = False  # left padding
    boot = boot if bootstrap else None
    adv, ret = gae_forward(r, v, m, boot, gamma, lam)
    e_adv, e_ret = _ref(r, v, m, boot, gamma, lam)
    assert adv.dtype == ret.dtype == torch.float32
    _check(adv, e_adv)
    _check(ret, e_ret)
    assert torch.all(adv[~m] == 0) and torch.all(ret[~m] == 0)


@pytest.mark.parametrize("b,t", [(1, 1), (3, 1), (2, 2), (4, 17), (2, 300), (1, 257)])
def test_launcher_odd_shapes_default_chunk(b, t, device):
    r, v, m, boot = _inputs(b, t, seed=b * 1000 + t, device=device)
    for bt in (None, boot):
        adv, ret = gae_forward(r, v, m, bt, 0.99, 0.95)
        e_adv, e_ret = _ref(r, v, m, bt, 0.99, 0.95)
        _check(adv, e_adv)
        _check(ret, e_ret)


def test_chunk_boundaries_with_holes(small_chunk, device):
    """Valid tokens only at chunk edges and whole chunks masked: the carries must hop over them."""
    r, v, m, boot = _inputs(3, 96, seed=7, device=device)
    m[:] = False
    m[0, [0, 15, 16, 31, 80, 95]] = True
    m[1, [5]] = True  # one valid token, 5 empty chunks after it
    m[2, 48:64] = True  # exactly one full chunk valid
    adv, ret = gae_forward(r, v, m, boot, 0.9, 0.8)
    e_adv, e_ret = _ref(r, v, m, boot, 0.9, 0.8)
    _check(adv, e_adv)
    _check(ret, e_ret)


def test_long_sequence(device):
    """B = 1, T = 16384 (the longest GPU GAE case, ~7 s under the interpreter): 64 default chunks of 256."""
    r, v, m, boot = _inputs(1, 16384, seed=8, p_valid=0.9, device=device)
    adv, ret = gae_forward(r, v, m, boot, 1.0, 1.0)  # no decay: the longest sums, the hardest case for fp32
    e_adv, e_ret = _ref(r, v, m, boot, 1.0, 1.0)
    _check(adv, e_adv)
    _check(ret, e_ret)


def test_public_gae_triton_backend(device):
    r, v, m, boot = _inputs(4, 37, seed=9, device=device)
    kw = dict(gamma=0.99, lam=0.95, bootstrap_value=boot)
    adv, ret = fastppo.gae(r, v, m, backend="triton", **kw)
    e_adv, e_ret = _ref(r, v, m, boot, 0.99, 0.95)
    _check(adv, e_adv)
    _check(ret, e_ret)
    # bf16 inputs and float masks take the same kernel (fp32 math on the promoted inputs)
    adv16, _ = fastppo.gae(r.bfloat16(), v.bfloat16(), m.float(), backend="triton", **kw)
    e16, _ = _ref(r.bfloat16(), v.bfloat16(), m, boot, 0.99, 0.95)
    _check(adv16, e16)
    w_adv, _ = fastppo.gae(r, v, m, backend="triton", whiten_advantages=True, **kw)
    assert torch.all(w_adv[~m] == 0)


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("chunked", [False, True])
def test_fused_whitening_matches_reference(shift_mean, chunked, request, device):
    if chunked:
        request.getfixturevalue("small_chunk")
    r, v, m, boot = _inputs(4, 45, seed=11, device=device)
    r = r + 3.0  # a mean far from 0: the merge of per-chunk moments must not lose the variance
    m[1] = False
    adv, ret = fk.gae_whiten_forward(r, v, m, boot, 0.99, 0.95, shift_mean=shift_mean)
    e_adv, e_ret = _ref(r, v, m, boot, 0.99, 0.95)
    e_w = ref.masked_whiten(e_adv, m, shift_mean=shift_mean) * m
    _check(adv, e_w)
    _check(ret, e_ret)
    assert torch.all(adv[~m] == 0)


def test_launcher_rejects_bad_inputs(device):
    r, v, m, boot = _inputs(2, 5, seed=10, device=device)
    with pytest.raises(ValueError):
        gae_forward(r.double(), v, m, boot, 1.0, 0.95)
    with pytest.raises(ValueError):
        gae_forward(r, v[:, :4].contiguous(), m, boot, 1.0, 0.95)
    with pytest.raises(ValueError):
        gae_forward(r, v, m, boot[:1], 1.0, 0.95)


@pytest.mark.gpu
@pytest.mark.parametrize("b,t", [(1, 16384), (4, 16384), (256, 1024), (64, 4096)])
def test_gpu_real_size(b, t):
    r, v, m, boot = _inputs(b, t, seed=b + t, p_valid=0.9, device="cuda")
    for gamma, lam in ((1.0, 1.0), (0.99, 0.95), (0.0, 0.0)):
        adv, ret = gae_forward(r, v, m, boot, gamma, lam)
        e_adv, e_ret = _ref(r, v, m, boot, gamma, lam)
        _check(adv, e_adv)
        _check(ret, e_ret)
    w_adv, _ = fk.gae_whiten_forward(r, v, m, boot, 0.99, 0.95)
    e_adv, _ = _ref(r, v, m, boot, 0.99, 0.95)
    _check(w_adv, ref.masked_whiten(e_adv, m) * m)


def test_public_gae_whiten_uses_the_fused_triton_path():
    from tests.tolerances import assert_close

    g = torch.Generator().manual_seed(21)
    r, v = torch.randn(3, 70, generator=g), torch.randn(3, 70, generator=g)
    m = torch.rand(3, 70, generator=g) > 0.3
    adv, ret = fastppo.gae(r, v, m, gamma=0.99, lam=0.95, whiten_advantages=True, backend="triton")
    raw, e_ret = ref.gae(r.double(), v.double(), m, gamma=0.99, lam=0.95)
    assert_close(adv, ref.masked_whiten(raw, m) * m, torch.float32)
    assert_close(ret, e_ret, torch.float32)
