// The Newton solve: damped Cholesky with lambda escalation, and the saddle-free direction.
//
// Three paths, one policy (linalg.damped_cholesky_solve): start at the given damping; on a
// failed factorisation, a pivot L_ii^2 <= 16 eps (|H_ii| + lambda) (rounding noise: a lambda
// one ulp above -lambda_min(H) factors, and its solve is a step of 1e13), or a non-finite
// solution, lambda = max(10 lambda, sqrt(eps) * max|H_ij|) (1 in its place where that is
// 0 or not finite); eps is the storage type's.
//  * CPU, n <= kSmallN: plain loops in double on thread-local buffers, no ATen dispatch.
//  * CPU, larger n: LAPACK potrf (ATen's lapackCholesky) in place on one working triangle,
//    written by a symmetrising pass before each attempt (a retry re-reads H).
//  * other devices: the same policy with ATen calls (cuSOLVER on CUDA).
// The ops damped_cholesky and saddle_free are registered here.
#include <ATen/Parallel.h>
#include <ATen/native/BatchLinearAlgebra.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "hessian.h"

namespace hessian {
namespace {

constexpr int64_t kTile = 64;
// Largest n served by the hand-written loops; above it one LAPACK factorisation (measured
// crossover on the 2-core CI machine: the loops win up to about 64).
constexpr int64_t kSmallN = 64;

// The damping floor's scale: H's largest entry magnitude as it is (a floor of sqrt(eps) x
// max(1, max|diag H|) damped a singular H of scale 1e-12 to a gradient step; the diagonal
// alone took 40 attempts or more for [[1e-30, 1], [1, 1e-30]]), 1 where it is 0 or not
// finite.
inline double floor_scale(double largest_entry) {
  return largest_entry > 0 && std::isfinite(largest_entry) ? largest_entry : 1.0;
}

// max |a_ij| over a row-major n x n matrix (NaN entries ignored, as fmax does).
template <typename scalar_t>
double largest_entry(const scalar_t* a, int64_t n) {
  double m = 0.0;
  for (int64_t k = 0; k < n * n; ++k) m = std::fmax(m, std::abs(static_cast<double>(a[k])));
  return m;
}
// Below this n the O(n^2) copies run on one thread (waking the pool costs more).
constexpr int64_t kParallelN = 512;

template <typename scalar_t>
double sqrt_eps() {
  return std::sqrt(static_cast<double>(std::numeric_limits<scalar_t>::epsilon()));
}

// 16 eps of the storage type (linalg.ROUNDING_ULPS): a pivot must exceed this times
// |H_ii| + lambda. Not n eps, the worst-case bound, which in float32 at n = 2000 (2.4e-4)
// would damp well-posed matrices of condition 1e6.
template <typename scalar_t>
double pivot_tolerance() {
  return 16.0 * static_cast<double>(std::numeric_limits<scalar_t>::epsilon());
}

inline double dot(const double* a, const double* b, int64_t n) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    s0 += a[k] * b[k];
    s1 += a[k + 1] * b[k + 1];
    s2 += a[k + 2] * b[k + 2];
    s3 += a[k + 3] * b[k + 3];
  }
  for (; k < n; ++k) s0 += a[k] * b[k];
  return (s0 + s1) + (s2 + s3);
}

struct SmallBuffers {
  std::vector<double> sym, fac, inv, x, minus_g;
  void reserve(int64_t n) {
    if (static_cast<int64_t>(inv.size()) < n) {
      sym.resize(n * n);
      fac.resize(n * n);
      inv.resize(n);
      x.resize(n);
      minus_g.resize(n);
    }
  }
};

// One attempt on the lower triangle of `sym` + lam I: factor into fac (every pivot above
// tol (|sym_ii| + lam)), solve for x = -A^-1 g.
bool small_attempt(const double* sym, int64_t n, double lam, double tol, const double* minus_g,
                   SmallBuffers& w) {
  double* fac = w.fac.data();
  double* inv = w.inv.data();
  for (int64_t i = 0; i < n; ++i) {
    double* li = fac + i * n;
    const double* si = sym + i * n;
    for (int64_t j = 0; j < i; ++j) li[j] = (si[j] - dot(li, fac + j * n, j)) * inv[j];
    const double s = si[i] + lam - dot(li, li, i);
    if (!(s > tol * (std::abs(si[i]) + lam)) || !std::isfinite(s)) return false;
    li[i] = std::sqrt(s);
    inv[i] = 1.0 / li[i];
  }
  double* x = w.x.data();
  for (int64_t i = 0; i < n; ++i) x[i] = (minus_g[i] - dot(fac + i * n, x, i)) * inv[i];
  for (int64_t i = n - 1; i >= 0; --i) {
    const double xi = x[i] * inv[i];
    x[i] = xi;
    const double* li = fac + i * n;
    for (int64_t k = 0; k < i; ++k) x[k] -= li[k] * xi;
  }
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}

template <typename scalar_t>
SolveStatus small_solve(const scalar_t* h, int64_t n, const scalar_t* g, double damping,
                        int64_t max_attempts, bool symmetrise, scalar_t* d) {
  thread_local SmallBuffers w;
  w.reserve(std::max<int64_t>(n, 1));
  double* sym = w.sym.data();
  double scale = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      const double hij = static_cast<double>(h[i * n + j]);
      sym[i * n + j] = symmetrise ? 0.5 * (hij + static_cast<double>(h[j * n + i])) : hij;
      scale = std::fmax(scale, std::abs(sym[i * n + j]));
    }
  }
  double* minus_g = w.minus_g.data();
  for (int64_t i = 0; i < n; ++i) minus_g[i] = -static_cast<double>(g[i]);
  const double floor = sqrt_eps<scalar_t>() * floor_scale(scale);
  const double tol = pivot_tolerance<scalar_t>();
  double lam = damping;
  for (int64_t attempt = 1; attempt <= max_attempts; ++attempt) {
    if (small_attempt(sym, n, lam, tol, minus_g, w)) {
      for (int64_t i = 0; i < n; ++i) d[i] = static_cast<scalar_t>(w.x[i]);
      return {lam, attempt};
    }
    lam = std::max(lam * 10.0, floor);
  }
  return {lam, 0};
}

#if AT_BUILD_WITH_LAPACK()
// Copy the strict lower triangle (row-major) onto the upper one and set the diagonal.
template <typename scalar_t>
void restore_upper(scalar_t* a, int64_t n, const scalar_t* diag, scalar_t lam) {
  const int64_t tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, tiles, n < kParallelN ? tiles : 1, [&](int64_t t0, int64_t t1) {
    for (int64_t ti = t0; ti < t1; ++ti) {
      const int64_t i0 = ti * kTile, i1 = std::min(n, i0 + kTile);
      for (int64_t tj = ti; tj < tiles; ++tj) {
        const int64_t j0 = tj * kTile, j1 = std::min(n, j0 + kTile);
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = std::max(j0, i + 1); j < j1; ++j) a[i * n + j] = a[j * n + i];
      }
      for (int64_t i = i0; i < i1; ++i) a[i * n + i] = diag[i] + lam;
    }
  });
}

// Damped Cholesky on a row-major buffer; potrf('L') on the column-major view reads and
// overwrites only the upper triangle, which `fill(attempt, lam)` writes before each attempt
// (with lam on the diagonal). `diag` is diag(H), for the pivot test; `scale()` H's largest
// entry magnitude, for the damping floor (asked once, after a first failed attempt).
template <typename scalar_t, typename Fill, typename Scale>
SolveStatus lapack_solve(scalar_t* a, const scalar_t* diag, int64_t n, const scalar_t* g,
                         double damping, int64_t max_attempts, Scale scale, Fill fill,
                         scalar_t* d) {
  double floor = -1.0;  // taken at the first escalation: an n^2 pass an undamped solve skips
  const double tol = pivot_tolerance<scalar_t>();
  const int ni = static_cast<int>(n);
  double lam = damping;
  for (int64_t attempt = 1; attempt <= max_attempts; ++attempt) {
    fill(attempt, static_cast<scalar_t>(lam));
    int info = 0;
    at::native::lapackCholesky<scalar_t>('L', ni, a, ni, &info);
    for (int64_t i = 0; info == 0 && i < n; ++i) {
      const double l = static_cast<double>(a[i * n + i]);
      if (!(l * l > tol * (std::abs(static_cast<double>(diag[i])) + lam))) info = 1;
    }
    if (info == 0) {
      for (int64_t i = 0; i < n; ++i) d[i] = -g[i];
      at::native::blasTriangularSolve<scalar_t>('L', 'L', 'N', 'N', ni, 1, a, ni, d, ni);
      at::native::blasTriangularSolve<scalar_t>('L', 'L', 'T', 'N', ni, 1, a, ni, d, ni);
      bool finite = true;
      for (int64_t i = 0; i < n; ++i) finite = finite && std::isfinite(d[i]);
      if (finite) return {lam, attempt};
    }
    if (floor < 0) floor = sqrt_eps<scalar_t>() * floor_scale(scale());
    lam = std::max(lam * 10.0, floor);
  }
  return {lam, 0};
}

// The upper triangle of `out` = (H + H^T) / 2 with lam added to the diagonal: stores run
// along rows; only the loads from H's lower triangle are strided (within kTile tiles).
template <typename scalar_t>
void symmetrise_upper(const scalar_t* h, int64_t n, scalar_t* out, scalar_t lam) {
  const int64_t tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, tiles, n < kParallelN ? tiles : 1, [&](int64_t t0, int64_t t1) {
    for (int64_t ti = t0; ti < t1; ++ti) {
      const int64_t i0 = ti * kTile, i1 = std::min(n, i0 + kTile);
      for (int64_t tj = ti; tj < tiles; ++tj) {
        const int64_t j0 = tj * kTile, j1 = std::min(n, j0 + kTile);
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = std::max(j0, i + 1); j < j1; ++j)
            out[i * n + j] = (h[i * n + j] + h[j * n + i]) * scalar_t(0.5);
      }
      for (int64_t i = i0; i < i1; ++i) out[i * n + i] = h[i * n + i] + lam;
    }
  });
}
#endif

// The policy with ATen calls only: works on any device linalg_cholesky_ex supports.
SolveStatus generic_solve(const at::Tensor& hs, const at::Tensor& g, double damping,
                          int64_t max_attempts, at::Tensor& d) {
  const at::Tensor diag_abs = hs.diagonal().abs();
  const double eps = hs.scalar_type() == at::kFloat ? sqrt_eps<float>() : sqrt_eps<double>();
  double floor = -1.0;  // taken at the first escalation (a device sync an undamped solve skips)
  const double tol =
      hs.scalar_type() == at::kFloat ? pivot_tolerance<float>() : pivot_tolerance<double>();
  double lam = damping;
  for (int64_t attempt = 1; attempt <= max_attempts; ++attempt) {
    at::Tensor a = hs;
    if (lam > 0) {
      a = hs.clone();
      a.diagonal().add_(lam);
    }
    auto [factor, info] = at::linalg_cholesky_ex(a);
    if (info.item<int64_t>() == 0 &&
        factor.diagonal().square().gt((diag_abs + lam) * tol).all().item<bool>()) {
      at::Tensor sol = at::cholesky_solve(g.neg().reshape({-1, 1}), factor).reshape(-1);
      if (sol.isfinite().all().item<bool>()) {
        d.copy_(sol);
        return {lam, attempt};
      }
    }
    if (floor < 0) floor = eps * floor_scale(hs.numel() ? hs.abs().max().item<double>() : 0.0);
    lam = std::max(lam * 10.0, floor);
  }
  return {lam, 0};
}

void check_system(const at::Tensor& h, const at::Tensor& g) {
  TORCH_CHECK(h.dim() == 2 && h.size(0) == h.size(1), "H must be a square matrix, got shape ",
              h.sizes());
  TORCH_CHECK(g.dim() == 1 && g.size(0) == h.size(0), "g must be a vector of length ", h.size(0),
              ", got shape ", g.sizes());
  TORCH_CHECK(h.scalar_type() == at::kFloat || h.scalar_type() == at::kDouble,
              "H must be float32 or float64, got ", h.scalar_type());
  TORCH_CHECK(g.scalar_type() == h.scalar_type(), "g must have H's dtype ", h.scalar_type(),
              ", got ", g.scalar_type());
  TORCH_CHECK(g.device() == h.device(), "g must be on H's device");
}

}  // namespace

SolveStatus solve_owned_symmetric(at::Tensor& h, const at::Tensor& g, double damping,
                                  int64_t max_attempts, at::Tensor& d) {
  const int64_t n = h.size(0);
  const at::Tensor gc = g.contiguous();
  if (h.is_cpu()) {
    SolveStatus status{damping, 0};
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "solve_owned_symmetric", [&] {
      scalar_t* a = h.data_ptr<scalar_t>();
      if (n <= kSmallN) {
        status = small_solve<scalar_t>(a, n, gc.data_ptr<scalar_t>(), damping, max_attempts,
                                       false, d.data_ptr<scalar_t>());
        return;
      }
#if AT_BUILD_WITH_LAPACK()
      std::vector<scalar_t> diag(n);
      for (int64_t i = 0; i < n; ++i) diag[i] = a[i * n + i];
      // h is symmetric: its lower triangle is the copy a retry restores the upper one from
      auto fill = [&](int64_t attempt, scalar_t lam) {
        if (attempt == 1) {
          for (int64_t i = 0; i < n; ++i) a[i * n + i] = diag[i] + lam;
        } else {
          restore_upper(a, n, diag.data(), lam);
        }
      };
      // potrf overwrites the upper triangle only: the lower one and diag are still H's
      auto scale = [&] {
        double m = 0.0;
        for (int64_t i = 0; i < n; ++i) {
          m = std::fmax(m, std::abs(static_cast<double>(diag[i])));
          for (int64_t j = 0; j < i; ++j)
            m = std::fmax(m, std::abs(static_cast<double>(a[i * n + j])));
        }
        return m;
      };
      status = lapack_solve<scalar_t>(a, diag.data(), n, gc.data_ptr<scalar_t>(), damping,
                                      max_attempts, scale, fill, d.data_ptr<scalar_t>());
#else
      status = generic_solve(h, gc, damping, max_attempts, d);
#endif
    });
    return status;
  }
  return generic_solve(h, gc, damping, max_attempts, d);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> damped_cholesky(
    const at::Tensor& h, const at::Tensor& g, double damping, int64_t max_attempts) {
  check_system(h, g);
  TORCH_CHECK(damping >= 0 && std::isfinite(damping), "damping must be finite and >= 0, got ",
              damping);
  TORCH_CHECK(max_attempts >= 1, "max_attempts must be >= 1, got ", max_attempts);
  const int64_t n = h.size(0);
  at::Tensor d = at::empty({n}, g.options());
  SolveStatus status{damping, 0};
  if (h.is_cpu()) {
    const at::Tensor hc = h.contiguous();
    const at::Tensor gc = g.contiguous();
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "damped_cholesky", [&] {
      if (n <= kSmallN) {
        status = small_solve<scalar_t>(hc.data_ptr<scalar_t>(), n, gc.data_ptr<scalar_t>(),
                                       damping, max_attempts, true, d.data_ptr<scalar_t>());
        return;
      }
#if AT_BUILD_WITH_LAPACK()
      at::Tensor work = at::empty({n, n}, h.options());
      const scalar_t* src = hc.data_ptr<scalar_t>();
      scalar_t* a = work.data_ptr<scalar_t>();
      std::vector<scalar_t> diag(n);
      for (int64_t i = 0; i < n; ++i) diag[i] = src[i * n + i];
      // every attempt symmetrises afresh from H, which potrf never touches
      auto fill = [&](int64_t, scalar_t lam) { symmetrise_upper<scalar_t>(src, n, a, lam); };
      auto scale = [&] { return largest_entry(src, n); };
      status = lapack_solve<scalar_t>(a, diag.data(), n, gc.data_ptr<scalar_t>(), damping,
                                      max_attempts, scale, fill, d.data_ptr<scalar_t>());
#else
      status = generic_solve((hc + hc.t()) * 0.5, gc, damping, max_attempts, d);
#endif
    });
  } else {
    status = generic_solve((h + h.t()) * 0.5, g, damping, max_attempts, d);
  }
  at::Tensor lam = at::scalar_tensor(status.damping, h.options().dtype(at::kDouble));
  at::Tensor attempts = at::scalar_tensor(status.attempts, h.options().dtype(at::kLong));
  return {d, lam, attempts};
}

std::tuple<at::Tensor, at::Tensor> saddle_free(const at::Tensor& h, const at::Tensor& g,
                                               double eigenvalue_floor, double tolerance_factor) {
  check_system(h, g);
  TORCH_CHECK(eigenvalue_floor > 0, "eigenvalue_floor must be > 0, got ", eigenvalue_floor);
  auto [evals, evecs] = at::linalg_eigh((h + h.t()) * 0.5);
  // negative: below -tolerance_factor eps max|lambda| (linalg.negative_tolerance, whose
  // rounding_factor is max(n, log2(rows)); same operations in the same order, so both count
  // alike); smaller magnitudes are rounding noise of the matrix
  TORCH_CHECK(tolerance_factor >= 0, "tolerance_factor must be >= 0, got ", tolerance_factor);
  const int64_t n = evals.numel();
  const double eps = h.scalar_type() == at::kFloat ? std::numeric_limits<float>::epsilon()
                                                   : std::numeric_limits<double>::epsilon();
  const double largest = n ? evals.abs().max().item<double>() : 0.0;
  const double tol = tolerance_factor * eps * largest;
  at::Tensor negative = evals.lt(-tol).sum();
  // |lambda| floored relative to the largest (as linalg.saddle_free_direction): an absolute
  // floor turned a positive-definite H of scale 1e-10 into a step 100 times too short
  const double floor = largest > 0 ? eigenvalue_floor * largest : eigenvalue_floor;
  at::Tensor coeff = at::mv(evecs.t(), g).div_(evals.abs().clamp_min_(floor));
  at::Tensor d = at::mv(evecs, coeff).neg_();
  return {d, negative};
}

TORCH_LIBRARY_FRAGMENT(hessian, m) {
  m.def("damped_cholesky(Tensor H, Tensor g, float damping, int max_attempts)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("saddle_free(Tensor H, Tensor g, float eigenvalue_floor, float tolerance_factor)"
        " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hessian, CPU, m) {
  m.impl("damped_cholesky", &damped_cholesky);
  m.impl("saddle_free", &saddle_free);
}

// ATen calls serve CUDA tensors too; a CUDA build registers csrc/cuda/small_solve.cu's
// damped_cholesky instead.
TORCH_LIBRARY_IMPL(hessian, CUDA, m) {
  if (!kCudaBuild) m.impl("damped_cholesky", &damped_cholesky);
  m.impl("saddle_free", &saddle_free);
}

}  // namespace hessian
