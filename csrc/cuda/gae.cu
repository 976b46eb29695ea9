// GAE on the GPU as a chunked reverse scan: parallel over the batch (one block per sequence) and over time
// (each thread owns kItems consecutive steps of a kTile-step tile; tiles go right to left).
//
// Walking backwards over valid tokens (carry-forward over masked ones, as fastppo.reference.gae), the state
// is (A = advantage of the next valid token, NV = its value, or the bootstrap). A valid token maps it to
//   A' = gamma*lam*A + gamma*NV + (r - v),   NV' = v,
// an affine map in (A, NV). A run of steps composes to  A' = al*A + ka*NV + be,  NV' = h ? fv : NV
// (h: the run has a valid token, fv: the value of its first one), and composition is associative, so:
//   1. each thread composes the maps of its own steps;
//   2. a block-wide suffix scan (warp shuffles, then across warps) gives each thread the composed map of all
//      steps to its right, applied to the state entering the tile;
//   3. each thread replays its steps from that state, writing advantages and returns.
// Inputs go through shared memory so global loads and stores stay coalesced. fp32 throughout.
#include "common.cuh"
#include "kernels.h"

namespace fastppo {
namespace cuda {

namespace {

constexpr int kGaeThreads = 512;
constexpr int kItems = 8;
constexpr int kTile = kGaeThreads * kItems;  // 4096 steps: 36 KiB of shared memory
constexpr int kGaeWarps = kGaeThreads / 32;

struct Aff {
  float al, ka, be, fv;
  int h;
};

__device__ __forceinline__ Aff identity() { return Aff{1.0f, 0.0f, 0.0f, 0.0f, 0}; }

// `left` applied after `right` (right = later time steps, processed first by the reverse recursion).
__device__ __forceinline__ Aff compose(const Aff& left, const Aff& right) {
  Aff o;
  o.al = left.al * right.al;
  o.ka = left.al * right.ka + (right.h ? 0.0f : left.ka);
  o.be = left.al * right.be + left.be + (right.h ? left.ka * right.fv : 0.0f);
  o.h = left.h | right.h;
  o.fv = left.h ? left.fv : right.fv;
  return o;
}

__device__ __forceinline__ Aff shfl_down(const Aff& a, int off) {
  Aff o;
  o.al = __shfl_down_sync(0xffffffffu, a.al, off);
  o.ka = __shfl_down_sync(0xffffffffu, a.ka, off);
  o.be = __shfl_down_sync(0xffffffffu, a.be, off);
  o.fv = __shfl_down_sync(0xffffffffu, a.fv, off);
  o.h = __shfl_down_sync(0xffffffffu, a.h, off);
  return o;
}

// Inclusive suffix composition over the 32 lanes: lane l gets map_l o map_{l+1} o ... o map_31.
__device__ __forceinline__ Aff warp_suffix(Aff a) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const Aff other = shfl_down(a, off);
    if (lane + off < 32) a = compose(a, other);
  }
  return a;
}

__global__ void __launch_bounds__(kGaeThreads)
    gae_kernel(const float* __restrict__ rewards, const float* __restrict__ values, const uint8_t* __restrict__ mask,
               const float* __restrict__ bootstrap, int64_t T, float gamma, float gl, float* __restrict__ adv,
               float* __restrict__ ret) {
  __shared__ float s_r[kTile];
  __shared__ float s_v[kTile];
  __shared__ uint8_t s_m[kTile];
  __shared__ Aff s_warp[kGaeWarps];
  __shared__ float s_carry[2];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * T;  // 64-bit row offset
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid == 0) {
    s_carry[0] = 0.0f;  // A after the last valid token
    s_carry[1] = bootstrap != nullptr ? bootstrap[blockIdx.x] : 0.0f;  // NV
  }
  const int64_t ntiles = (T + kTile - 1) / kTile;
  for (int64_t tile = ntiles - 1; tile >= 0; --tile) {
    const int64_t t0 = tile * kTile;
    for (int i = tid; i < kTile; i += kGaeThreads) {  // coalesced loads into shared memory
      const int64_t t = t0 + i;
      const bool in = t < T;
      s_r[i] = in ? rewards[row + t] : 0.0f;
      s_v[i] = in ? values[row + t] : 0.0f;
      s_m[i] = in ? mask[row + t] : 0;
    }
    __syncthreads();
    const float a_in = s_carry[0], nv_in = s_carry[1];
    // 1. this thread's steps, right to left
    Aff mine = identity();
    const int base = tid * kItems;
#pragma unroll
    for (int k = kItems - 1; k >= 0; --k) {
      if (s_m[base + k]) {
        const Aff step{gl, gamma, s_r[base + k] - s_v[base + k], s_v[base + k], 1};
        mine = compose(step, mine);
      }
    }
    // 2. suffix scan: lanes, then warps
    const Aff incl = warp_suffix(mine);
    if (lane == 0) s_warp[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      const Aff w = warp_suffix(lane < kGaeWarps ? s_warp[lane] : identity());
      __syncwarp();
      if (lane < kGaeWarps) s_warp[lane] = w;
    }
    __syncthreads();
    Aff lanes_right = shfl_down(incl, 1);
    if (lane == 31) lanes_right = identity();
    const Aff warps_right = warp + 1 < kGaeWarps ? s_warp[warp + 1] : identity();
    const Aff right = compose(lanes_right, warps_right);
    float A = right.al * a_in + right.ka * nv_in + right.be;
    float NV = right.h ? right.fv : nv_in;
    // 3. replay this thread's steps from the exact incoming state
#pragma unroll
    for (int k = kItems - 1; k >= 0; --k) {
      const int i = base + k;
      if (s_m[i]) {
        const float v = s_v[i];
        A = (s_r[i] + gamma * NV - v) + gl * A;
        NV = v;
        s_r[i] = A;
        s_v[i] = A + v;
      } else {
        s_r[i] = 0.0f;
        s_v[i] = 0.0f;
      }
    }
    __syncthreads();  // everyone has read s_carry and written its outputs
    if (tid == 0) {   // thread 0 ends at the tile's first step: the state entering the tile to the left
      s_carry[0] = A;
      s_carry[1] = NV;
    }
    for (int i = tid; i < kTile; i += kGaeThreads) {
      const int64_t t = t0 + i;
      if (t < T) {
        adv[row + t] = s_r[i];
        ret[row + t] = s_v[i];
      }
    }
    __syncthreads();
  }
}

}  // namespace

int gae_forward(const float* rewards, const float* values, const uint8_t* mask, const float* bootstrap, int64_t B,
                int64_t T, double gamma, double lam, float* advantages, float* returns, int device, void* stream) {
  if (B == 0 || T == 0) return 0;
  DeviceGuard guard(device);
  gae_kernel<<<static_cast<unsigned>(B), kGaeThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      rewards, values, mask, bootstrap, T, static_cast<float>(gamma), static_cast<float>(gamma * lam), advantages,
      returns);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace fastppo
