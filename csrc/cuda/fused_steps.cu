// Fused Newton steps on CUDA tensors (hessian::{mse,quadratic}_newton_step; host side, the
// kernels are in step_kernels.cuh): one kernel computes loss, gradient, the step and its
// statistics; the only host synchronisation is the copy of the statistics back (the op
// returns them on the CPU). The ATen path syncs five or more times per step (.item() of the
// loss, norms and finiteness checks, and per attempt).
//  * mse, any n: H = (2/n) I, so d = -g / (2/n + damping) element-wise, in one grid-stride
//    pass; the sums are block-reduced and, with several blocks, added atomically.
//  * quadratic, n <= 64: one block holds A's lower triangle in shared memory and runs the
//    damped solve of block_cholesky.cuh (H = A as given, its lower triangle, as the CPU op).
// Other inputs go to the ATen path in csrc/fused.cpp.
//
// STATUS: compile-checked only (nvcc 13.0, no GPU on the machine it was written on; the
// kernels also run in the CPU emulation of tests/test_cuda_emulation.py). It has not run on
// a GPU until bench/gpu_check.sh has run on one and tests/test_cuda_kernels.py passed.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../fused_steps.h"
#include "block_cholesky.cuh"
#include "cuda_ops.h"
#include "step_kernels.cuh"

namespace hessian {
namespace cuda {
namespace {

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
    return to_op(mse_fused(x, target, lr, damping, max_attempts));
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
  out[7] = std::numeric_limits<double>::quiet_NaN();  // slope: not computed here
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
    return to_op(quadratic_fused(x, a, b, lr, damping, max_attempts));
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
  at::Tensor host = stats.cpu();
  host.data_ptr<double>()[7] = std::numeric_limits<double>::quiet_NaN();  // slope: not computed
  return {x_new, host};
}

// The steps whose FusedStepDef says own_cuda_kernel (csrc/fused_steps.h).
TORCH_LIBRARY_IMPL(hessian, CUDA, m) {
  m.impl("mse_newton_step", &mse_newton_step);
  m.impl("quadratic_newton_step", &quadratic_newton_step);
}

}  // namespace cuda
}  // namespace hessian
