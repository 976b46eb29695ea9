// The fiber scheduler behind simt.h (see there for what is and is not emulated).
#include "simt.h"

#include <ucontext.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

// Bounds of the section holding every __shared__ variable (cuda_runtime.h), defined by the linker when the section
// exists; weak, so that a program without shared memory links too.
extern "C" char __start_fastppo_emu_shared[] __attribute__((weak));
extern "C" char __stop_fastppo_emu_shared[] __attribute__((weak));

namespace fastppo_emu {
namespace {

// Shared memory is undefined at block start on a GPU: poison it (0xff bytes are NaN in every float width).
void poison_shared_memory() {
  char* const begin = __start_fastppo_emu_shared;
  char* const end = __stop_fastppo_emu_shared;
  if (begin != nullptr && end > begin) memset(begin, 0xff, static_cast<size_t>(end - begin));
}

constexpr int kLaunchFailure = 719;            // cudaErrorLaunchFailure
constexpr int kInvalidConfiguration = 9;       // cudaErrorInvalidConfiguration
constexpr size_t kStackBytes = size_t(64) << 10;  // plenty for csrc/cuda's kernels (no recursion, small frames)

enum class State { Ready, AtBlockBarrier, AtWarpBarrier, Done };

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  State state = State::Ready;
  dim3 idx;
};

struct Launch {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = -1;
  int threads = 0;
  const std::function<void()>* body = nullptr;
  std::vector<uint64_t> words;  // one shuffle word per thread
  std::string error;            // set by a fiber or the scheduler: the launch stops
};

thread_local Launch* g_launch = nullptr;
thread_local int g_last_error = 0;
thread_local std::string g_last_text;
thread_local uint64_t g_launches = 0;

Fiber& self() { return g_launch->fibers[static_cast<size_t>(g_launch->current)]; }

void yield_as(State s) {
  Fiber& f = self();
  f.state = s;
  swapcontext(&f.ctx, &g_launch->scheduler);
}

// The fiber stops for good and the scheduler abandons the launch.
void fail(const std::string& why) {
  g_launch->error = why;
  yield_as(State::Done);
}

void trampoline() {
  (*g_launch->body)();
  self().state = State::Done;  // uc_link resumes the scheduler
}

std::string where(int t) {
  return "thread " + std::to_string(t) + " (warp " + std::to_string(t / 32) + ", lane " + std::to_string(t % 32) +
         ") of block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
         std::to_string(blockIdx.z) + ")";
}

// Releases the barriers that every live participant has reached; returns whether any fiber became ready, or
// records a launch error for a barrier that can never complete.
bool release(Launch& L) {
  const int n = L.threads;
  bool any = false;
  int live = 0, at_block = 0;
  for (const Fiber& f : L.fibers) {
    live += f.state != State::Done;
    at_block += f.state == State::AtBlockBarrier;
  }
  for (int w0 = 0; w0 < n; w0 += 32) {
    const int w1 = std::min(n, w0 + 32);
    int waiting = 0, done = 0, other = -1;
    for (int t = w0; t < w1; ++t) {
      const State s = L.fibers[t].state;
      waiting += s == State::AtWarpBarrier;
      done += s == State::Done;
      if (s == State::AtBlockBarrier) other = t;
    }
    if (waiting == 0) continue;
    if (waiting + done == w1 - w0) {
      if (waiting != 32) {
        L.error = "full-mask warp operation in warp " + std::to_string(w0 / 32) + " with only " +
                  std::to_string(waiting) + " of 32 lanes present (lanes exited, or the block size is not a "
                  "multiple of 32)";
        return false;
      }
      for (int t = w0; t < w1; ++t) L.fibers[t].state = State::Ready;
      any = true;
    } else if (other >= 0) {
      L.error = "divergent warp: " + where(other) + " waits at __syncthreads while other lanes of its warp wait "
                "at a warp shuffle/__syncwarp";
      return false;
    }
  }
  if (!any && at_block > 0 && at_block == live) {
    if (live < n) {  // legal only when the condition around __syncthreads is uniform across the block
      L.error = "__syncthreads reached by " + std::to_string(live) + " of " + std::to_string(n) +
                " threads; the others exited (divergent barrier)";
      return false;
    }
    for (Fiber& f : L.fibers) {
      if (f.state == State::AtBlockBarrier) f.state = State::Ready;
    }
    any = true;
  }
  if (!any && live > 0 && L.error.empty()) {
    L.error = "deadlock: " + std::to_string(at_block) + " of " + std::to_string(live) +
              " live threads wait at __syncthreads, the others at warp barriers that cannot complete";
  }
  return any;
}

void run_block(Launch& L, std::mt19937_64& rng) {
  const int n = L.threads;
  poison_shared_memory();
  for (int t = 0; t < n; ++t) {
    Fiber& f = L.fibers[t];
    f.state = State::Ready;
    f.idx = dim3(t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &L.scheduler;
    makecontext(&f.ctx, trampoline, 0);
  }
  std::vector<int> order(n);
  for (;;) {
    order.clear();
    for (int t = 0; t < n; ++t) {
      if (L.fibers[t].state == State::Ready) order.push_back(t);
    }
    std::shuffle(order.begin(), order.end(), rng);
    for (int t : order) {
      L.current = t;
      threadIdx = L.fibers[t].idx;
      swapcontext(&L.scheduler, &L.fibers[t].ctx);
      if (!L.error.empty()) return;
    }
    bool all_done = true;
    for (const Fiber& f : L.fibers) all_done = all_done && f.state == State::Done;
    if (all_done || !release(L)) return;
  }
}

}  // namespace

void launch_impl(dim3 grid, dim3 block, const std::function<void()>& body) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
    g_last_error = kInvalidConfiguration;
    return;
  }
  if (g_launch != nullptr) {  // a launch from inside a kernel: not supported (and never done by csrc/cuda)
    g_last_error = kLaunchFailure;
    g_last_text = "nested launch";
    return;
  }
  thread_local std::vector<Fiber> pool;
  Launch L;
  L.fibers.swap(pool);
  if (L.fibers.size() < threads) L.fibers.resize(threads);
  for (Fiber& f : L.fibers) {
    if (f.stack.empty()) f.stack.resize(kStackBytes);
  }
  L.fibers.resize(threads);
  L.threads = static_cast<int>(threads);
  L.body = &body;
  L.words.assign(threads, 0);
  std::mt19937_64 rng(0x5eedULL + g_launches++);
  const dim3 saved_idx = threadIdx;
  blockDim = block;
  gridDim = grid;
  g_launch = &L;
  for (unsigned z = 0; z < grid.z && L.error.empty(); ++z) {
    for (unsigned y = 0; y < grid.y && L.error.empty(); ++y) {
      for (unsigned x = 0; x < grid.x && L.error.empty(); ++x) {
        blockIdx = dim3(x, y, z);
        run_block(L, rng);
      }
    }
  }
  g_launch = nullptr;
  threadIdx = saved_idx;
  if (!L.error.empty()) {
    g_last_error = kLaunchFailure;
    g_last_text = "emulated launch failed: " + L.error;
  }
  pool.swap(L.fibers);
}

void block_barrier() { yield_as(State::AtBlockBarrier); }

void warp_barrier(unsigned mask) {
  if (mask != 0xffffffffu) fail("only full-mask warp operations are emulated (csrc/cuda uses no other)");
  yield_as(State::AtWarpBarrier);
}

uint64_t warp_exchange(unsigned mask, uint64_t word, int src) {
  const int t = g_launch->current;
  const int base = t - t % 32;
  g_launch->words[t] = word;
  warp_barrier(mask);
  const uint64_t got = src >= 0 && src < 32 ? g_launch->words[base + src] : word;
  warp_barrier(mask);
  return got;
}

int lane_id() { return g_launch->current % 32; }

int take_last_error() {
  const int e = g_last_error;
  g_last_error = 0;
  return e;
}

const char* error_text(int code) {
  switch (code) {
    case 0: return "no error";
    case 1: return "invalid argument";
    case kInvalidConfiguration: return "invalid configuration argument";
    case kLaunchFailure: return g_last_text.empty() ? "unspecified launch failure" : g_last_text.c_str();
    default: return "unknown error";
  }
}

}  // namespace fastppo_emu
