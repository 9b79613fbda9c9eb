// Shared declarations of the hessian extension: solves, analytic assembly, fused steps.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace hessian {

// Outcome of a damped Cholesky solve: the lambda that worked and how many tries it took
// (attempts == 0 means no lambda within max_attempts gave a finite solution).
struct SolveStatus {
  double damping;
  int64_t attempts;
};

// Solve (sym(H) + lambda I) d = -g for the least lambda >= damping (x10 a try) that is PD.
std::tuple<at::Tensor, at::Tensor, at::Tensor> damped_cholesky(
    const at::Tensor& h, const at::Tensor& g, double damping, int64_t max_attempts);

// Saddle-free direction -|H|^-1 g through eigh; also the count of negative eigenvalues.
std::tuple<at::Tensor, at::Tensor> saddle_free(
    const at::Tensor& h, const at::Tensor& g, double eigenvalue_floor);

// Solve into `d` with `h` freshly owned, contiguous and symmetric (destroyed on return).
SolveStatus solve_owned_symmetric(at::Tensor& h, const at::Tensor& g, double damping,
                                  int64_t max_attempts, at::Tensor& d);

// A^T B for a product known to be symmetric, times `scale`; only the lower blocks are
// multiplied when the result is large (a syrk-style rank-k update), the rest mirrored.
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

// A fused step before it is packed for the op (or for the direct Python binding).
constexpr int64_t kFusedStats = 7;
struct FusedStep {
  using Stats = std::array<double, kFusedStats>;
  at::Tensor x_new;
  Stats stats;
};

FusedStep mse_fused(const at::Tensor& x, const at::Tensor& target, double lr, double damping,
                    int64_t max_attempts);
FusedStep quadratic_fused(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                          double lr, double damping, int64_t max_attempts);
FusedStep least_squares_fused(const at::Tensor& x, const at::Tensor& X, const at::Tensor& y,
                              double l2, bool fit_intercept, double lr, double damping,
                              int64_t max_attempts);
FusedStep logistic_fused(const at::Tensor& x, const at::Tensor& X, const at::Tensor& y,
                         double l2, bool fit_intercept, double lr, double damping,
                         int64_t max_attempts);
FusedStep softmax_fused(const at::Tensor& x, const at::Tensor& X, const at::Tensor& labels,
                        int64_t num_classes, double l2, bool fit_intercept, double lr,
                        double damping, int64_t max_attempts);

// Fused Newton steps: x_new and stats = [loss, |g|, max|g|, step norm, damping, attempts,
// finite] (float64); attempts == 0 means the damped solve failed, finite == 0 a non-finite
// loss, gradient or Hessian (x_new is then meaningless).
using Step = std::tuple<at::Tensor, at::Tensor>;
Step mse_newton_step(const at::Tensor& x, const at::Tensor& target, double lr, double damping,
                     int64_t max_attempts);
Step quadratic_newton_step(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                           double lr, double damping, int64_t max_attempts);
Step least_squares_newton_step(const at::Tensor& x, const at::Tensor& X, const at::Tensor& y,
                               double l2, bool fit_intercept, double lr, double damping,
                               int64_t max_attempts);
Step logistic_newton_step(const at::Tensor& x, const at::Tensor& X, const at::Tensor& y,
                          double l2, bool fit_intercept, double lr, double damping,
                          int64_t max_attempts);
Step softmax_newton_step(const at::Tensor& x, const at::Tensor& X, const at::Tensor& labels,
                         int64_t num_classes, double l2, bool fit_intercept, double lr,
                         double damping, int64_t max_attempts);

}  // namespace hessian
