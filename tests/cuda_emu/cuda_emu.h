// Runs fastmeta's CUDA kernels (csrc/cuda/*.cu) on the CPU, for tests on machines without a GPU.
//
// A launch runs its blocks one after another; the threads of a block are fibers (ucontext) that
// run one at a time, each until its next __syncthreads() or its end, in an order the test picks
// (ascending, descending or shuffled thread ids, re-drawn for every barrier interval). Results that
// differ between orders mean threads of one interval touch the same memory (a data race on the
// GPU). A barrier that some threads of a block reach and others skip is reported as an error, as is
// dynamic shared memory above 48 KB without cudaFuncSetAttribute or above the H100's 227 KB.
//
// Only what fastmeta's kernels use is provided: threadIdx/blockIdx/blockDim/gridDim in x,
// __syncthreads, dynamic shared memory (FASTMETA_DYNAMIC_SMEM), launches (FASTMETA_LAUNCH),
// cudaFuncSetAttribute for the dynamic shared memory limit, cudaGetLastError, and float bits
// (FASTMETA_BITS_OF / FASTMETA_FLOAT_OF: __float_as_uint / __uint_as_float on the GPU).
#pragma once
#define FASTMETA_CUDA_EMULATE 1

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <math.h>
#include <random>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__

#include <cstring>
inline uint32_t fm_emu_bits_of(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }
inline float fm_emu_float_of(uint32_t u) { float x; std::memcpy(&x, &u, 4); return x; }
#define FASTMETA_BITS_OF(x) fm_emu_bits_of(x)
#define FASTMETA_FLOAT_OF(u) fm_emu_float_of(u)

struct EmuDim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline EmuDim3 threadIdx, blockIdx, blockDim, gridDim;

using cudaError_t = int;
using cudaStream_t = void*;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorLaunchFailure = 4;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace fm_emu {

constexpr size_t kDefaultSmem = 48 * 1024;     // dynamic shared memory without opting in
constexpr size_t kMaxSmemOptin = 227 * 1024;   // sm_90: cudaDevAttrMaxSharedMemoryPerBlockOptin
constexpr size_t kStack = 256 * 1024;

struct State {
  int order = 0;          // 0 ascending, 1 descending, 2 shuffled per interval
  uint64_t seed = 1;
  std::string error;      // first error of the last launch ("" when none)
  cudaError_t last = cudaSuccess;
  std::vector<std::pair<const void*, size_t>> smem_optin;  // kernel -> opted-in bytes
  // current block
  std::vector<ucontext_t> ctx;
  std::vector<std::vector<char>> stacks;
  std::vector<int> status;  // 0 runnable, 1 at a barrier, 2 finished
  std::vector<unsigned char> smem;
  ucontext_t main;
  int current = 0;
  const std::function<void()>* body = nullptr;
  uint64_t barriers = 0;
};

inline State& state() {
  static State s;
  return s;
}

inline void fail(const std::string& msg) {
  State& s = state();
  if (s.error.empty()) s.error = msg;
}

inline void fiber_main() {
  State& s = state();
  (*s.body)();
  s.status[s.current] = 2;
  swapcontext(&s.ctx[s.current], &s.main);
}

inline unsigned char* dynamic_smem() { return state().smem.data(); }

inline void syncthreads() {
  State& s = state();
  s.status[s.current] = 1;
  swapcontext(&s.ctx[s.current], &s.main);
}

// Runs one block of `threads` fibers to completion.
inline void run_block(unsigned threads) {
  State& s = state();
  s.ctx.assign(threads, ucontext_t{});
  s.stacks.resize(threads);
  s.status.assign(threads, 0);
  for (unsigned i = 0; i < threads; ++i) {
    s.stacks[i].resize(kStack);
    getcontext(&s.ctx[i]);
    s.ctx[i].uc_stack.ss_sp = s.stacks[i].data();
    s.ctx[i].uc_stack.ss_size = kStack;
    s.ctx[i].uc_link = nullptr;
    makecontext(&s.ctx[i], fiber_main, 0);
  }
  std::vector<unsigned> order(threads);
  std::mt19937_64 rng(s.seed + blockIdx.x);
  for (;;) {
    for (unsigned i = 0; i < threads; ++i) order[i] = s.order == 1 ? threads - 1 - i : i;
    if (s.order == 2) std::shuffle(order.begin(), order.end(), rng);
    for (unsigned i : order) {
      s.current = static_cast<int>(i);
      threadIdx.x = i;
      s.status[i] = 0;
      swapcontext(&s.main, &s.ctx[i]);
    }
    unsigned waiting = 0, done = 0;
    for (unsigned i = 0; i < threads; ++i) (s.status[i] == 1 ? waiting : done) += 1;
    if (waiting == 0) return;
    ++s.barriers;
    if (done != 0) {
      fail("block " + std::to_string(blockIdx.x) + ": " + std::to_string(waiting) + " threads wait at a " +
           "__syncthreads() that " + std::to_string(done) + " finished threads never reach");
      return;
    }
  }
}

inline cudaError_t launch(const void* kernel, unsigned grid, unsigned block, size_t shmem,
                          const std::function<void()>& body) {
  State& s = state();
  size_t limit = kDefaultSmem;
  for (const auto& e : s.smem_optin)
    if (e.first == kernel) limit = e.second;
  if (shmem > limit) {
    fail("launch asks for " + std::to_string(shmem) + " bytes of dynamic shared memory, the limit is " +
         std::to_string(limit) + (limit == kDefaultSmem ? " without cudaFuncSetAttribute" : ""));
    return s.last = cudaErrorInvalidValue;
  }
  if (block == 0 || block > 1024) {
    fail("launch with " + std::to_string(block) + " threads a block");
    return s.last = cudaErrorInvalidValue;
  }
  s.body = &body;
  gridDim.x = grid;
  blockDim.x = block;
  for (unsigned b = 0; b < grid && s.error.empty(); ++b) {
    blockIdx.x = b;
    s.smem.assign(shmem, 0xFF);  // NaN in float and double: reads before writes show
    run_block(block);
  }
  s.body = nullptr;
  return s.last = s.error.empty() ? cudaSuccess : cudaErrorLaunchFailure;
}

}  // namespace fm_emu

inline void __syncthreads() { fm_emu::syncthreads(); }

template <typename K>
inline cudaError_t cudaFuncSetAttribute(K* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || static_cast<size_t>(value) > fm_emu::kMaxSmemOptin) {
    fm_emu::fail("cudaFuncSetAttribute: " + std::to_string(value) + " bytes of dynamic shared memory exceed " +
                 std::to_string(fm_emu::kMaxSmemOptin));
    return fm_emu::state().last = cudaErrorInvalidValue;
  }
  auto& v = fm_emu::state().smem_optin;
  const void* key = reinterpret_cast<const void*>(kernel);
  for (auto& e : v)
    if (e.first == key) { e.second = static_cast<size_t>(value); return cudaSuccess; }
  v.emplace_back(key, static_cast<size_t>(value));
  return cudaSuccess;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = fm_emu::state().last;
  fm_emu::state().last = cudaSuccess;
  return e;
}

// device-side math the kernels call unqualified
namespace fastmeta {
namespace cuda {
using std::exp;
using std::log;
using std::max;
using std::min;
using std::tanh;
}  // namespace cuda
}  // namespace fastmeta

#define FASTMETA_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(fm_emu::dynamic_smem())
#define FASTMETA_LAUNCH(kernel, grid, block, shmem, stream, ...) \
  fm_emu::launch(reinterpret_cast<const void*>(kernel), grid, block, shmem, [&] { kernel(__VA_ARGS__); })
