// The kernels of csrc/cuda/ (device code only, no torch headers): the one-block damped
// Cholesky solve and the fused mse and quadratic Newton steps. The host wrappers that size
// and launch them are small_solve.cu and fused_steps.cu; tests/cuda_emulation/ also runs
// this file on the CPU, one thread per CUDA thread, to check its logic and barriers.
//
// STATUS: compile-checked only (nvcc 13.0, sm_80/sm_90, no GPU on the machine it was
// written on) and run in that CPU emulation; it has not run on a GPU until
// bench/gpu_check.sh has run on one and tests/test_cuda_kernels.py passed there.
#pragma once

#include <cstdint>

#include "block_cholesky.cuh"

namespace hessian {
namespace cuda {

template <typename scalar_t>
__global__ void damped_cholesky_kernel(const scalar_t* __restrict__ h,
                                       const scalar_t* __restrict__ g, int n, double damping,
                                       int64_t max_attempts, double sqrt_eps,
                                       scalar_t* __restrict__ d, double* __restrict__ lam_out,
                                       int64_t* __restrict__ attempts_out) {
  __shared__ double scratch[kMaxWarps];
  double* a = dynamic_shared();
  double* rhs = a + n * tile_ld(n);
  double* sol = rhs + n;
  const auto minus_g = [g](int i) { return -static_cast<double>(g[i]); };
  const BlockStatus status = block_damped_solve<true>(h, n, minus_g, damping, max_attempts,
                                                      sqrt_eps, a, rhs, sol, scratch);
  const int tid = threadIdx.y * kWarp + threadIdx.x;
  const int threads = blockDim.y * kWarp;
  // on failure the direction is zero (the CPU op leaves it unwritten): never NaN
  for (int i = tid; i < n; i += threads)
    d[i] = status.attempts > 0 ? static_cast<scalar_t>(sol[i]) : scalar_t(0);
  if (tid == 0) {
    *lam_out = status.damping;
    *attempts_out = status.attempts;
  }
}

// mse accumulators: sum r^2, sum g^2, max |g|, sum d^2, count of non-finite g.
constexpr int kMseSums = 5;
constexpr int kMseWarps = 8;
constexpr int64_t kMseMaxBlocks = 1024;

template <typename scalar_t>
__global__ void mse_step_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ t,
                                int64_t n, double two_over_n, double inv_diag, scalar_t lr,
                                scalar_t* __restrict__ out, double* __restrict__ sums) {
  __shared__ double scratch[kMaxWarps];
  const int64_t threads = static_cast<int64_t>(blockDim.y) * kWarp;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * threads + threadIdx.y * kWarp +
                        threadIdx.x;
  double ss = 0, gss = 0, gmax = 0, dss = 0, bad = 0;
  for (int64_t i = first; i < n; i += threads * gridDim.x) {
    // the CPU op's roundings: r, g and d in the storage type, sums in double
    const scalar_t r = x[i] - t[i];
    ss += static_cast<double>(r) * static_cast<double>(r);
    const double gd =
        static_cast<double>(static_cast<scalar_t>(static_cast<double>(r) * two_over_n));
    bad += isfinite(gd) ? 0.0 : 1.0;
    gss += gd * gd;
    gmax = fmax(gmax, fabs(gd));
    const scalar_t di = static_cast<scalar_t>(-gd * inv_diag);
    dss += static_cast<double>(di) * static_cast<double>(di);
    out[i] = x[i] + lr * di;
  }
  const double block[kMseSums] = {block_sum(ss, scratch), block_sum(gss, scratch),
                                  block_max(gmax, scratch), block_sum(dss, scratch),
                                  block_sum(bad, scratch)};
  if (threadIdx.x != 0 || threadIdx.y != 0) return;
  if (gridDim.x == 1) {
    for (int s = 0; s < kMseSums; ++s) sums[s] = block[s];
    return;
  }
  atomicAdd(sums + 0, block[0]);
  atomicAdd(sums + 1, block[1]);
  // a non-negative double orders like its bit pattern (gmax >= 0: fmax drops NaN)
  atomicMax(reinterpret_cast<unsigned long long*>(sums + 2),
            static_cast<unsigned long long>(__double_as_longlong(block[2])));
  atomicAdd(sums + 3, block[3]);
  atomicAdd(sums + 4, block[4]);
}

// stats = [loss, |g|, max|g|, step norm, damping, attempts, finite], on the device.
template <typename scalar_t>
__global__ void quadratic_step_kernel(const scalar_t* __restrict__ x,
                                      const scalar_t* __restrict__ A,
                                      const scalar_t* __restrict__ b, int n, double lr,
                                      double damping, int64_t max_attempts, double sqrt_eps,
                                      scalar_t* __restrict__ out, double* __restrict__ stats) {
  __shared__ double scratch[kMaxWarps];
  double* a = dynamic_shared();
  double* rhs = a + n * tile_ld(n);
  double* sol = rhs + n;
  double* g = sol + n;
  const int lane = threadIdx.x, warp = threadIdx.y, warps = blockDim.y;
  const int tid = warp * kWarp + lane, threads = warps * kWarp;

  // g = A x - b (stored rounded to the storage type, as the CPU op's gradient tensor);
  // loss = x^T A x / 2 - b^T x; every entry of A, x and g must be finite
  bool finite = true;
  double xax = 0, bx = 0;
  for (int i = warp; i < n; i += warps) {
    double s = 0;
    for (int j = lane; j < n; j += kWarp) {
      const double aij = static_cast<double>(A[i * n + j]);
      finite = finite && isfinite(aij);
      s += aij * static_cast<double>(x[j]);
    }
    s = warp_sum(s);
    if (lane == 0) {
      const double xi = static_cast<double>(x[i]), bi = static_cast<double>(b[i]);
      g[i] = static_cast<double>(static_cast<scalar_t>(s - bi));
      xax += xi * s;
      bx += bi * xi;
    }
  }
  for (int i = tid; i < n; i += threads) finite = finite && isfinite(static_cast<double>(x[i]));
  const double half_xax = 0.5 * block_sum(xax, scratch);  // its barriers also publish g
  const double loss = static_cast<double>(
      static_cast<scalar_t>(half_xax - block_sum(bx, scratch)));
  double gss = 0, gmax = 0;
  for (int i = tid; i < n; i += threads) {
    finite = finite && isfinite(g[i]);
    gss += g[i] * g[i];
    gmax = fmax(gmax, fabs(g[i]));
  }
  const double gnorm = sqrt(block_sum(gss, scratch));
  gmax = block_max(gmax, scratch);
  finite = __syncthreads_and(finite && isfinite(loss)) != 0;

  BlockStatus status{damping, 0};
  if (finite) {
    const auto minus_g = [g](int i) { return -g[i]; };
    status = block_damped_solve<false>(A, n, minus_g, damping, max_attempts, sqrt_eps, a, rhs,
                                       sol, scratch);
  }
  // failed or non-finite: d = 0 and x_new = x (the CPU op returns x for a non-finite point)
  double dss = 0;
  for (int i = tid; i < n; i += threads) {
    const scalar_t di = status.attempts > 0 ? static_cast<scalar_t>(sol[i]) : scalar_t(0);
    dss += static_cast<double>(di) * static_cast<double>(di);
    out[i] = x[i] + static_cast<scalar_t>(lr) * di;
  }
  const double step_norm = lr * sqrt(block_sum(dss, scratch));
  if (tid == 0) {
    stats[0] = loss;
    stats[1] = gnorm;
    stats[2] = gmax;
    stats[3] = finite ? step_norm : 0.0;
    stats[4] = status.damping;
    stats[5] = static_cast<double>(status.attempts);
    stats[6] = finite ? 1.0 : 0.0;
  }
}

}  // namespace cuda
}  // namespace hessian
