// Shared declarations of the hessian extension: solves and analytic assembly (the fused
// steps are in fused_steps.h). Each .cpp/.cu registers its own ops next to its kernels (a
// TORCH_LIBRARY_FRAGMENT of hessian for the schemas, TORCH_LIBRARY_IMPL per dispatch key).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace hessian {

// A CUDA build (WITH_CUDA) registers csrc/cuda/'s own CUDA kernels for damped_cholesky and the
// mse and quadratic fused steps; the .cpp files register their ATen kernels (which serve CUDA
// tensors too) for the CUDA key for every other op.
#ifdef WITH_CUDA
inline constexpr bool kCudaBuild = true;
#else
inline constexpr bool kCudaBuild = false;
#endif

// Outcome of a damped Cholesky solve: the lambda that worked and how many tries it took
// (attempts == 0 means no lambda within max_attempts gave a finite solution).
struct SolveStatus {
  double damping;
  int64_t attempts;
};

// Solve (sym(H) + lambda I) d = -g for the least lambda >= damping (x10 a try) that is PD.
std::tuple<at::Tensor, at::Tensor, at::Tensor> damped_cholesky(
    const at::Tensor& h, const at::Tensor& g, double damping, int64_t max_attempts);

// Saddle-free direction -|H|^-1 g through eigh; also the count of eigenvalues below
// -tolerance_factor eps max|lambda| (linalg.negative_tolerance).
std::tuple<at::Tensor, at::Tensor> saddle_free(
    const at::Tensor& h, const at::Tensor& g, double eigenvalue_floor, double tolerance_factor);

// Solve into `d` with `h` freshly owned, contiguous and symmetric (destroyed on return).
SolveStatus solve_owned_symmetric(at::Tensor& h, const at::Tensor& g, double damping,
                                  int64_t max_attempts, at::Tensor& d);

// A^T B for a product known to be symmetric, times `scale`; only the lower triangle is
// computed (a small float64 one by a tiled loop of our own, a large one in lower blocks, a
// syrk-style rank-k update), the rest mirrored.
at::Tensor symmetric_product(const at::Tensor& a, const at::Tensor& b, double scale);

// (loss, grad, H) of the catalogue objectives, flat parameters as the engine lays them out.
using System = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
System mse_system(const at::Tensor& x, const at::Tensor& target);
System quadratic_system(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b);
System least_squares_system(const at::Tensor& x, const at::Tensor& X, const at::Tensor& y,
                            double l2, bool fit_intercept);
System logistic_system(const at::Tensor& x, const at::Tensor& X, const at::Tensor& y, double l2,
                       bool fit_intercept);
System softmax_system(const at::Tensor& x, const at::Tensor& X, const at::Tensor& labels,
                      int64_t num_classes, double l2, bool fit_intercept);

// J^T diag(w) J (w optional) from an (m, n) Jacobian.
at::Tensor gauss_newton(const at::Tensor& jac, const c10::optional<at::Tensor>& weights);

}  // namespace hessian
