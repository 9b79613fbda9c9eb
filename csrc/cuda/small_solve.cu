// hessian::damped_cholesky on CUDA tensors: for n <= 64 one thread block factors the
// symmetrised matrix in shared memory and runs the whole lambda escalation on the device,
// writing direction, damping and attempts to device tensors (no host synchronisation at all;
// the ATen path costs a cuSOLVER call and three .item() syncs per attempt). Larger n, and
// any input the kernel does not take, go to the ATen path in csrc/solve.cpp.
//
// STATUS: compile-checked only (nvcc, no GPU on the machine it was written on). It has not
// run on a GPU until bench/gpu_check.sh has run on one and tests/test_cuda_kernels.py passed.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "../hessian.h"
#include "block_cholesky.cuh"
#include "cuda_ops.h"

namespace hessian {
namespace cuda {
namespace {

template <typename scalar_t>
__global__ void damped_cholesky_kernel(const scalar_t* __restrict__ h,
                                       const scalar_t* __restrict__ g, int n, double damping,
                                       int64_t max_attempts, double sqrt_eps,
                                       scalar_t* __restrict__ d, double* __restrict__ lam_out,
                                       int64_t* __restrict__ attempts_out) {
  extern __shared__ double shared[];
  __shared__ double scratch[kMaxWarps];
  double* a = shared;
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

// Inputs the kernel serves; everything else (including invalid arguments) takes the ATen
// path, which raises the op's usual errors.
bool kernel_takes(const at::Tensor& h, const at::Tensor& g, double damping,
                  int64_t max_attempts) {
  const auto dtype = h.scalar_type();
  return kernels_enabled() && h.is_cuda() && g.device() == h.device() && h.dim() == 2 &&
         h.size(0) == h.size(1) && h.size(0) >= 1 && h.size(0) <= kMaxBlockN && g.dim() == 1 &&
         g.size(0) == h.size(0) && (dtype == at::kFloat || dtype == at::kDouble) &&
         g.scalar_type() == dtype && damping >= 0 && std::isfinite(damping) &&
         max_attempts >= 1;
}

}  // namespace

bool kernels_enabled() {
  const char* flag = std::getenv("HESSIAN_CUDA_KERNELS");
  return flag == nullptr || std::strcmp(flag, "0") != 0;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> damped_cholesky(
    const at::Tensor& h, const at::Tensor& g, double damping, int64_t max_attempts) {
  if (!kernel_takes(h, g, damping, max_attempts))
    return hessian::damped_cholesky(h, g, damping, max_attempts);
  const c10::cuda::CUDAGuard guard(h.device());
  const at::Tensor hc = h.contiguous();
  const at::Tensor gc = g.contiguous();
  const int64_t n = h.size(0);
  at::Tensor d = at::empty({n}, g.options());
  at::Tensor lam = at::empty({}, h.options().dtype(at::kDouble));
  at::Tensor attempts = at::empty({}, h.options().dtype(at::kLong));
  const dim3 block(kWarp, warps_for(n));
  const size_t shared_bytes = shared_doubles(n, 2) * sizeof(double);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "damped_cholesky_cuda", [&] {
    damped_cholesky_kernel<scalar_t><<<1, block, shared_bytes, stream>>>(
        hc.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), static_cast<int>(n), damping,
        max_attempts, sqrt_eps<scalar_t>(), d.data_ptr<scalar_t>(), lam.data_ptr<double>(),
        attempts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {d, lam, attempts};
}

}  // namespace cuda
}  // namespace hessian
