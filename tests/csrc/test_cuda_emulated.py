"""The CUDA kernels of csrc/cuda, executed on the CPU by the SIMT emulator of ``tests/csrc/cuda_emu``, against the
float64 reference. Runs in CI (no GPU needed): the same kernel source, binding and launcher layer as
``backend="cuda"``, built with the emulated CUDA headers. It checks arithmetic, indexing, masking, strides,
alignment heads/tails, the warp/block reductions and the chunked GAE scan across tiles. Speed, the real
memory system and nvcc's code generation are only covered by ``test_cuda.py`` on a GPU (marked ``gpu``)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

import fastppo
from fastppo import _dispatch, _native
from fastppo import reference as ref
from fastppo._contract import KL_KINDS, PPO_TERMS, TERM
from tests.csrc import cuda_emu
from tests.csrc.checks import (
    check_public_ppo_loss,
    check_row_offsets_past_int32,
    random_logits,
    random_vector,
    ref_dlogits,
)
from tests.tolerances import assert_close, assert_no_worse_than_torch

F32 = torch.float32
NEG_INF = float("-inf")
_T = TERM


@pytest.fixture(scope="module")
def cu(emu_cuda_module):
    return cuda_emu.EmulatedCudaLaunchers(emu_cuda_module)


@pytest.fixture
def cuda_backend_on_cpu(cu, monkeypatch):
    """``backend="cuda"`` accepts CPU tensors and runs the emulated kernels through the public ops."""
    probe = _dispatch._probe
    monkeypatch.setitem(_native._STATE, "cuda", (cu.module, None, cu))
    monkeypatch.setattr(_dispatch, "_probe", lambda name: (_dispatch.BackendInfo("cuda", True, "emulated")
                                                           if name == "cuda" else probe(name)))
    device_ok = _dispatch._device_ok
    monkeypatch.setattr(_dispatch, "_device_ok", lambda name, dev: name == "cuda" or device_ok(name, dev))


# ---------------------------------------------------------------------------------------------- emulator
def test_rewrite_launches_turns_chevrons_into_calls():
    src = "k<E><<<static_cast<unsigned>(N), kThreads, 0, s>>>(f(a, b), c);\nplain<<<g, b>>>(x);"
    out = cuda_emu.rewrite_launches(src)
    assert out == ("::fastppo_emu::launch([&]() { k<E>(f(a, b), c); }, static_cast<unsigned>(N), kThreads, 0, s);\n"
                   "::fastppo_emu::launch([&]() { plain(x); }, g, b);")


SELFTEST = r"""
#include <cuda_runtime.h>
#include <stdio.h>

// correct: a block sum through warp shuffles and shared memory
__global__ void block_sum(const float* x, float* out) {
  __shared__ float part[8];
  float v = x[blockIdx.x * blockDim.x + threadIdx.x];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) s += part[w];
    out[blockIdx.x] = s;
  }
}

// racy: reads a neighbour's shared slot without a barrier
__global__ void racy_shift(const float* x, float* out) {
  __shared__ float buf[256];
  buf[threadIdx.x] = x[threadIdx.x];
  out[threadIdx.x] = buf[(threadIdx.x + 1) % blockDim.x];
}

// uninitialised: block 1 reads shared slots only block 0 wrote (a GPU leaves them undefined)
__global__ void stale_shared(float* out) {
  __shared__ float slot[32];
  if (blockIdx.x == 0) slot[threadIdx.x] = 1.0f;
  __syncthreads();
  out[blockIdx.x * 32 + threadIdx.x] = slot[threadIdx.x];
}

__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void shuffle_after_exit(float* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f * threadIdx.x, 1);
}

int main() {
  float x[256], out[256], sums[2];
  for (int i = 0; i < 256; ++i) x[i] = (float)i;
  block_sum<<<2, 128>>>(x, sums);
  printf("sum %d %g %g\n", (int)cudaGetLastError(), sums[0], sums[1]);
  int differs = 0;
  for (int rep = 0; rep < 8; ++rep) {
    racy_shift<<<1, 256>>>(x, out);
    for (int i = 0; i < 256; ++i) differs += out[i] != x[(i + 1) % 256];
  }
  printf("race %d\n", differs > 0);
  float stale[64];
  stale_shared<<<2, 32>>>(stale);
  int written = 0, poisoned = 0;
  for (int i = 0; i < 32; ++i) written += stale[i] == 1.0f, poisoned += stale[32 + i] != stale[32 + i];
  printf("uninit %d %d %d\n", (int)cudaGetLastError(), written, poisoned);
  divergent_barrier<<<1, 64>>>(out);
  cudaError_t e = cudaGetLastError();
  printf("divergent %d %s\n", (int)e, cudaGetErrorString(e));
  shuffle_after_exit<<<1, 32>>>(out);
  e = cudaGetLastError();
  printf("exited %d %s\n", (int)e, cudaGetErrorString(e));
  block_sum<<<1, 2048>>>(x, sums);
  printf("too_big %d\n", (int)cudaGetLastError());
  return 0;
}
"""


def test_emulator_runs_correct_kernels_and_catches_broken_ones(tmp_path):
    """The emulator is itself tested: right sums from shuffles + shared memory; a missing barrier shows up as
    an order-dependent result; a read of shared memory the block did not write gives NaN (not the previous
    block's value, nor a zero); a divergent barrier, a shuffle with an exited lane and an oversized block fail
    the launch with a message."""
    cxx = shutil.which("c++") or shutil.which("g++")
    src = tmp_path / "selftest.cpp"
    src.write_text(cuda_emu.rewrite_launches(SELFTEST))
    exe = tmp_path / "selftest"
    res = subprocess.run([cxx, "-std=c++17", "-O1", f"-I{cuda_emu.HERE}", str(src), str(cuda_emu.HERE / "simt.cpp"),
                          "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = dict(line.split(" ", 1) for line in run.stdout.strip().splitlines())
    assert lines["sum"] == f"0 {sum(range(128))} {sum(range(128, 256))}"
    assert lines["race"] == "1"
    assert lines["uninit"] == "0 32 32"  # block 0 reads what it wrote; block 1 reads NaN in all 32 slots
    assert lines["divergent"].startswith("719 ") and "divergent barrier" in lines["divergent"]
    assert lines["exited"].startswith("719 ") and "31 of 32 lanes" in lines["exited"]
    assert lines["too_big"] == "9"


# ------------------------------------------------------------------------------------------- row kernels
@pytest.mark.parametrize(
    "b,t,v,temperature",
    [(1, 41, 1271, 1.0), (3, 7, 1271, 0.7), (1, 5, 1, 1.0), (2, 3, 17, 2.0), (1, 3, 32000, 1.0), (2, 2, 4100, 1.3)],
)
def test_row_kernels_match_fp64(cu, b, t, v, temperature):
    x, lab = random_logits((b, t), v, seed=v + t)
    if v > 2:
        x[0, 0, : v // 2] = NEG_INF  # masked vocabulary entries (the label stays finite below)
        lab[0, 0] = v - 1
    n = b * t
    logp, ent, lse = cu.logprobs_forward(x, lab.reshape(-1), temperature, True)
    e_lp, e_h = ref.logprobs_and_entropy(x.double(), lab, temperature=temperature)
    assert logp.dtype == ent.dtype == lse.dtype == F32
    assert_close(logp, e_lp.reshape(-1), F32)
    assert_close(ent, e_h.reshape(-1), F32)
    assert_close(lse, torch.logsumexp(x.double() / temperature, -1).reshape(-1), F32)
    lp2, none, lse2 = cu.logprobs_forward(x, lab.reshape(-1), temperature, False)
    assert none is None and torch.equal(lp2, logp) and torch.equal(lse2, lse)

    g_lp, g_h = random_vector(n, 1), random_vector(n, 2)
    g_lp[0] = 0.0  # a row with an upstream gradient on the entropy only
    out = torch.empty_like(x)
    cu.logprobs_backward(x, lab.reshape(-1), lse, ent, g_lp, g_h, temperature, out)
    assert_close(out, ref_dlogits(x, lab, temperature, g_lp, g_h), F32, "grad")
    cu.logprobs_backward(x, lab.reshape(-1), lse, None, g_lp, None, temperature, out)
    assert_close(out, ref_dlogits(x, lab, temperature, g_lp, None), F32, "grad")
    buf = x.clone()  # in place: the same values, bitwise, as out of place
    cu.logprobs_backward(buf, lab.reshape(-1), lse, ent, g_lp, g_h, temperature, buf)
    cu.logprobs_backward(x, lab.reshape(-1), lse, ent, g_lp, g_h, temperature, out)
    assert torch.equal(buf, out)


def test_zero_gradient_rows_write_zeros_without_reading(cu):
    x, lab = random_logits((2, 4), 300, seed=3)
    _, ent, lse = cu.logprobs_forward(x, lab.reshape(-1), 1.0, True)
    g = random_vector(8, 4)
    g[[1, 5]] = 0.0
    out = torch.full_like(x, 7.0)
    poisoned = x.clone()
    poisoned[0, 1] = float("nan")  # never read: its row has no upstream gradient
    poisoned[1, 1] = float("nan")
    cu.logprobs_backward(poisoned, lab.reshape(-1), lse, ent, g, torch.zeros(8), 1.0, out)
    assert torch.all(out[0, 1] == 0) and torch.all(out[1, 1] == 0)
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[0, 1] = keep[1, 1] = False
    assert_close(out[keep], ref_dlogits(x, lab, 1.0, g, torch.zeros(8))[keep], F32, "grad")


def test_strided_misaligned_rows_and_out(cu):
    """Row starts off 16-byte alignment (V=1031 fp32), a sliced [B, T] view, and an out buffer whose alignment
    differs from the input's (the kernel's plain, non-vector path)."""
    big, _ = random_logits((3, 9), 1031, seed=5)
    view = big[:, 1:, :]
    lab = torch.randint(0, 1031, (3, 8), generator=torch.Generator().manual_seed(6))
    logp, ent, lse = cu.logprobs_forward(view, lab.reshape(-1), 1.0, True)
    e_lp, e_h = ref.logprobs_and_entropy(view.double(), lab)
    assert_close(logp, e_lp.reshape(-1), F32)
    assert_close(ent, e_h.reshape(-1), F32)
    g_lp, g_h = random_vector(24, 7), random_vector(24, 8)
    want = ref_dlogits(view, lab, 1.0, g_lp, g_h)
    for out in (torch.empty(3, 8, 1031), torch.empty(3, 8, 1032)[:, :, 1:], torch.empty(3, 16, 1031)[:, ::2]):
        out.fill_(float("nan"))
        cu.logprobs_backward(view, lab.reshape(-1), lse, ent, g_lp, g_h, 1.0, out)
        assert_close(out, want, F32, "grad")


def test_non_finite_rows(cu):
    x, _ = random_logits((3, 9), 1031, seed=5)
    x[1, 2, 7] = float("nan")
    x[2, 4, 9] = float("inf")
    x[0, 3] = NEG_INF
    _, _, lse = cu.logprobs_forward(x, torch.zeros(27, dtype=torch.int64), 1.0, True)
    assert torch.isnan(lse[1 * 9 + 2]) and not torch.isfinite(lse[2 * 9 + 4])
    assert lse[3] == NEG_INF and torch.isfinite(lse).sum() == 24


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_pytorch(cu, dtype):
    x, lab = random_logits((1, 41), 1271, seed=7, dtype=dtype)
    logp, ent, lse = cu.logprobs_forward(x, lab.reshape(-1), 1.0, True)
    e_lp, e_h = ref.logprobs_and_entropy(x.double(), lab)
    eager_lp = torch.log_softmax(x, -1).gather(-1, lab[..., None]).squeeze(-1)
    assert_no_worse_than_torch(logp, e_lp.reshape(-1), eager_lp.reshape(-1))
    assert_close(ent, e_h.reshape(-1), F32)  # fp32 accumulation over exactly rounded inputs
    g_lp, g_h = random_vector(41, 1), random_vector(41, 2)
    out = torch.empty_like(x)
    cu.logprobs_backward(x, lab.reshape(-1), lse, ent, g_lp, g_h, 1.0, out)
    assert out.dtype == dtype
    want = ref_dlogits(x, lab, 1.0, g_lp, g_h)
    xe = x.detach().clone().requires_grad_()
    lp_e = torch.log_softmax(xe, -1).gather(-1, lab[..., None]).squeeze(-1)
    h_e = -(torch.softmax(xe, -1) * torch.log_softmax(xe, -1)).sum(-1)
    ((lp_e * g_lp.view(1, 41).to(dtype)).sum() + (h_e * g_h.view(1, 41).to(dtype)).sum()).backward()
    assert_no_worse_than_torch(out, want, xe.grad)


# ------------------------------------------------------------------------------------------- PPO terms
def test_ppo_terms_match_reference_and_autograd(cu):
    g = torch.Generator().manual_seed(1)
    b, t, v = 3, 9, 771
    logits = torch.randn(b, t, v, generator=g) * 2
    labels = torch.randint(0, v, (b, t), generator=g)
    lp = ref.token_logprobs(logits.double(), labels, temperature=0.9)
    old = (lp + torch.randn(b, t, generator=g, dtype=torch.float64)).float()
    rlp = (lp + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(b, t, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.25
    m = mask.reshape(-1)
    poisoned = logits.clone()
    poisoned[~mask] = float("nan")  # masked rows are never read
    x64 = logits.double()
    lp64 = ref.token_logprobs(x64, labels, temperature=0.9).reshape(-1).requires_grad_()
    h64 = ref.token_entropy(x64, temperature=0.9).reshape(-1)
    for kind_i, kind in enumerate(KL_KINDS):
        for dual in (0.0, 3.0):
            terms = cu.ppo_loss_forward(poisoned, labels.reshape(-1), old.reshape(-1), adv.reshape(-1),
                                        rlp.reshape(-1), mask.float().reshape(-1), 0.9, 0.2, 0.28, dual, kind_i,
                                        0.05, 0.01)
            assert terms.shape == (len(PPO_TERMS), b * t) and torch.all(terms[:, ~m] == 0)
            pg, ratio, clipped, dual_c = ref.ppo_token_terms(lp64, old.double().reshape(-1), adv.double().reshape(-1),
                                                              clip_low=0.2, clip_high=0.28, dual_clip=dual or None)
            kl = ref.kl_penalty(lp64, rlp.double().reshape(-1), kind)
            (dpg,) = torch.autograd.grad(pg.sum(), lp64, retain_graph=True)
            (dkl,) = torch.autograd.grad(kl.sum(), lp64, retain_graph=True)
            want = {"logp": lp64, "entropy": h64, "pg": pg, "ratio": ratio, "kl": kl, "dpg": dpg, "dkl": dkl,
                    "clipped": clipped.double(), "dual_clipped": dual_c.double(), "loss": pg + 0.05 * kl - 0.01 * h64,
                    "lse": torch.logsumexp(x64 / 0.9, -1).reshape(-1)}
            for name, w in want.items():
                assert_close(terms[_T[name], m], w.detach()[m], F32)
            assert clipped[m].any() and (~clipped[m]).any()
            assert dual_c[m].any() if dual else True
    terms = cu.ppo_loss_forward(logits, labels.reshape(-1), old.reshape(-1), adv.reshape(-1), None,
                                mask.float().reshape(-1), 1.0, 0.2, 0.2, 0.0, 2, 0.0, 0.0)
    assert torch.all(terms[_T["kl"]] == 0) and torch.equal(terms[_T["loss"]], terms[_T["pg"]])


# ------------------------------------------------------------------------------------------------- GAE
@pytest.mark.parametrize("b,t", [(7, 33), (1, 1), (2, 4096), (3, 9000), (1, 513)])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.0, 0.0)])
def test_gae_chunked_scan_matches_fp64(cu, b, t, gamma, lam):
    g = torch.Generator().manual_seed(b + t)
    r, v = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3  # holes anywhere: carry-forward across tiles too
    if b > 2:
        mask[1] = False
    boot = torch.randn(b, generator=g)
    for bt in (None, boot):
        adv, ret = cu.gae_forward(r, v, mask, bt, gamma, lam)
        e_adv, e_ret = ref.gae(r.double(), v.double(), mask, gamma=gamma, lam=lam,
                               bootstrap_value=None if bt is None else bt.double())
        if gamma == 1.0 and lam == 1.0 and t > 1000:  # undiscounted long sums: held to the fp32 loop's drift
            f_adv, f_ret = ref.gae(r, v, mask, gamma=gamma, lam=lam, bootstrap_value=bt)
            assert_no_worse_than_torch(adv, e_adv, f_adv, slack=2.0)
            assert_no_worse_than_torch(ret, e_ret, f_ret, slack=2.0)
        else:
            assert_close(adv, e_adv, F32)
            assert_close(ret, e_ret, F32)
        assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)


# ------------------------------------------------------------------------------ public ops, backend="cuda"
def test_public_logprobs_entropy_with_cuda_backend(cuda_backend_on_cpu):
    x, lab = random_logits((2, 9), 1271, seed=11)
    g = torch.Generator().manual_seed(12)
    g_lp, g_h = torch.randn(2, 9, generator=g), torch.randn(2, 9, generator=g)
    xg = x.clone().requires_grad_()
    lp, h = fastppo.logprobs_and_entropy(xg, lab, temperature=0.8, backend="cuda")
    (lp * g_lp + h * g_h).sum().backward()
    e_lp, e_h = ref.logprobs_and_entropy(x.double(), lab, temperature=0.8)
    assert_close(lp, e_lp, F32)
    assert_close(h, e_h, F32)
    assert_close(xg.grad, ref_dlogits(x, lab, 0.8, g_lp, g_h), F32, "grad")
    xi = x.clone().requires_grad_()  # in-place backward: same gradient
    lpi = fastppo.token_logprobs(xi * 1.0, lab, temperature=0.8, backend="cuda", inplace_backward=True)
    (lpi * g_lp).sum().backward()
    assert_close(xi.grad, ref_dlogits(x, lab, 0.8, g_lp, None), F32, "grad")


def test_public_ppo_loss_with_cuda_backend(cuda_backend_on_cpu):
    check_public_ppo_loss("cpu")


def test_public_gae_with_cuda_backend(cuda_backend_on_cpu):
    g = torch.Generator().manual_seed(5)
    r, v = torch.randn(4, 300, generator=g), torch.randn(4, 300, generator=g)
    mask = torch.rand(4, 300, generator=g) > 0.2
    adv, ret = fastppo.gae(r, v, mask, gamma=0.99, lam=0.95, backend="cuda")
    e_adv, e_ret = ref.gae(r.double(), v.double(), mask, gamma=0.99, lam=0.95)
    assert_close(adv, e_adv, F32)
    assert_close(ret, e_ret, F32)


def test_row_offsets_past_int32(cu):
    check_row_offsets_past_int32(cu)
