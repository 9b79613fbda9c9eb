// CUDA implementations of torch.ops.hessian.* that beat the ATen path (csrc/cuda/*.cu):
// each .cu registers its own for the CUDA dispatch key in a CUDA build (WITH_CUDA), where the
// .cpp files leave those ops' CUDA key to them (kCudaBuild, csrc/hessian.h).
// Each serves small systems with its own kernel and hands everything else (large n, odd
// inputs, invalid arguments, whose errors the ATen path raises) to the ATen implementation.
//
// STATUS: compile-checked only (plus the CPU emulation of tests/test_cuda_emulation.py)
// until bench/gpu_check.sh has run on a GPU (see its header).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace hessian {
namespace cuda {

// False when HESSIAN_CUDA_KERNELS=0: every op then takes the ATen path (comparison, escape).
bool kernels_enabled();

// hessian::damped_cholesky on CUDA: one block per system for n <= 64, on-device escalation.
std::tuple<at::Tensor, at::Tensor, at::Tensor> damped_cholesky(
    const at::Tensor& h, const at::Tensor& g, double damping, int64_t max_attempts);

// hessian::mse_newton_step on CUDA: one pass over x (any n), one copy of the stats back.
std::tuple<at::Tensor, at::Tensor> mse_newton_step(const at::Tensor& x,
                                                   const at::Tensor& target, double lr,
                                                   double damping, int64_t max_attempts);

// hessian::quadratic_newton_step on CUDA: loss, gradient and damped solve in one block.
std::tuple<at::Tensor, at::Tensor> quadratic_newton_step(const at::Tensor& x,
                                                         const at::Tensor& a,
                                                         const at::Tensor& b, double lr,
                                                         double damping,
                                                         int64_t max_attempts);

}  // namespace cuda
}  // namespace hessian
