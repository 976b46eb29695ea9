// Fused row kernels on the GPU: logprobs / entropy / lse, the per-token PPO terms, and dlogits.
//
// One block per row (row r = b*T + t of a [B, T, V] view with element strides sB, sT, 64-bit offsets).
// Each thread keeps an online (max m, sum s = sum exp(y - m), w = sum exp(y - m)*(y - m)) over its elements,
// y = x / T, reading the row once with 16-byte loads after a scalar head up to alignment; the triples are
// merged across the warp with shuffles, then across warps through shared memory. fp32 accumulation for
// fp32/bf16/fp16 inputs; exp via expf (no fast-math: -inf entries contribute exactly 0, NaN propagates).
//   lse = m + log s, logp = y_label - lse, entropy = log s - w / s.
// The backward writes dx_j = [g*(1[j=t] - p_j) - h*p_j*(log p_j + H)] / T, each element read and written by
// the same thread, so out may alias the logits (in-place backward).
#include <math.h>

#include "common.cuh"
#include "common/ppo_epilogue.h"
#include "kernels.h"

namespace fastppo {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

struct Online {
  float m, s, w;
};

__device__ __forceinline__ void push(Online& st, float y) {
  if (y > st.m) {  // a new max: rescale what was summed so far (rare after the first elements)
    if (st.s > 0.0f) {
      const float d = st.m - y;
      const float c = expf(d);
      st.w = c * (st.w + d * st.s);
      st.s *= c;
    }
    st.m = y;
    st.s += 1.0f;  // exp(0); its (y - m) term is 0
  } else if (y != -INFINITY) {  // -inf adds exactly nothing; NaN lands here and poisons s
    const float d = y - st.m;
    const float e = expf(d);
    st.s += e;
    st.w += e * d;
  }
}

__device__ __forceinline__ Online merge(const Online& a, const Online& b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return Online{m, a.s + b.s, a.w + b.w};
  Online o{m, 0.0f, 0.0f};
  // a side with nothing summed (s == 0) must not meet (-inf) * 0; a NaN sum still propagates
  if (!(a.s == 0.0f)) {
    const float d = a.m - m, c = expf(d);
    o.s += c * a.s;
    o.w += c * (a.w + d * a.s);
  }
  if (!(b.s == 0.0f)) {
    const float d = b.m - m, c = expf(d);
    o.s += c * b.s;
    o.w += c * (b.w + d * b.s);
  }
  return o;
}

// All threads get the row's merged triple.
__device__ Online block_reduce(Online st) {
  __shared__ Online warp_part[kWarps];
  __shared__ Online total;
  for (int off = 16; off > 0; off >>= 1) {
    Online o{__shfl_xor_sync(0xffffffffu, st.m, off), __shfl_xor_sync(0xffffffffu, st.s, off),
             __shfl_xor_sync(0xffffffffu, st.w, off)};
    st = merge(st, o);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_part[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? warp_part[lane] : Online{-INFINITY, 0.0f, 0.0f};
    for (int off = 16; off > 0; off >>= 1) {
      Online o{__shfl_xor_sync(0xffffffffu, st.m, off), __shfl_xor_sync(0xffffffffu, st.s, off),
               __shfl_xor_sync(0xffffffffu, st.w, off)};
      st = merge(st, o);
    }
    if (lane == 0) total = st;
  }
  __syncthreads();
  return total;
}

template <class E>
__device__ Online row_online(const E* __restrict__ x, int64_t V, float inv_t) {
  Online st{-INFINITY, 0.0f, 0.0f};
  constexpr int VEC = Pack<E>::VEC;
  const int64_t head = head_to_aligned(x, V);
  for (int64_t j = threadIdx.x; j < head; j += kThreads) push(st, to_f(x[j]) * inv_t);
  const int64_t nvec = (V - head) / VEC;
  const uint4* xv = reinterpret_cast<const uint4*>(x + head);
  for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
    Pack<E> p;
    p.raw = __ldg(xv + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) push(st, to_f(p.e[k]) * inv_t);
  }
  for (int64_t j = head + nvec * VEC + threadIdx.x; j < V; j += kThreads) push(st, to_f(x[j]) * inv_t);
  return block_reduce(st);
}

struct RowOut {
  float lse, logp, entropy;
};

template <class E>
__device__ __forceinline__ RowOut finish(const Online& st, const E* x, int64_t V, int64_t label, float inv_t) {
  const float log_s = logf(st.s);
  RowOut o;
  o.lse = st.m + log_s;  // all -inf row: -inf; NaN/+inf logits: NaN or inf (reported by the ops layer)
  o.entropy = log_s - st.w / st.s;
  o.logp = (label >= 0 && label < V) ? to_f(x[label]) * inv_t - o.lse : NAN;
  return o;
}

__device__ __forceinline__ int64_t row_offset(int64_t r, int64_t T, int64_t sB, int64_t sT) {
  const int64_t b = r / T, t = r - b * T;
  return b * sB + t * sT;
}

template <class E>
__global__ void __launch_bounds__(kThreads)
    logprobs_fwd_kernel(const E* __restrict__ x, int64_t T, int64_t V, int64_t sB, int64_t sT,
                        const int64_t* __restrict__ labels, float inv_t, float* __restrict__ logp,
                        float* __restrict__ entropy, float* __restrict__ lse) {
  const int64_t r = blockIdx.x;
  const E* xr = x + row_offset(r, T, sB, sT);
  const Online st = row_online(xr, V, inv_t);
  if (threadIdx.x == 0) {
    const RowOut o = finish(st, xr, V, labels[r], inv_t);
    logp[r] = o.logp;
    lse[r] = o.lse;
    if (entropy != nullptr) entropy[r] = o.entropy;
  }
}

template <class E>
__global__ void __launch_bounds__(kThreads)
    ppo_fwd_kernel(const E* __restrict__ x, int64_t T, int64_t V, int64_t sB, int64_t sT,
                   const int64_t* __restrict__ labels, const float* __restrict__ old_logp,
                   const float* __restrict__ adv, const float* __restrict__ ref_logp, const float* __restrict__ mask,
                   float inv_t, float clip_low, float clip_high, float dual_clip, int kl_kind, float kl_coef,
                   float entropy_coef, float* __restrict__ terms, int64_t N) {
  const int64_t r = blockIdx.x;
  if (mask[r] == 0.0f) {  // masked tokens: zeros, the row is never read (uniform exit for the block)
    if (threadIdx.x < kNumTerms) terms[threadIdx.x * N + r] = 0.0f;
    return;
  }
  const E* xr = x + row_offset(r, T, sB, sT);
  const Online st = row_online(xr, V, inv_t);
  if (threadIdx.x == 0) {
    const RowOut o = finish(st, xr, V, labels[r], inv_t);
    const PpoParams params{clip_low, clip_high, dual_clip, kl_kind, kl_coef, entropy_coef};
    float t[kNumTerms];
    ppo_epilogue(o.logp, o.entropy, o.lse, old_logp[r], adv[r], ref_logp != nullptr,
                 ref_logp != nullptr ? ref_logp[r] : 0.0f, params, t);
#pragma unroll
    for (int k = 0; k < kNumTerms; ++k) terms[k * N + r] = t[k];
  }
}

struct BwdRow {
  float inv_t, lse, g, gh, h;  // gh = g + h*H
  int64_t label;
};

__device__ __forceinline__ float dlogit(const BwdRow& c, float xj, int64_t j) {
  const float lp = xj * c.inv_t - c.lse;
  const float p = expf(lp);
  // p*(g + h*(lp + H)); 0 where p == 0 (masked vocabulary: lp = -inf, not 0*inf)
  const float t = p != 0.0f ? p * fmaf(c.h, lp, c.gh) : 0.0f;  // NaN p takes the first branch
  return ((j == c.label ? c.g : 0.0f) - t) * c.inv_t;
}

template <class E>
__global__ void __launch_bounds__(kThreads)
    logprobs_bwd_kernel(const E* x, int64_t T, int64_t V, int64_t sB, int64_t sT, const int64_t* __restrict__ labels,
                        const float* __restrict__ lse, const float* __restrict__ entropy,
                        const float* __restrict__ g_logp, const float* __restrict__ g_entropy, float inv_t, E* out,
                        int64_t oB, int64_t oT) {
  // x and out may be the same buffer (in-place): no __restrict__ on them.
  const int64_t r = blockIdx.x;
  const E* xr = x + row_offset(r, T, sB, sT);
  E* orow = out + row_offset(r, T, oB, oT);
  const float g = g_logp != nullptr ? g_logp[r] : 0.0f;
  const float h = g_entropy != nullptr ? g_entropy[r] : 0.0f;
  constexpr int VEC = Pack<E>::VEC;
  if (g == 0.0f && h == 0.0f) {  // rows without gradient: zeros, no exp, logits not read
    for (int64_t j = threadIdx.x; j < V; j += kThreads) orow[j] = from_f<E>(0.0f);
    return;
  }
  const float H = entropy != nullptr ? entropy[r] : 0.0f;
  const BwdRow c{inv_t, lse[r], g, g + h * H, h, labels[r]};
  // 16-byte vectors when input and output rows share their alignment, else plain (still coalesced) accesses
  const bool same_align = ((reinterpret_cast<uintptr_t>(xr) ^ reinterpret_cast<uintptr_t>(orow)) & 15u) == 0;
  const int64_t head = same_align ? head_to_aligned(xr, V) : V;
  for (int64_t j = threadIdx.x; j < head; j += kThreads) orow[j] = from_f<E>(dlogit(c, to_f(xr[j]), j));
  if (!same_align) return;
  const int64_t nvec = (V - head) / VEC;
  const uint4* xv = reinterpret_cast<const uint4*>(xr + head);
  uint4* ov = reinterpret_cast<uint4*>(orow + head);
  for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
    Pack<E> p;
    p.raw = xv[i];
    const int64_t j0 = head + i * VEC;
#pragma unroll
    for (int k = 0; k < VEC; ++k) p.e[k] = from_f<E>(dlogit(c, to_f(p.e[k]), j0 + k));
    ov[i] = p.raw;
  }
  for (int64_t j = head + nvec * VEC + threadIdx.x; j < V; j += kThreads) {
    orow[j] = from_f<E>(dlogit(c, to_f(xr[j]), j));
  }
}

template <class E>
struct Elem {
  using type = E;
};

// One block per row of the [B, T] grid, for the logits' element type: no launch when N == 0, the launch on the
// caller's `device` and `stream`, cudaErrorInvalidValue for an unknown dtype code, else the launch's own error.
// `launch(Elem<E>{}, blocks, stream)` issues the kernel.
template <class F>
int launch_rows(int64_t N, int dtype, int device, void* stream, F&& launch) {
  if (N == 0) return 0;
  DeviceGuard guard(device);
  const auto s = static_cast<cudaStream_t>(stream);
  const auto blocks = static_cast<unsigned>(N);
  switch (dtype) {
    case kFloat32: launch(Elem<float>{}, blocks, s); break;
    case kBFloat16: launch(Elem<__nv_bfloat16>{}, blocks, s); break;
    case kFloat16: launch(Elem<__half>{}, blocks, s); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int logprobs_forward(const void* logits, int dtype, int64_t B, int64_t T, int64_t V, int64_t sB, int64_t sT,
                     const int64_t* labels, float inv_temp, float* logp, float* entropy, float* lse, int device,
                     void* stream) {
  return launch_rows(B * T, dtype, device, stream, [&](auto tag, unsigned blocks, cudaStream_t s) {
    using E = typename decltype(tag)::type;
    logprobs_fwd_kernel<E><<<blocks, kThreads, 0, s>>>(static_cast<const E*>(logits), T, V, sB, sT, labels, inv_temp,
                                                       logp, entropy, lse);
  });
}

int logprobs_backward(const void* logits, int dtype, int64_t B, int64_t T, int64_t V, int64_t sB, int64_t sT,
                      const int64_t* labels, const float* lse, const float* entropy, const float* g_logp,
                      const float* g_entropy, float inv_temp, void* out, int64_t out_sB, int64_t out_sT, int device,
                      void* stream) {
  return launch_rows(B * T, dtype, device, stream, [&](auto tag, unsigned blocks, cudaStream_t s) {
    using E = typename decltype(tag)::type;
    logprobs_bwd_kernel<E><<<blocks, kThreads, 0, s>>>(
        static_cast<const E*>(logits), T, V, sB, sT, labels, lse, entropy, g_logp, g_entropy, inv_temp,
        static_cast<E*>(out), out_sB, out_sT);
  });
}

int ppo_loss_forward(const void* logits, int dtype, int64_t B, int64_t T, int64_t V, int64_t sB, int64_t sT,
                     const int64_t* labels, const float* old_logp, const float* adv, const float* ref_logp,
                     const float* mask, float inv_temp, float clip_low, float clip_high, float dual_clip,
                     int kl_kind, float kl_coef, float entropy_coef, float* terms, int device, void* stream) {
  const int64_t N = B * T;
  return launch_rows(N, dtype, device, stream, [&](auto tag, unsigned blocks, cudaStream_t s) {
    using E = typename decltype(tag)::type;
    ppo_fwd_kernel<E><<<blocks, kThreads, 0, s>>>(
        static_cast<const E*>(logits), T, V, sB, sT, labels, old_logp, adv, ref_logp, mask, inv_temp, clip_low,
        clip_high, dual_clip, kl_kind, kl_coef, entropy_coef, terms, N);
  });
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace cuda
}  // namespace fastppo
