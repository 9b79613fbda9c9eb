// Analytic loss, gradient and Hessian of the catalogue objectives, with ATen calls only
// (any device), the dense products through BLAS: X^T D X as a symmetric rank-k update,
// the softmax Hessian from its Kronecker structure with two matrix products. The ops
// *_system and gauss_newton are registered here, for CPU and CUDA alike.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "hessian.h"

namespace hessian {
namespace {

// Below this width one GEMM is cheaper than several blocked ones.
constexpr int64_t kBlockedMin = 384;
constexpr int64_t kBlockWidth = 320;

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", t.scalar_type());
}

void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have the parameters' dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), name, " must be on the parameters' device ", x.device(),
              ", got ", t.device());
}

// Validates a linear model's X (N, d), params (d + fit_intercept,) and returns d.
int64_t check_linear(const at::Tensor& x, const at::Tensor& X, bool fit_intercept) {
  check_float(x, "params");
  TORCH_CHECK(x.dim() == 1, "params must be flat (1-D), got shape ", x.sizes());
  TORCH_CHECK(X.dim() == 2 && X.size(0) > 0, "X must be a non-empty (N, d) matrix, got shape ",
              X.sizes());
  check_like(X, x, "X");
  const int64_t d = X.size(1);
  TORCH_CHECK(x.size(0) == d + (fit_intercept ? 1 : 0), "params must have ",
              d + (fit_intercept ? 1 : 0), " values for X with ", d, " columns, got ", x.size(0));
  return d;
}

// Copy the strict lower triangle of a square CPU view (unit column stride) onto the upper.
template <typename scalar_t>
void mirror_lower(scalar_t* a, int64_t n, int64_t ld) {
  constexpr int64_t tile = 64;
  const int64_t tiles = (n + tile - 1) / tile;
  at::parallel_for(0, tiles, n < 512 ? tiles : 1, [&](int64_t t0, int64_t t1) {
    for (int64_t ti = t0; ti < t1; ++ti) {
      const int64_t i0 = ti * tile, i1 = std::min(n, i0 + tile);
      for (int64_t tj = ti; tj < tiles; ++tj) {
        const int64_t j0 = tj * tile, j1 = std::min(n, j0 + tile);
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = std::max(j0, i + 1); j < j1; ++j) a[i * ld + j] = a[j * ld + i];
      }
    }
  });
}

// out = scale A^T B, exactly symmetric: on the CPU only the lower blocks are multiplied
// (one GEMM below kBlockedMin columns) and the lower triangle is mirrored.
void symmetric_product_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b,
                            double scale) {
  const int64_t n = a.size(1);
  if (!a.is_cpu()) {
    out.addmm_(a.t(), b, 0.0, scale);
    out.copy_(out.tril() + out.tril(-1).t());
    return;
  }
  if (n < kBlockedMin) {
    out.addmm_(a.t(), b, 0.0, scale);
  } else {
    const int64_t blocks = (n + kBlockWidth - 1) / kBlockWidth;
    const int64_t width = (n + blocks - 1) / blocks;
    for (int64_t bi = 0; bi < blocks; ++bi) {
      const int64_t i0 = bi * width, ni = std::min(n, i0 + width) - i0;
      const at::Tensor ai = a.narrow(1, i0, ni).t();
      // the lower block row: columns 0 .. i0 + ni in one GEMM
      out.narrow(0, i0, ni).narrow(1, 0, i0 + ni).addmm_(ai, b.narrow(1, 0, i0 + ni), 0.0,
                                                          scale);
    }
  }
  TORCH_CHECK(out.stride(1) == 1, "symmetric_product: output needs unit column stride");
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "mirror_lower", [&] {
    mirror_lower<scalar_t>(out.data_ptr<scalar_t>(), n, out.stride(0));
  });
}

}  // namespace

at::Tensor symmetric_product(const at::Tensor& a, const at::Tensor& b, double scale) {
  at::Tensor out = at::empty({a.size(1), a.size(1)}, a.options());
  symmetric_product_into(out, a, b, scale);
  return out;
}

System mse_system(const at::Tensor& x, const at::Tensor& target) {
  check_float(x, "params");
  check_like(target, x, "target");
  TORCH_CHECK(x.dim() == 1 && x.numel() == target.numel() && x.numel() > 0,
              "params must be flat with target's ", target.numel(), " values, got shape ",
              x.sizes());
  const int64_t n = x.numel();
  const at::Tensor r = x - target.reshape(-1);
  const at::Tensor loss = r.square().mean();
  const at::Tensor g = r.mul_(2.0 / static_cast<double>(n));
  at::Tensor h = at::zeros({n, n}, x.options());
  h.diagonal().fill_(2.0 / static_cast<double>(n));
  return {loss, g, h};
}

System quadratic_system(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b) {
  check_float(x, "params");
  check_like(a, x, "A");
  check_like(b, x, "b");
  const int64_t n = x.numel();
  TORCH_CHECK(x.dim() == 1 && a.dim() == 2 && a.size(0) == n && a.size(1) == n && b.dim() == 1 &&
                  b.size(0) == n,
              "quadratic needs params (n,), A (n, n), b (n,); got ", x.sizes(), ", ", a.sizes(),
              ", ", b.sizes());
  const at::Tensor ax = at::mv(a, x);
  const at::Tensor loss = at::dot(x, ax).mul_(0.5).sub_(at::dot(b, x));
  return {loss, ax.sub_(b), a.clone(at::MemoryFormat::Contiguous)};
}

System least_squares_system(const at::Tensor& x, const at::Tensor& X, const at::Tensor& y,
                            double l2, bool fit_intercept) {
  const int64_t d = check_linear(x, X, fit_intercept);
  check_like(y, x, "y");
  const int64_t N = X.size(0), n = x.size(0);
  TORCH_CHECK(y.dim() == 1 && y.size(0) == N, "y must have ", N, " values, got ", y.sizes());
  const double inv_n = 1.0 / static_cast<double>(N);
  const at::Tensor w = x.narrow(0, 0, d);
  at::Tensor r = at::mv(X, w);
  if (fit_intercept) r.add_(x[d]);
  r.sub_(y);
  at::Tensor loss = r.square().mean().mul_(0.5).add_(at::dot(w, w), 0.5 * l2);
  at::Tensor g = at::empty({n}, x.options());
  at::Tensor gw = g.narrow(0, 0, d);
  at::mv_out(gw, X.t(), r).mul_(inv_n).add_(w, l2);
  at::Tensor h = at::empty({n, n}, x.options());
  symmetric_product_into(h.narrow(0, 0, d).narrow(1, 0, d), X, X, inv_n);
  h.diagonal().narrow(0, 0, d).add_(l2);
  if (fit_intercept) {
    g.narrow(0, d, 1).copy_(r.mean());
    const at::Tensor col = X.mean(0);
    h.narrow(0, d, 1).narrow(1, 0, d).copy_(col.unsqueeze(0));
    h.narrow(1, d, 1).narrow(0, 0, d).copy_(col.unsqueeze(1));
    h.narrow(0, d, 1).narrow(1, d, 1).fill_(1.0);
  }
  return {loss, g, h};
}

System logistic_system(const at::Tensor& x, const at::Tensor& X, const at::Tensor& y, double l2,
                       bool fit_intercept) {
  const int64_t d = check_linear(x, X, fit_intercept);
  check_like(y, x, "y");
  const int64_t N = X.size(0), n = x.size(0);
  TORCH_CHECK(y.dim() == 1 && y.size(0) == N, "y must have ", N, " values, got ", y.sizes());
  const double inv_n = 1.0 / static_cast<double>(N);
  const at::Tensor w = x.narrow(0, 0, d);
  at::Tensor z = at::mv(X, w);
  if (fit_intercept) z.add_(x[d]);
  // softplus(z) = log(1 + e^z) exactly (as the objective's logaddexp), never linearised
  const at::Tensor softplus = at::logaddexp(z, at::zeros({}, z.options()));
  at::Tensor loss = (softplus - y * z).mean().add_(at::dot(w, w), 0.5 * l2);
  const at::Tensor p = at::sigmoid(z);
  const at::Tensor e = p - y;
  const at::Tensor s = p * at::sigmoid(z.neg_());  // p (1 - p) without cancellation
  at::Tensor g = at::empty({n}, x.options());
  at::Tensor gw = g.narrow(0, 0, d);
  at::mv_out(gw, X.t(), e).mul_(inv_n).add_(w, l2);
  at::Tensor h = at::empty({n, n}, x.options());
  symmetric_product_into(h.narrow(0, 0, d).narrow(1, 0, d), X, X * s.unsqueeze(1), inv_n);
  h.diagonal().narrow(0, 0, d).add_(l2);
  if (fit_intercept) {
    g.narrow(0, d, 1).copy_(e.mean());
    const at::Tensor col = at::mv(X.t(), s).mul_(inv_n);
    h.narrow(0, d, 1).narrow(1, 0, d).copy_(col.unsqueeze(0));
    h.narrow(1, d, 1).narrow(0, 0, d).copy_(col.unsqueeze(1));
    h.narrow(0, d, 1).narrow(1, d, 1).copy_(s.mean());
  }
  return {loss, g, h};
}

System softmax_system(const at::Tensor& x, const at::Tensor& X, const at::Tensor& labels,
                      int64_t num_classes, double l2, bool fit_intercept) {
  check_float(x, "params");
  TORCH_CHECK(x.dim() == 1, "params must be flat (1-D), got shape ", x.sizes());
  TORCH_CHECK(X.dim() == 2 && X.size(0) > 0, "X must be a non-empty (N, d) matrix, got shape ",
              X.sizes());
  check_like(X, x, "X");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 &&
                  labels.size(0) == X.size(0),
              "labels must be int64 of length ", X.size(0));
  TORCH_CHECK(labels.device() == x.device(), "labels must be on the parameters' device");
  const int64_t N = X.size(0), d = X.size(1), k = num_classes;
  const int64_t D = d + (fit_intercept ? 1 : 0), n = D * k;
  TORCH_CHECK(k >= 2 && x.size(0) == n, "params must hold (", D, ", ", k, ") = ", n,
              " values, got ", x.size(0));
  const double inv_n = 1.0 / static_cast<double>(N);
  const at::Tensor W = x.view({D, k});
  const at::Tensor Wd = W.narrow(0, 0, d);
  at::Tensor Z = at::mm(X, Wd);
  if (fit_intercept) Z.add_(W[d]);
  const at::Tensor lab = labels.unsqueeze(1);
  const at::Tensor lse = at::logsumexp(Z, {1});
  at::Tensor loss =
      (lse - Z.gather(1, lab).squeeze(1)).mean().add_(at::sum(Wd * Wd), 0.5 * l2);
  const at::Tensor P = at::softmax(Z, 1);
  const at::Tensor E = P.clone().scatter_add_(1, lab, at::full({N, 1}, -1.0, P.options()));
  at::Tensor g = at::empty({D, k}, x.options());
  at::Tensor gw = g.narrow(0, 0, d);
  at::mm_out(gw, X.t(), E).mul_(inv_n).add_(Wd, l2);
  if (fit_intercept) g.narrow(0, d, 1).copy_(E.mean(0, true));
  const at::Tensor Xa =
      fit_intercept ? at::cat({X, at::ones({N, 1}, X.options())}, 1) : X;
  // M[i, a k + c] = Xa[i, a] P[i, c]: the per-sample outer products, flattened
  const at::Tensor M = (Xa.unsqueeze(2) * P.unsqueeze(1)).reshape({N, n});
  // H = (1/N) sum_i x_i x_i^T kron (diag p_i - p_i p_i^T) = (1/N) (block diag - M^T M)
  at::Tensor h = symmetric_product(M, M, -inv_n);
  const at::Tensor diag_blocks = at::mm(Xa.t(), M).mul_(inv_n).view({D, D, k});
  h.view({D, k, D, k}).diagonal(0, 1, 3).add_(diag_blocks);
  h.diagonal().narrow(0, 0, d * k).add_(l2);
  return {loss, g.view({n}), h};
}

at::Tensor gauss_newton(const at::Tensor& jac, const c10::optional<at::Tensor>& weights) {
  check_float(jac, "J");
  TORCH_CHECK(jac.dim() == 2, "J must be an (m, n) Jacobian, got shape ", jac.sizes());
  if (!weights.has_value()) return symmetric_product(jac, jac, 1.0);
  const at::Tensor& w = *weights;
  check_like(w, jac, "weights");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == jac.size(0), "weights must have ", jac.size(0),
              " values (one per Jacobian row), got shape ", w.sizes());
  return symmetric_product(jac, jac * w.unsqueeze(1), 1.0);
}

TORCH_LIBRARY_FRAGMENT(hessian, m) {
  m.def("mse_system(Tensor x, Tensor target) -> (Tensor, Tensor, Tensor)");
  m.def("quadratic_system(Tensor x, Tensor A, Tensor b) -> (Tensor, Tensor, Tensor)");
  m.def("least_squares_system(Tensor x, Tensor X, Tensor y, float l2, bool fit_intercept)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("logistic_regression_system(Tensor x, Tensor X, Tensor y, float l2,"
        " bool fit_intercept) -> (Tensor, Tensor, Tensor)");
  m.def("softmax_regression_system(Tensor x, Tensor X, Tensor labels, int num_classes,"
        " float l2, bool fit_intercept) -> (Tensor, Tensor, Tensor)");
  m.def("gauss_newton(Tensor J, Tensor? weights=None) -> Tensor");
}

namespace {

void register_kernels(torch::Library& m) {
  m.impl("mse_system", &mse_system);
  m.impl("quadratic_system", &quadratic_system);
  m.impl("least_squares_system", &least_squares_system);
  m.impl("logistic_regression_system", &logistic_system);
  m.impl("softmax_regression_system", &softmax_system);
  m.impl("gauss_newton", &gauss_newton);
}

}  // namespace

TORCH_LIBRARY_IMPL(hessian, CPU, m) { register_kernels(m); }

TORCH_LIBRARY_IMPL(hessian, CUDA, m) { register_kernels(m); }

}  // namespace hessian
