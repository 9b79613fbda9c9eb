// A CPU stand-in for the CUDA features csrc/cuda/*.cuh use, so their kernels run on a machine
// without a GPU: one std::thread per CUDA thread, __syncthreads / __syncwarp as real barriers
// (block-wide / per warp), shuffles through a per-warp exchange between two warp barriers,
// __shared__ as one static instance shared by the block's threads (blocks run one after
// another), and the dynamic shared memory poisoned with NaN before each launch so a read of
// an unwritten slot shows up. Built with -fsanitize=thread it doubles as a race check of the
// shared-memory accesses between barriers. It checks logic and synchronisation, not speed,
// warp divergence or the GPU's memory model beyond what the barriers order.
#pragma once

#define HESSIAN_CUDA_EMULATION 1
#define __host__
#define __device__
#define __global__
#define __shared__ static

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

using std::fabs;
using std::fmax;
using std::isfinite;
using std::sqrt;

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx;
inline dim3 blockIdx, blockDim, gridDim;

namespace emulation {

struct Block {
  explicit Block(unsigned warps)
      : all(static_cast<std::ptrdiff_t>(32 * warps)), exchange(32 * warps), flags(32 * warps) {
    for (unsigned w = 0; w < warps; ++w) warp.push_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warp;
  std::vector<double> exchange;
  std::vector<int> flags;
};

inline Block* block = nullptr;
inline std::vector<double> shared_pool;

inline int thread_rank() { return static_cast<int>(threadIdx.y * 32 + threadIdx.x); }

// Runs kernel(args...) on a grid of `grid` blocks of (32, warps) threads, `shared_bytes`
// of dynamic shared memory each.
template <typename Kernel, typename... Args>
void launch(unsigned grid, unsigned warps, size_t shared_bytes, Kernel kernel, Args... args) {
  gridDim = {grid, 1, 1};
  blockDim = {32, warps, 1};
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx = {b, 0, 0};
    shared_pool.assign(shared_bytes / sizeof(double) + 1,
                       std::numeric_limits<double>::quiet_NaN());
    Block sync(warps);
    block = &sync;
    std::vector<std::thread> threads;
    for (unsigned w = 0; w < warps; ++w)
      for (unsigned lane = 0; lane < 32; ++lane)
        threads.emplace_back([=] {
          threadIdx = {lane, w, 0};
          kernel(args...);
        });
    for (auto& t : threads) t.join();
    block = nullptr;
  }
}

}  // namespace emulation

inline void __syncthreads() { emulation::block->all.arrive_and_wait(); }

inline void __syncwarp(unsigned = 0xffffffffu) {
  emulation::block->warp[threadIdx.y]->arrive_and_wait();
}

inline double __shfl_xor_sync(unsigned, double v, int lane_mask) {
  double* slot = emulation::block->exchange.data() + threadIdx.y * 32;
  slot[threadIdx.x] = v;
  __syncwarp();
  const double r = slot[threadIdx.x ^ static_cast<unsigned>(lane_mask)];
  __syncwarp();
  return r;
}

inline int __syncthreads_and(int predicate) {
  emulation::block->flags[emulation::thread_rank()] = predicate;
  __syncthreads();
  int all = 1;
  for (int f : emulation::block->flags) all = all && f != 0;
  __syncthreads();
  return all;
}

inline double atomicAdd(double* address, double v) {
  return std::atomic_ref<double>(*address).fetch_add(v);
}

inline unsigned long long atomicMax(unsigned long long* address, unsigned long long v) {
  std::atomic_ref<unsigned long long> ref(*address);
  unsigned long long old = ref.load();
  while (old < v && !ref.compare_exchange_weak(old, v)) {
  }
  return old;
}

inline long long __double_as_longlong(double v) {
  long long bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits;
}

namespace hessian::cuda {
inline double* dynamic_shared() { return emulation::shared_pool.data(); }
}  // namespace hessian::cuda
