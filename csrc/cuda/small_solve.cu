// hessian::damped_cholesky on CUDA tensors (host side; the kernel is in step_kernels.cuh):
// for n <= 64 one thread block factors the symmetrised matrix in shared memory and runs the
// whole lambda escalation on the device, writing direction, damping and attempts to device
// tensors (no host synchronisation at all; the ATen path costs a cuSOLVER call and three
// .item() syncs per attempt). Larger n, and any input the kernel does not take, go to the
// ATen path in csrc/solve.cpp.
//
// STATUS: compile-checked only (nvcc 13.0, no GPU on the machine it was written on; the
// kernels also run in the CPU emulation of tests/test_cuda_emulation.py). It has not run on
// a GPU until bench/gpu_check.sh has run on one and tests/test_cuda_kernels.py passed.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "../hessian.h"
#include "block_cholesky.cuh"
#include "cuda_ops.h"
#include "step_kernels.cuh"

namespace hessian {
namespace cuda {
namespace {

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

TORCH_LIBRARY_IMPL(hessian, CUDA, m) { m.impl("damped_cholesky", &damped_cholesky); }

}  // namespace cuda
}  // namespace hessian
