// The fused Newton steps (loss, gradient, Hessian and the damped solve in one call), each
// declared once, in kFusedSteps below: fused.cpp builds the ops torch.ops.hessian.<name> from
// that list and python_bindings.cpp the direct entries hessian_service._C.<name> (the seed's
// fast path), both with the arguments of the entry's schema.
//
// Adding a step: declare its kernel below (FusedStep <kind>_fused(...)), define it in
// fused.cpp, add one FusedStepDef to kFusedSteps, and register its fake kernel in
// engine/backends/native/ops.py (whose FUSED_STATS is kFusedStats).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <tuple>

#include "hessian.h"

namespace hessian {

// A fused step's result: x_new = x + lr d and stats = [loss, |g|, max|g|, step norm, damping,
// attempts, finite, slope]; attempts == 0 means the damped solve failed, finite == 0 a
// non-finite loss, gradient or Hessian (x_new is then meaningless); slope = g.d of the
// unscaled direction (the Armijo test's, so a line search needs no second gradient; NaN
// where a kernel does not compute it: csrc/cuda's own).
constexpr int64_t kFusedStats = 8;
struct FusedStep {
  using Stats = std::array<double, kFusedStats>;
  at::Tensor x_new;
  Stats stats;
};

// The op's form of a step: (x_new, stats as a float64 CPU tensor).
using Step = std::tuple<at::Tensor, at::Tensor>;
Step to_op(FusedStep&& step);

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

// One fused step: `kernel`'s parameters, in order, are the schema's arguments `args`.
template <auto Kernel>
struct FusedStepDef {
  static constexpr auto kernel = Kernel;
  const char* name;  // the op and the direct entry: "<kind>_newton_step"
  const char* args;  // the schema's arguments, "Tensor x, ..."
  // The direct entry keeps the GIL while x has at most this many values (releasing it costs
  // more than a step that small); -1: always released.
  int64_t keep_gil_numel = -1;
  // A CUDA build registers csrc/cuda/'s own kernel for this op instead of the ATen path.
  bool own_cuda_kernel = false;
};

// Below this many parameters the mse step takes less time than releasing the GIL.
constexpr int64_t kMseKeepGil = 4096;

inline constexpr auto kFusedSteps = std::make_tuple(
    FusedStepDef<&mse_fused>{
        "mse_newton_step", "Tensor x, Tensor target, float lr, float damping, int max_attempts",
        kMseKeepGil, true},
    FusedStepDef<&quadratic_fused>{
        "quadratic_newton_step",
        "Tensor x, Tensor A, Tensor b, float lr, float damping, int max_attempts", -1, true},
    FusedStepDef<&least_squares_fused>{
        "least_squares_newton_step",
        "Tensor x, Tensor X, Tensor y, float l2, bool fit_intercept, float lr, float damping,"
        " int max_attempts"},
    FusedStepDef<&logistic_fused>{
        "logistic_regression_newton_step",
        "Tensor x, Tensor X, Tensor y, float l2, bool fit_intercept, float lr, float damping,"
        " int max_attempts"},
    FusedStepDef<&softmax_fused>{
        "softmax_regression_newton_step",
        "Tensor x, Tensor X, Tensor labels, int num_classes, float l2, bool fit_intercept,"
        " float lr, float damping, int max_attempts"});

// Calls f(def) for every entry of kFusedSteps, in order.
template <typename F>
void for_each_fused_step(F&& f) {
  std::apply([&](const auto&... def) { (f(def), ...); }, kFusedSteps);
}

}  // namespace hessian
