// Fused Newton steps: loss, gradient, Hessian and the damped solve in one call, so a small
// step costs one dispatch instead of dozens. mse's Hessian is (2/n) I, solved in closed form.
// The ops torch.ops.hessian.*_newton_step are registered here, built from kFusedSteps
// (fused_steps.h) by one template.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "fused_steps.h"

namespace hessian {
namespace {

FusedStep::Stats make_stats(double loss, double gnorm, double gmax, double step_norm,
                           SolveStatus status, bool finite, double slope) {
  return {loss,          gnorm, gmax, step_norm, status.damping,
          static_cast<double>(status.attempts), finite ? 1.0 : 0.0, slope};
}

void check_step(double lr, double damping, int64_t max_attempts) {
  TORCH_CHECK(lr > 0 && std::isfinite(lr), "learning_rate must be finite and > 0, got ", lr);
  TORCH_CHECK(damping >= 0 && std::isfinite(damping), "damping must be finite and >= 0, got ",
              damping);
  TORCH_CHECK(max_attempts >= 1, "max_attempts must be >= 1, got ", max_attempts);
}

template <typename scalar_t>
void norms(const scalar_t* v, int64_t n, double& norm, double& vmax, bool& finite) {
  double ss = 0, mx = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double a = static_cast<double>(v[i]);
    ss += a * a;
    mx = std::max(mx, std::abs(a));
    finite = finite && std::isfinite(a);
  }
  norm = std::sqrt(ss);
  vmax = mx;
}

// ||v||, rescaled by max|v| where the sum of squares overflows while every entry is finite
// (as the engine's linalg.vector_norm): a finite step's record must not say inf.
double vector_norm(const at::Tensor& v) {
  const double norm = v.norm().item<double>();
  if (norm != std::numeric_limits<double>::infinity()) return norm;
  const double top = v.abs().max().item<double>();
  return std::isfinite(top) ? top * v.div(top).norm().item<double>() : norm;
}

// Solve the owned system, step, and summarise (any device; stats always on the CPU).
FusedStep finish(const at::Tensor& x, const System& system, double lr, double damping,
            int64_t max_attempts) {
  auto [loss, g, h] = system;
  const bool cpu = x.is_cpu();
  const double loss_v = loss.item<double>();
  // a non-finite x is reported as such even where the loss happens to stay finite
  bool finite = std::isfinite(loss_v) && x.isfinite().all().item<bool>() &&
                (cpu ? true : static_cast<bool>(g.isfinite().all().item<bool>()));
  double gnorm = 0, gmax = 0;
  const at::Tensor gc = g.contiguous();
  if (cpu) {
    AT_DISPATCH_FLOATING_TYPES(gc.scalar_type(), "fused_norms", [&] {
      norms(gc.data_ptr<scalar_t>(), gc.numel(), gnorm, gmax, finite);
    });
    // |g| by ATen's norm, as the engine's record computes it (bit for bit the same)
    if (finite) gnorm = gc.norm().item<double>();
  } else {
    gnorm = gc.norm().item<double>();
    gmax = gc.numel() ? gc.abs().max().item<double>() : 0.0;
  }
  finite = finite && h.isfinite().all().item<bool>();
  if (!finite)
    return {x.clone(), make_stats(loss_v, gnorm, gmax, 0.0, {damping, 0}, false, 0.0)};
  at::Tensor d = at::empty_like(gc);
  const SolveStatus status = solve_owned_symmetric(h, gc, damping, max_attempts, d);
  const double dnorm = vector_norm(d);
  // at::dot, as the engine's `grad @ d`: the Armijo test sees the same slope on both paths
  const double slope = at::dot(gc, d).item<double>();
  return {x.add(d, lr), make_stats(loss_v, gnorm, gmax, lr * dnorm, status, true, slope)};
}

template <typename scalar_t>
FusedStep mse_step_cpu(const at::Tensor& x, const at::Tensor& target, double lr, double damping) {
  const int64_t n = x.numel();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* tp = target.data_ptr<scalar_t>();
  at::Tensor x_new = at::detail::empty_cpu({n}, x.scalar_type(), std::nullopt, std::nullopt,
                                           std::nullopt, std::nullopt);
  scalar_t* out = x_new.data_ptr<scalar_t>();
  const double two_over_n = 2.0 / static_cast<double>(n);
  const double inv_diag = 1.0 / (two_over_n + damping);
  double ss = 0, gss = 0, gmax = 0, dss = 0, gd_sum = 0;
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t r = xp[i] - tp[i];
    ss += static_cast<double>(r) * static_cast<double>(r);
    const scalar_t gi = static_cast<scalar_t>(static_cast<double>(r) * two_over_n);
    const double gd = static_cast<double>(gi);
    finite = finite && std::isfinite(gd);
    gss += gd * gd;
    gmax = std::max(gmax, std::abs(gd));
    const scalar_t di = static_cast<scalar_t>(-gd * inv_diag);
    dss += static_cast<double>(di) * static_cast<double>(di);
    gd_sum += gd * static_cast<double>(di);
    out[i] = xp[i] + static_cast<scalar_t>(lr) * di;
  }
  const double loss = static_cast<double>(static_cast<scalar_t>(ss / static_cast<double>(n)));
  finite = finite && std::isfinite(loss);
  return {x_new, make_stats(loss, std::sqrt(gss), gmax, lr * std::sqrt(dss), {damping, 1}, finite,
                            gd_sum)};
}

}  // namespace

FusedStep mse_fused(const at::Tensor& x, const at::Tensor& target, double lr, double damping,
                     int64_t max_attempts) {
  check_step(lr, damping, max_attempts);
  if (x.is_cpu() && target.is_cpu() && x.is_contiguous() && target.is_contiguous() &&
      x.numel() == target.numel() && x.numel() > 0 && x.scalar_type() == target.scalar_type()) {
    FusedStep out;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mse_newton_step", [&] {
      out = mse_step_cpu<scalar_t>(x, target, lr, damping);
    });
    return out;
  }
  // Same closed form with ATen calls (other devices, odd layouts): H = (2/n) I.
  auto [loss, g, h] = mse_system(x, target);
  const double diag = 2.0 / static_cast<double>(x.numel()) + damping;
  const at::Tensor d = g.div(-diag);
  const double loss_v = loss.item<double>();
  const bool finite = std::isfinite(loss_v) && g.isfinite().all().item<bool>();
  return {x.add(d, lr), make_stats(loss_v, g.norm().item<double>(), g.abs().max().item<double>(),
                                   lr * vector_norm(d), {damping, 1}, finite,
                                   at::dot(g.reshape(-1), d.reshape(-1)).item<double>())};
}

FusedStep quadratic_fused(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                           double lr, double damping, int64_t max_attempts) {
  check_step(lr, damping, max_attempts);
  return finish(x, quadratic_system(x, a, b), lr, damping, max_attempts);
}

FusedStep least_squares_fused(const at::Tensor& x, const at::Tensor& X, const at::Tensor& y,
                               double l2, bool fit_intercept, double lr, double damping,
                               int64_t max_attempts) {
  check_step(lr, damping, max_attempts);
  return finish(x, least_squares_system(x, X, y, l2, fit_intercept), lr, damping, max_attempts);
}

FusedStep logistic_fused(const at::Tensor& x, const at::Tensor& X, const at::Tensor& y,
                          double l2, bool fit_intercept, double lr, double damping,
                          int64_t max_attempts) {
  check_step(lr, damping, max_attempts);
  return finish(x, logistic_system(x, X, y, l2, fit_intercept), lr, damping, max_attempts);
}

FusedStep softmax_fused(const at::Tensor& x, const at::Tensor& X, const at::Tensor& labels,
                         int64_t num_classes, double l2, bool fit_intercept, double lr,
                         double damping, int64_t max_attempts) {
  check_step(lr, damping, max_attempts);
  return finish(x, softmax_system(x, X, labels, num_classes, l2, fit_intercept), lr, damping,
                max_attempts);
}

Step to_op(FusedStep&& step) {
  at::Tensor stats = at::empty({kFusedStats}, at::TensorOptions().dtype(at::kDouble));
  std::copy(step.stats.begin(), step.stats.end(), stats.data_ptr<double>());
  return {std::move(step.x_new), stats};
}

namespace {

// The op of a fused step: the kernel's own parameters, its result packed by to_op.
template <auto Kernel>
struct FusedOp;

template <typename... Args, FusedStep (*Kernel)(Args...)>
struct FusedOp<Kernel> {
  static Step op(Args... args) { return to_op(Kernel(args...)); }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(hessian, m) {
  for_each_fused_step([&](const auto& def) {
    m.def((std::string(def.name) + "(" + def.args + ") -> (Tensor, Tensor)").c_str());
  });
}

TORCH_LIBRARY_IMPL(hessian, CPU, m) {
  for_each_fused_step([&](const auto& def) {
    m.impl(def.name, &FusedOp<std::remove_cvref_t<decltype(def)>::kernel>::op);
  });
}

// The same kernels serve CUDA tensors with ATen calls, except where a CUDA build has its own
// (csrc/cuda/fused_steps.cu registers those).
TORCH_LIBRARY_IMPL(hessian, CUDA, m) {
  for_each_fused_step([&](const auto& def) {
    if (!(kCudaBuild && def.own_cuda_kernel))
      m.impl(def.name, &FusedOp<std::remove_cvref_t<decltype(def)>::kernel>::op);
  });
}

}  // namespace hessian
