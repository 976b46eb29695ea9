"""GAE reverse scan of the C++ CPU extension against the float64 reference loop (fastppo.reference.gae):
masks with holes, all-masked rows, T=1, B=1, gamma/lam in {1, 0.99/0.95, 0}, bootstrap values, long rows."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import fastppo
from fastppo import reference as ref
from fastppo.autograd import direct_call_ok
from tests.tolerances import assert_close, assert_no_worse_than_torch

F32 = torch.float32


def _inputs(b: int, t: int, seed: int, holes: bool = True):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(b, t, generator=g)
    v = torch.randn(b, t, generator=g)
    if holes:
        mask = torch.rand(b, t, generator=g) > 0.3  # holes anywhere, carry-forward semantics
    else:  # right-padded responses
        lens = torch.randint(0, t + 1, (b,), generator=g)
        mask = torch.arange(t)[None, :] < lens[:, None]
    boot = torch.randn(b, generator=g)
    return r, v, mask, boot


GAMMA_LAM = [(1.0, 1.0), (0.99, 0.95), (0.0, 0.0), (1.0, 0.95), (0.99, 0.0)]


@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
@pytest.mark.parametrize("b,t", [(7, 33), (1, 50), (5, 1), (1, 1)])
@pytest.mark.parametrize("bootstrap", [False, True])
def test_launcher_matches_fp64(cpp, gamma, lam, b, t, bootstrap):
    r, v, mask, boot = _inputs(b, t, seed=b * 100 + t)
    if b > 2:
        mask[1] = False  # an all-masked row: zeros
        mask[2, -1] = False  # the last token masked: the bootstrap carries over it
    bt = boot if bootstrap else None
    adv, ret = cpp.gae_forward(r, v, mask, bt, gamma, lam)
    e_adv, e_ret = ref.gae(r.double(), v.double(), mask, gamma=gamma, lam=lam,
                           bootstrap_value=bt.double() if bootstrap else None)
    assert adv.dtype == ret.dtype == F32 and adv.shape == (b, t)
    assert_close(adv, e_adv, F32)
    assert_close(ret, e_ret, F32)
    assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)


@pytest.mark.parametrize("holes", [True, False])
def test_public_op_matches_fp64(holes):
    r, v, mask, boot = _inputs(16, 200, seed=3, holes=holes)
    adv, ret = fastppo.gae(r, v, mask, gamma=0.99, lam=0.95, bootstrap_value=boot, backend="cpp")
    e_adv, e_ret = ref.gae(r.double(), v.double(), mask, gamma=0.99, lam=0.95, bootstrap_value=boot.double())
    assert_close(adv, e_adv, F32)
    assert_close(ret, e_ret, F32)
    # non-contiguous inputs and float masks are converted by the op
    adv2, _ = fastppo.gae(r.t().contiguous().t(), v, mask.float(), gamma=0.99, lam=0.95, bootstrap_value=boot,
                          backend="cpp")
    assert torch.equal(adv2, adv)


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (1.0, 1.0)])
def test_long_sequences(cpp, gamma, lam):
    """T = 16384 at small B: fp32 accumulation, no worse than the reference loop run in fp32."""
    r, v, mask, boot = _inputs(3, 16384, seed=11)
    adv, ret = cpp.gae_forward(r, v, mask, boot, gamma, lam)
    e_adv, e_ret = ref.gae(r.double(), v.double(), mask, gamma=gamma, lam=lam, bootstrap_value=boot.double())
    if gamma < 1.0:
        assert_close(adv, e_adv, F32)
        assert_close(ret, e_ret, F32)
    else:  # undiscounted sums over 16k tokens: the fp32 loop itself drifts; hold the kernel to it
        f_adv, f_ret = ref.gae(r, v, mask, gamma=gamma, lam=lam, bootstrap_value=boot)
        assert_no_worse_than_torch(adv, e_adv, f_adv, slack=1.5)
        assert_no_worse_than_torch(ret, e_ret, f_ret, slack=1.5)


def test_batch_invariance_and_threads(cpp):
    r, v, mask, boot = _inputs(300, 257, seed=5)  # above the parallel threshold
    adv, ret = cpp.gae_forward(r, v, mask, boot, 0.99, 0.95)
    a1, r1 = cpp.gae_forward(r[7:8], v[7:8], mask[7:8], boot[7:8], 0.99, 0.95)
    assert torch.equal(a1, adv[7:8]) and torch.equal(r1, ret[7:8])
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a_1t, _ = cpp.gae_forward(r, v, mask, boot, 0.99, 0.95)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(a_1t, adv)


def test_gae_compiles_fullgraph_through_the_custom_op():
    """A compiled caller traces fastppo.gae as one custom op (no graph break into the launcher)."""
    g = torch.Generator().manual_seed(12)
    r, v = torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g)
    m = torch.rand(3, 40, generator=g) > 0.3

    def f(r, v, m):
        adv, ret = fastppo.gae(r, v, m, gamma=0.99, lam=0.95, whiten_advantages=True, backend="cpp")
        return adv * 2.0, ret

    adv, ret = torch.compile(f, fullgraph=True)(r, v, m)
    e_adv, e_ret = f(r, v, m)
    torch.testing.assert_close(adv, e_adv)
    torch.testing.assert_close(ret, e_ret)


class _OpLog(TorchDispatchMode):
    """Records the ops that reach the dispatcher (a dispatch mode also makes fastppo.gae take its custom op)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bootstrap", [False, True])
@pytest.mark.parametrize("whiten", [False, True])
def test_eager_direct_call_matches_the_custom_op(bootstrap, whiten):
    """Eager calls skip the fastppo::gae custom op (its dispatch costs ~10 us); traced calls keep it. Same kernel,
    so the two paths agree bit for bit."""
    r, v, mask, boot = _inputs(9, 70, seed=21)
    kw = dict(gamma=0.99, lam=0.95, bootstrap_value=boot if bootstrap else None, whiten_advantages=whiten,
              backend="cpp")
    assert direct_call_ok(r, v, mask, boot)
    adv, ret = fastppo.gae(r, v, mask, **kw)
    with _OpLog() as log:
        adv_op, ret_op = fastppo.gae(r, v, mask, **kw)
    assert "fastppo.gae.default" in log.ops
    assert torch.equal(adv, adv_op) and torch.equal(ret, ret_op)
    e_adv, e_ret = ref.gae(r.double(), v.double(), mask, gamma=0.99, lam=0.95,
                           bootstrap_value=boot.double() if bootstrap else None)
    if whiten:
        e_adv = ref.masked_whiten(e_adv, mask) * mask
    assert_close(adv, e_adv, F32)
    assert_close(ret, e_ret, F32)


def test_inputs_that_require_grad_take_the_custom_op():
    """Inputs that require grad go through the custom op, whose backward is the reference recursion's
    vector-Jacobian product (differentiating GAE works, not an error inside torch); the values equal the eager
    shortcut's."""
    r, v, mask, _ = _inputs(4, 30, seed=22)
    v.requires_grad_(True)
    assert not direct_call_ok(r, v, mask, None)
    adv, ret = fastppo.gae(r, v, mask, backend="cpp")
    assert ret.requires_grad
    ret.sum().backward()
    v64 = v.detach().double().requires_grad_()
    ref.gae(r.double(), v64, mask)[1].sum().backward()
    assert torch.allclose(v.grad.double(), v64.grad, atol=1e-5)
    with torch.no_grad():
        adv_ng, _ = fastppo.gae(r, v, mask, backend="cpp")
    assert torch.equal(adv_ng, adv.detach())


def test_fake_tensors_trace_through_the_custom_op():
    """Under FakeTensorMode (no data) the op's fake impl answers; the launcher would read data pointers."""
    with FakeTensorMode() as mode:
        r = mode.from_tensor(torch.randn(3, 17))
        m = mode.from_tensor(torch.ones(3, 17, dtype=torch.bool))
        assert not direct_call_ok(r, r, m, None)
        adv, ret = fastppo.gae(r, r, m, backend="cpp")
    assert isinstance(adv, FakeTensor) and adv.shape == (3, 17) and adv.dtype == ret.dtype == F32
