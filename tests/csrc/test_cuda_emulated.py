"""The CUDA kernels of csrc/cuda, executed on the CPU by the SIMT emulator of ``tests/csrc/cuda_emu``, against the
float64 reference. Runs in CI (no GPU needed): the same kernel source, binding and launcher layer as
``backend="cuda"``, built with the emulated CUDA headers. This file tests the emulator itself and what is specific
to the CUDA kernels (alignment heads/tails, rows without gradient left unread, the chunked GAE scan across tiles);
the row ops' values, grads, layouts, dtypes and PPO terms run on the emulator in tests/contract (cuda-emulated).
Speed, the real memory system and nvcc's code generation are only covered on a GPU (marked ``gpu``)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

import fastppo
from fastppo import _dispatch, _native
from fastppo import reference as ref
from tests.csrc import cuda_emu
from tests.helpers import (
    random_logits,
    random_vector,
    ref_dlogits,
)
from tests.tolerances import assert_close, assert_no_worse_than_torch

F32 = torch.float32
NEG_INF = float("-inf")


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


# ------------------------------------------------------------------------------------------- PPO terms
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
def test_public_gae_with_cuda_backend(cuda_backend_on_cpu):
    g = torch.Generator().manual_seed(5)
    r, v = torch.randn(4, 300, generator=g), torch.randn(4, 300, generator=g)
    mask = torch.rand(4, 300, generator=g) > 0.2
    adv, ret = fastppo.gae(r, v, mask, gamma=0.99, lam=0.95, backend="cuda")
    e_adv, e_ret = ref.gae(r.double(), v.double(), mask, gamma=0.99, lam=0.95)
    assert_close(adv, e_adv, F32)
    assert_close(ret, e_ret, F32)


