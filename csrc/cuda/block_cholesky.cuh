// One thread block solves one small damped system (sym(H) + lambda I) d = -g, n <= 64,
// with the whole lambda escalation on the device: no host round trip per attempt.
//
// STATUS: compile-checked only (nvcc 13.0, sm_80/sm_90, against torch's headers, on a
// machine with no GPU) and run in the CPU emulation of tests/cuda_emulation/. It has not run
// on a GPU until bench/gpu_check.sh has been run on one and tests/test_cuda_kernels.py
// passed there; until then treat it as unverified on hardware.
//
// Policy (as csrc/solve.cpp): start at `damping`; on a pivot p_k <= 16 eps (|H_kk| + lambda)
// (rounding noise) or non-finite, or a non-finite solution, lambda = max(10 lambda, sqrt(eps)
// * max(1, max|diag H|)); eps is the storage type's.
// Arithmetic in double whatever the storage type, like the CPU small-n loops.
//
// Layout: the lower triangle (diagonal included) of the damped matrix in shared memory,
// row stride `ld` odd so column reads hit distinct banks. The factorisation is a
// right-looking LDL^T that keeps columns unscaled: after step k, a[i][k] (i > k) holds
// l_ik * p_k and the pivot p_k = a[k][k]; a pivot p_k > 0 for every k is exactly the
// Cholesky success test (p_k = l_kk^2). Step k reads only column k and writes only columns
// > k, so one barrier per column suffices; the right-hand side is eliminated in the same
// step (forward substitution), and the back substitution runs on one warp.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace hessian {
namespace cuda {

// Largest n served by the one-block kernels (the shared tile is n * ld doubles <= 48 KiB).
constexpr int64_t kMaxBlockN = 64;
constexpr int kWarp = 32;
constexpr int kMaxWarps = 8;

// Odd row stride of the shared tile.
__host__ __device__ inline int tile_ld(int n) { return n | 1; }

// Warps per block for an n x n system: enough rows per warp to keep each busy.
inline int warps_for(int64_t n) {
  const int64_t w = (n + 7) / 8;
  return static_cast<int>(w < 1 ? 1 : (w > kMaxWarps ? kMaxWarps : w));
}

#ifndef HESSIAN_CUDA_EMULATION  // tests/cuda_emulation/ supplies its own
// The launch's dynamic shared memory, as doubles.
__device__ inline double* dynamic_shared() {
  extern __shared__ double dynamic_shared_pool[];
  return dynamic_shared_pool;
}
#endif

// sqrt(eps) of the storage type: the damping floor's factor (as the CPU policy).
template <typename scalar_t>
double sqrt_eps() {
  return std::sqrt(static_cast<double>(std::numeric_limits<scalar_t>::epsilon()));
}

// Doubles of dynamic shared memory: the tile plus `vectors` vectors of length n.
inline size_t shared_doubles(int64_t n, int vectors) {
  return static_cast<size_t>(n * tile_ld(static_cast<int>(n)) + vectors * n);
}

// Reductions over a (32, warps) block; every thread of the block must call them and gets
// the result. `scratch` holds kMaxWarps shared doubles.
__device__ inline double warp_sum(double v) {
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ inline double block_max(double v, double* scratch) {
  for (int off = kWarp / 2; off > 0; off /= 2) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, off));
  const int lane = threadIdx.x, warp = threadIdx.y;
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double r = scratch[0];
  for (int w = 1; w < static_cast<int>(blockDim.y); ++w) r = fmax(r, scratch[w]);
  return r;
}

__device__ inline double block_sum(double v, double* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x, warp = threadIdx.y;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double r = 0.0;
  for (int w = 0; w < static_cast<int>(blockDim.y); ++w) r += scratch[w];
  return r;
}

// Outcome of one block's solve, the same on every thread of the block.
struct BlockStatus {
  double damping;
  int64_t attempts;  // 0: no lambda within max_attempts worked
};

// Solves into `sol` (shared, length n): blockDim = (32, warps), `a` the shared tile
// (n * tile_ld(n) doubles), `rhs` a shared vector of n, `scratch` kMaxWarps shared doubles.
// `h` is the row-major n x n matrix in global memory, `minus_g(i)` gives -g_i in double.
// With kSymmetrise the tile holds (H + H^T) / 2, else H's lower triangle as stored.
template <bool kSymmetrise, typename scalar_t, typename MinusG>
__device__ BlockStatus block_damped_solve(const scalar_t* __restrict__ h, int n, MinusG minus_g,
                                          double damping, int64_t max_attempts,
                                          double sqrt_eps, double* a, double* rhs, double* sol,
                                          double* scratch) {
  const int lane = threadIdx.x, warp = threadIdx.y, warps = blockDim.y;
  const int tid = warp * kWarp + lane, threads = warps * kWarp;
  const int ld = tile_ld(n);

  // the damping floor's scale: H's largest entry magnitude (csrc/solve.cpp's floor_scale)
  double entry_max = 0.0;
  for (int k = tid; k < n * n; k += threads)
    entry_max = fmax(entry_max, fabs(static_cast<double>(h[k])));
  const double scale = block_max(entry_max, scratch);
  const double floor = sqrt_eps * (scale > 0.0 && isfinite(scale) ? scale : 1.0);

  const double tol = 16.0 * static_cast<double>(std::numeric_limits<scalar_t>::epsilon());
  double lam = damping;
  for (int64_t attempt = 1; attempt <= max_attempts; ++attempt) {
    for (int i = warp; i < n; i += warps) {
      for (int j = lane; j <= i; j += kWarp) {
        double v = static_cast<double>(h[i * n + j]);
        if (kSymmetrise) v = 0.5 * (v + static_cast<double>(h[j * n + i]));
        a[i * ld + j] = i == j ? v + lam : v;
      }
    }
    for (int i = tid; i < n; i += threads) rhs[i] = minus_g(i);
    __syncthreads();

    bool ok = true;
    for (int k = 0; k < n; ++k) {
      const double p = a[k * ld + k];  // final: step k - 1 wrote it before the barrier
      const double hkk = static_cast<double>(h[k * n + k]);  // sym(H)'s diagonal is H's
      if (!(p > tol * (fabs(hkk) + lam)) || !isfinite(p)) {  // the same on every thread
        ok = false;
        break;
      }
      const double inv = 1.0 / p;
      for (int i = k + 1 + warp; i < n; i += warps) {
        const double lik = a[i * ld + k] * inv;
        for (int j = k + 1 + lane; j <= i; j += kWarp) a[i * ld + j] -= lik * a[j * ld + k];
      }
      const double yk = rhs[k] * inv;
      for (int i = k + 1 + tid; i < n; i += threads) rhs[i] -= a[i * ld + k] * yk;
      __syncthreads();
    }

    if (ok) {
      if (warp == 0) {
        // x_m = (y_m - sum_{i > m} a[i][m] x_i) / p_m, column-oriented from the bottom
        for (int m = n - 1; m >= 0; --m) {
          const double xm = rhs[m] / a[m * ld + m];
          for (int k = lane; k < m; k += kWarp) rhs[k] -= a[m * ld + k] * xm;
          if (lane == 0) sol[m] = xm;
          __syncwarp();
        }
      }
      __syncthreads();
      bool finite = true;
      for (int i = tid; i < n; i += threads) finite = finite && isfinite(sol[i]);
      ok = __syncthreads_and(finite) != 0;
      if (ok) return {lam, attempt};
    } else {
      __syncthreads();  // every thread has read the failed pivot before the tile is reloaded
    }
    const double up = lam * 10.0;
    lam = up < floor ? floor : up;  // std::max(10 lambda, floor), as the CPU policy
  }
  return {lam, 0};
}

}  // namespace cuda
}  // namespace hessian
