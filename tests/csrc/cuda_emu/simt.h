// A small SIMT emulator that runs the CUDA kernels of csrc/cuda on the CPU, for tests on machines without a GPU.
//
// Each CUDA thread of a block is a fiber (ucontext) on the calling OS thread; blocks run one after another.
// Fibers only switch at barriers: __syncthreads() waits for every live thread of the block, and every warp
// shuffle / __syncwarp() waits for the 32 lanes of its warp (the shuffle publishes its value, waits, reads the
// source lane's value, waits again). Between barriers the scheduler runs the fibers in a fresh pseudo-random
// order each round, so a kernel that relies on an unsynchronised ordering of threads gets different results on
// different launches instead of passing by luck.
//
// Errors a GPU would turn into hangs or undefined behaviour stop the launch with a message (returned by
// cudaGetLastError / cudaGetErrorString): a barrier that not all live threads can reach (divergent
// __syncthreads, a shuffle inside divergent code), a __syncthreads after some threads of the block exited,
// a full-mask shuffle in a warp with exited or missing lanes, a block of more than 1024 threads.
//
// __shared__ variables are statics in one linker section (cuda_runtime.h) that is filled with 0xff bytes before
// every block: NaN as float, double, half and bf16, -1 as an integer. A kernel that reads shared memory its block
// has not written (a value a GPU leaves undefined, or the previous block's) gets NaN instead of a plausible 0.
//
// Not emulated: timing, memory spaces (device pointers are host pointers), dynamic (extern) shared memory, only
// the intrinsics csrc/cuda uses exist.
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <functional>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

// The built-in index variables of the running fiber (set by the scheduler before each switch).
extern thread_local dim3 threadIdx;
extern thread_local dim3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

namespace fastppo_emu {

// Runs `body` once per thread of every block of `grid` x `block`; records the launch error, if any.
void launch_impl(dim3 grid, dim3 block, const std::function<void()>& body);

template <class F, class S = void*>
void launch(F&& body, dim3 grid, dim3 block, size_t /*shared_bytes*/ = 0, S /*stream*/ = nullptr) {
  launch_impl(grid, block, std::function<void()>(body));
}

// Waits until every live thread of the block has arrived.
void block_barrier();
// Waits until every lane of the calling thread's warp has arrived (all 32 must be live: full masks only).
void warp_barrier(unsigned mask);
// Publishes this lane's 8-byte word, waits for the warp, returns lane `src`'s word (own word when src is out of
// range), waits again so that no lane overwrites its word before everyone read it.
uint64_t warp_exchange(unsigned mask, uint64_t word, int src);
int lane_id();

int take_last_error();  // 0 or an emulated cudaError_t code; clears it
const char* error_text(int code);

}  // namespace fastppo_emu

template <class T>
inline T fastppo_emu_shfl(unsigned mask, T v, int src) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  uint64_t w = 0;
  memcpy(&w, &v, sizeof(T));
  w = fastppo_emu::warp_exchange(mask, w, src);
  T out;
  memcpy(&out, &w, sizeof(T));
  return out;
}

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  (void)width;
  return fastppo_emu_shfl(mask, v, fastppo_emu::lane_id() ^ lane_mask);
}

template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  (void)width;
  const int src = fastppo_emu::lane_id() + static_cast<int>(delta);
  return fastppo_emu_shfl(mask, v, src < 32 ? src : -1);  // out of range: the lane keeps its own value
}

inline void __syncthreads() { fastppo_emu::block_barrier(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { fastppo_emu::warp_barrier(mask); }

template <class T>
inline T __ldg(const T* p) {
  return *p;
}
