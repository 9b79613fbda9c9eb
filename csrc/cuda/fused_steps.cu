// Fused Newton steps on CUDA tensors (hessian::{mse,quadratic}_newton_step): one kernel
// computes loss, gradient, the step and its statistics; the only host synchronisation is the
// copy of the statistics back (the op returns them on the CPU). The ATen path syncs five or
// more times per step (.item() of the loss, norms and finiteness checks, and per attempt).
//  * mse, any n: H = (2/n) I, so d = -g / (2/n + damping) element-wise, in one grid-stride
//    pass; the sums are block-reduced and, with several blocks, added atomically.
//  * quadratic, n <= 64: one block holds A's lower triangle in shared memory and runs the
//    damped solve of block_cholesky.cuh (H = A as given, its lower triangle, as the CPU op).
// Other inputs go to the ATen path in csrc/fused.cpp.
//
// STATUS: compile-checked only (nvcc, no GPU on the machine it was written on). It has not
// run on a GPU until bench/gpu_check.sh has run on one and tests/test_cuda_kernels.py passed.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>

#include "../hessian.h"
#include "block_cholesky.cuh"
#include "cuda_ops.h"

namespace hessian {
namespace cuda {
namespace {

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
  extern __shared__ double shared[];
  __shared__ double scratch[kMaxWarps];
  double* a = shared;
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

bool step_args_ok(double lr, double damping, int64_t max_attempts) {
  return lr > 0 && std::isfinite(lr) && damping >= 0 && std::isfinite(damping) &&
         max_attempts >= 1;
}

bool float_type(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

bool like(const at::Tensor& t, const at::Tensor& x) {
  return t.device() == x.device() && t.scalar_type() == x.scalar_type();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mse_newton_step(const at::Tensor& x,
                                                   const at::Tensor& target, double lr,
                                                   double damping, int64_t max_attempts) {
  if (!(kernels_enabled() && x.is_cuda() && float_type(x) && like(target, x) && x.dim() == 1 &&
        x.numel() > 0 && target.numel() == x.numel() &&
        step_args_ok(lr, damping, max_attempts)))
    return hessian::mse_newton_step(x, target, lr, damping, max_attempts);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor tc = target.contiguous();
  const int64_t n = x.numel();
  const dim3 block(kWarp, kMseWarps);
  const int64_t per_block = kWarp * kMseWarps;
  const int64_t blocks = std::min((n + per_block - 1) / per_block, kMseMaxBlocks);
  const auto acc_options = x.options().dtype(at::kDouble);
  // one block writes its sums; several add into zeros
  at::Tensor sums = blocks == 1 ? at::empty({kMseSums}, acc_options)
                                : at::zeros({kMseSums}, acc_options);
  at::Tensor x_new = at::empty({n}, x.options());
  const double two_over_n = 2.0 / static_cast<double>(n);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  double loss = 0;
  at::Tensor host;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mse_newton_step_cuda", [&] {
    mse_step_kernel<scalar_t><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
        xc.data_ptr<scalar_t>(), tc.data_ptr<scalar_t>(), n, two_over_n,
        1.0 / (two_over_n + damping), static_cast<scalar_t>(lr), x_new.data_ptr<scalar_t>(),
        sums.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    host = sums.cpu();
    loss = static_cast<double>(
        static_cast<scalar_t>(host.data_ptr<double>()[0] / static_cast<double>(n)));
  });
  const double* s = host.data_ptr<double>();
  at::Tensor stats = at::empty({kFusedStats}, at::TensorOptions().dtype(at::kDouble));
  double* out = stats.data_ptr<double>();
  out[0] = loss;
  out[1] = std::sqrt(s[1]);
  out[2] = s[2];
  out[3] = lr * std::sqrt(s[3]);
  out[4] = damping;
  out[5] = 1.0;
  out[6] = s[4] == 0.0 && std::isfinite(loss) ? 1.0 : 0.0;
  return {x_new, stats};
}

std::tuple<at::Tensor, at::Tensor> quadratic_newton_step(const at::Tensor& x,
                                                         const at::Tensor& a,
                                                         const at::Tensor& b, double lr,
                                                         double damping,
                                                         int64_t max_attempts) {
  const int64_t n = x.dim() == 1 ? x.size(0) : 0;
  if (!(kernels_enabled() && x.is_cuda() && float_type(x) && like(a, x) && like(b, x) &&
        n >= 1 && n <= kMaxBlockN && a.dim() == 2 && a.size(0) == n && a.size(1) == n &&
        b.dim() == 1 && b.size(0) == n && step_args_ok(lr, damping, max_attempts)))
    return hessian::quadratic_newton_step(x, a, b, lr, damping, max_attempts);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor ac = a.contiguous();
  const at::Tensor bc = b.contiguous();
  at::Tensor x_new = at::empty({n}, x.options());
  at::Tensor stats = at::empty({kFusedStats}, x.options().dtype(at::kDouble));
  const dim3 block(kWarp, warps_for(n));
  const size_t shared_bytes = shared_doubles(n, 3) * sizeof(double);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "quadratic_newton_step_cuda", [&] {
    quadratic_step_kernel<scalar_t><<<1, block, shared_bytes, stream>>>(
        xc.data_ptr<scalar_t>(), ac.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(),
        static_cast<int>(n), lr, damping, max_attempts, sqrt_eps<scalar_t>(),
        x_new.data_ptr<scalar_t>(), stats.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {x_new, stats.cpu()};
}

}  // namespace cuda
}  // namespace hessian
