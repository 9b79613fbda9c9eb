// Analytic loss, gradient and Hessian of the catalogue objectives, with ATen calls (any
// device), the dense products through BLAS: X^T D X as a symmetric rank-k update, the
// softmax Hessian from its Kronecker structure with two matrix products. On the CPU a small
// float64 problem takes loops of our own instead (logistic regression's row pass, a
// register-tiled X^T D X), where dispatch and a thin GEMM's packing cost more than the
// arithmetic. The ops *_system and gauss_newton are registered here, for CPU and CUDA alike.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "hessian.h"

namespace hessian {
namespace {

// Below this width one GEMM is cheaper than several blocked ones.
constexpr int64_t kBlockedMin = 384;
constexpr int64_t kBlockWidth = 320;
// Up to this much work (N n^2) a float64 CPU product is tiled_lower_product's on two threads
// (measured: see symmetric_product_into); tiled_work_limit scales it to the thread count.
constexpr int64_t kTiledWork = int64_t{1} << 23;

#if defined(__GNUC__)
#define HESSIAN_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define HESSIAN_ALWAYS_INLINE inline
#endif

// The largest N n^2 the tiled product takes: it runs on one thread, and a GEMM's time falls
// with threads (2^23 on two; less on more, so many cores are not left idle).
int64_t tiled_work_limit() {
  return kTiledWork * 2 / std::max<int64_t>(2, at::get_num_threads());
}

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

// The lower triangle of scale A^T B (A, B: N x n, row-major float64) in MR x NR tiles, each
// accumulated over all N rows in registers, then scaled once; out has leading dimension ld.
template <int MR, int NR>
HESSIAN_ALWAYS_INLINE void lower_tiles(const double* a, const double* b, int64_t N, int64_t n,
                                       double* out, int64_t ld, double scale) {
  for (int64_t i0 = 0; i0 < n; i0 += MR) {
    const int64_t mi = std::min<int64_t>(MR, n - i0);
    for (int64_t j0 = 0; j0 < i0 + mi; j0 += NR) {
      const int64_t nj = std::min<int64_t>(NR, n - j0);
      double acc[MR][NR] = {};
      if (mi == MR && nj == NR) {  // the full tile: fixed trip counts the compiler unrolls
        for (int64_t r = 0; r < N; ++r) {
          const double* ar = a + r * n + i0;
          const double* br = b + r * n + j0;
          for (int p = 0; p < MR; ++p)
            for (int q = 0; q < NR; ++q) acc[p][q] += ar[p] * br[q];
        }
      } else {
        for (int64_t r = 0; r < N; ++r) {
          const double* ar = a + r * n + i0;
          const double* br = b + r * n + j0;
          for (int64_t p = 0; p < mi; ++p)
            for (int64_t q = 0; q < nj; ++q) acc[p][q] += ar[p] * br[q];
        }
      }
      for (int64_t p = 0; p < mi; ++p)
        for (int64_t q = 0; q < nj && j0 + q <= i0 + p; ++q)
          out[(i0 + p) * ld + j0 + q] = acc[p][q] * scale;
    }
  }
}

constexpr int kTileRows = 4, kTileCols = 8;

void lower_tiles_baseline(const double* a, const double* b, int64_t N, int64_t n, double* out,
                          int64_t ld, double scale) {
  lower_tiles<kTileRows, kTileCols>(a, b, N, n, out, ld, scale);
}

#if defined(__GNUC__) && defined(__x86_64__)
// The same loop compiled for AVX2 and FMA (twice the baseline SSE2's lanes), taken at run
// time where the CPU has them.
__attribute__((target("avx2,fma"))) void lower_tiles_avx2(const double* a, const double* b,
                                                          int64_t N, int64_t n, double* out,
                                                          int64_t ld, double scale) {
  lower_tiles<kTileRows, kTileCols>(a, b, N, n, out, ld, scale);
}
#endif

// The lower triangle of scale A^T B (float64, contiguous) by lower_tiles, on this thread.
void tiled_lower_product(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                         double scale) {
  const int64_t N = a.size(0), n = a.size(1), ld = out.stride(0);
  const double* ap = a.data_ptr<double>();
  const double* bp = b.data_ptr<double>();
  double* op = out.data_ptr<double>();
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return lower_tiles_avx2(ap, bp, N, n, op, ld, scale);
#endif
  lower_tiles_baseline(ap, bp, N, n, op, ld, scale);
}

// out = scale A^T B, exactly symmetric. On the CPU only the lower triangle is computed, then
// mirrored: a small float64 product (N n^2 <= tiled_work_limit()) by tiled_lower_product,
// which beats MKL's GEMM there even when that has two threads (31 against 37-61 us for
// breast cancer's 569 x 31 on this project's AMD machine; slower beyond, and for float32,
// whose GEMM accumulates in float); else below kBlockedMin columns in one GEMM, above in
// GEMMs of the lower block rows.
void symmetric_product_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b,
                            double scale) {
  const int64_t n = a.size(1);
  if (!a.is_cpu()) {
    out.addmm_(a.t(), b, 0.0, scale);
    out.copy_(out.tril() + out.tril(-1).t());
    return;
  }
  TORCH_CHECK(out.stride(1) == 1, "symmetric_product: output needs unit column stride");
  const bool tiled = out.scalar_type() == at::kDouble && a.scalar_type() == at::kDouble &&
                     b.scalar_type() == at::kDouble && a.is_contiguous() && b.is_contiguous();
  if (tiled && a.size(0) * n * n <= tiled_work_limit()) {
    tiled_lower_product(out, a, b, scale);
  } else if (n < kBlockedMin) {
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
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "mirror_lower", [&] {
    mirror_lower<scalar_t>(out.data_ptr<scalar_t>(), n, out.stride(0));
  });
}

// h's strict lower triangle copied onto its upper one: exactly symmetric, whichever triangle
// a solve reads (the fused step's LAPACK call reads the other one than damped_cholesky).
void make_symmetric(at::Tensor& h) {
  if (!h.is_cpu() || !h.is_contiguous()) {
    h.copy_(h.tril() + h.tril(-1).t());
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "mirror_lower", [&] {
    mirror_lower<scalar_t>(h.data_ptr<scalar_t>(), h.size(0), h.stride(0));
  });
}

}  // namespace

namespace {

// loss += 0.5 l2 ||w||^2, nothing with l2 = 0: 0 x inf (w of 1e200, its square inf) made an
// unregularised loss NaN and a finite point was refused
void add_l2(at::Tensor& loss, const at::Tensor& w, double l2) {
  if (l2 != 0.0) loss.add_(at::dot(w, w), 0.5 * l2);
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
  at::Tensor loss = r.square().mean().mul_(0.5);
  add_l2(loss, w, l2);
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

namespace {

// Rows per chunk of the CPU row pass: fixed, so the partial sums (added in chunk order) and
// hence the row pass's sums do not depend on how many threads ran the chunks.
constexpr int64_t kRowChunk = 512;
constexpr int64_t kRowsGrain = int64_t{1} << 18;

// One row's share of the sums: X^T e and X^T s (into ge, gs) and the scaled row s x (into
// out); restrict-qualified so the loop vectorises.
inline void scaled_row(const double* __restrict row, double e, double s, int64_t d,
                       double* __restrict ge, double* __restrict gs, double* __restrict out) {
  for (int64_t j = 0; j < d; ++j) {
    ge[j] += e * row[j];
    gs[j] += s * row[j];
    out[j] = s * row[j];
  }
}

// The logistic loss's row pass (float64, CPU), one sweep instead of a dozen ATen passes (a
// small problem's step was mostly their dispatch), given z = X w + b, t = e^-|z| and
// log1p(t) (vectorised ATen calls: a scalar exp, log1p and dot per row cost more than the
// sweep): softplus(z) - y z summed, as softplus((1 - 2y) z) (y in {0, 1}: softplus(z) - z
// cancels to 0 where the label is certain); e = p - y (-(1 - p) for y = 1, from the same
// e^-|z|, without that cancellation) and s = p (1 - p) (p = sigmoid z), summed into X^T e
// and X^T s; and the scaled rows s X for the Hessian's product.
// sums = [loss, X^T e (d), sum e, X^T s (d), sum s].
void logistic_rows(const double* X, const double* y, const double* z, const double* t,
                   const double* log1p_t, int64_t N, int64_t d, double* xs,
                   std::vector<double>& sums) {
  const int64_t width = 2 * d + 3, chunks = (N + kRowChunk - 1) / kRowChunk;
  std::vector<double> partial(static_cast<size_t>(chunks * width), 0.0);
  // threads only past kRowsGrain values (a smaller problem's OpenMP region costs more than
  // its rows: the breast-cancer job took 0.7 ms longer on two threads than on one)
  const int64_t grain = std::max<int64_t>(1, kRowsGrain / (kRowChunk * (d + 1)));
  at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double* acc = partial.data() + c * width;
      for (int64_t i = c * kRowChunk, end = std::min(N, i + kRowChunk); i < end; ++i) {
        const double zi = z[i], ti = t[i], yi = y[i];
        // softplus(u) = log(1 + e^u) = max(u, 0) + log1p(e^-|u|), u = (1 - 2y) z (|u| = |z|)
        const bool one = yi > 0.5;
        acc[0] += std::max(one ? -zi : zi, 0.0) + log1p_t[i];
        // p = sigmoid(z) and 1 - p from the same e^-|z|: p (1 - p) without cancellation
        const double p = zi >= 0 ? 1.0 / (1.0 + ti) : ti / (1.0 + ti);
        const double q = zi >= 0 ? ti / (1.0 + ti) : 1.0 / (1.0 + ti);
        const double e = one ? -q : p, si = p * q;
        scaled_row(X + i * d, e, si, d, acc + 1, acc + d + 2, xs + i * d);
        acc[1 + d] += e;
        acc[2 + 2 * d] += si;
      }
    }
  });
  sums.assign(static_cast<size_t>(width), 0.0);
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t k = 0; k < width; ++k) sums[k] += partial[c * width + k];
}

}  // namespace

System logistic_system(const at::Tensor& x, const at::Tensor& X, const at::Tensor& y, double l2,
                       bool fit_intercept) {
  const int64_t d = check_linear(x, X, fit_intercept);
  check_like(y, x, "y");
  const int64_t N = X.size(0), n = x.size(0);
  TORCH_CHECK(y.dim() == 1 && y.size(0) == N, "y must have ", N, " values, got ", y.sizes());
  const double inv_n = 1.0 / static_cast<double>(N);
  at::Tensor g = at::empty({n}, x.options());
  at::Tensor h = at::empty({n, n}, x.options());
  // a small float64 problem on the CPU: one row pass, the tiled product, the rest written in
  // place (larger ones, and float32, are GEMM-bound: the ATen calls below)
  if (X.is_cpu() && x.scalar_type() == at::kDouble && N * n * n <= tiled_work_limit()) {
    const at::Tensor Xc = X.contiguous(), yc = y.contiguous(), xc = x.contiguous();
    at::Tensor z = at::mv(Xc, xc.narrow(0, 0, d));
    if (fit_intercept) z.add_(xc[d]);
    const at::Tensor t = z.abs().neg_().exp_(), log1p_t = at::log1p(t);
    const at::Tensor xs = at::empty({N, d}, X.options());
    std::vector<double> sums;
    logistic_rows(Xc.data_ptr<double>(), yc.data_ptr<double>(), z.data_ptr<double>(),
                  t.data_ptr<double>(), log1p_t.data_ptr<double>(), N, d,
                  xs.data_ptr<double>(), sums);
    symmetric_product_into(h.narrow(0, 0, d).narrow(1, 0, d), Xc, xs, inv_n);
    const double* xp = xc.data_ptr<double>();
    double* gp = g.data_ptr<double>();
    double* hp = h.data_ptr<double>();
    const double* ge = sums.data() + 1;      // X^T e, then sum e
    const double* gs = sums.data() + d + 2;  // X^T s, then sum s
    double ww = 0;
    for (int64_t j = 0; j < d; ++j) {
      ww += xp[j] * xp[j];
      gp[j] = ge[j] * inv_n + l2 * xp[j];
      hp[j * n + j] += l2;
    }
    if (fit_intercept) {
      gp[d] = ge[d] * inv_n;
      for (int64_t j = 0; j < d; ++j) hp[d * n + j] = hp[j * n + d] = gs[j] * inv_n;
      hp[d * n + d] = gs[d] * inv_n;
    }
    const double penalty = l2 != 0.0 ? 0.5 * l2 * ww : 0.0;  // never 0 x inf (w of 1e200)
    return {at::scalar_tensor(sums[0] * inv_n + penalty, x.options()), g, h};
  }
  const at::Tensor w = x.narrow(0, 0, d);
  at::Tensor gw = g.narrow(0, 0, d);
  at::Tensor z = at::mv(X, w);
  if (fit_intercept) z.add_(x[d]);
  // softplus(u) = log(1 + e^u) exactly (as the objective's), never linearised, with
  // u = (1 - 2y) z: softplus(z) - y z without its cancellation where the label is certain
  const at::Tensor u = (1 - 2 * y) * z;
  const at::Tensor softplus = at::logaddexp(u, at::zeros({}, z.options()));
  at::Tensor loss = softplus.mean();
  add_l2(loss, w, l2);
  const at::Tensor p = at::sigmoid(z);
  const at::Tensor q = at::sigmoid(z.neg_());  // 1 - p without cancellation
  const at::Tensor e = at::where(y > 0.5, -q, p);  // p - y
  const at::Tensor s = p * q;
  at::mv_out(gw, X.t(), e).mul_(inv_n).add_(w, l2);
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
  const at::Tensor picked = Z.gather(1, lab);
  // the objective's form (objectives/losses.py), op for op: a row whose label's class is
  // the largest takes log1p(sum_{j != y} e^(z_j - z_y)), any other (z_m - z_y) +
  // log1p(sum_{j != m} e^(z_j - z_m)), m its largest class; logsumexp(z) - z_y cancels to
  // 0 where a class is near certain (and two forms a few ulps apart let a line search take
  // a rise the loss of the other path shows)
  const at::Tensor Dz = Z - picked;
  const at::Tensor leads = std::get<0>(Dz.max(1)).le(0);
  const at::Tensor own =
      at::log1p(at::exp(Dz.clamp_max(0)).scatter_(1, lab, 0.0).sum(1));  // (its rows only)
  const at::Tensor first = Z.argmax(1, true);
  const at::Tensor largest = Z.gather(1, first);
  const at::Tensor other = (largest - picked).squeeze(1) +
                           at::log1p(at::exp(Z - largest).scatter_(1, first, 0.0).sum(1));
  const at::Tensor rows = at::where(leads, own, other);
  at::Tensor loss = rows.mean();
  if (l2 != 0.0) loss.add_(at::sum(Wd * Wd), 0.5 * l2);  // as add_l2, summed as before
  const at::Tensor P = at::softmax(Z, 1);
  // E = P - onehot(y), its label's entry as -(sum of the other p_j): p_y - 1 cancels
  const at::Tensor rest = P.clone().scatter_(1, lab, 0.0).sum(1, true);
  const at::Tensor E = P.clone().scatter_(1, lab, rest.neg());
  at::Tensor g = at::empty({D, k}, x.options());
  at::Tensor gw = g.narrow(0, 0, d);
  at::mm_out(gw, X.t(), E).mul_(inv_n).add_(Wd, l2);
  if (fit_intercept) g.narrow(0, d, 1).copy_(E.mean(0, true));
  // H = (1/N) sum_i x_i x_i^T kron S_i, S_i = diag(p_i) - p_i p_i^T. As block diag(p) -
  // (x kron p)^T (x kron p) it cancels where a class is near certain (both terms ~ x x^T,
  // their difference ~ (1 - p_m) x x^T). With m the row's largest class and r = p - e_m (its
  // m entry -(sum of the other p_j)), S = diag(r) - r r^T - r e_m^T - e_m r^T: every term
  // is small there, and for other rows it is S's own size.
  const at::Tensor top = std::get<1>(P.max(1, true));
  const at::Tensor R = P.clone().scatter_(1, top, P.scatter(1, top, 0.0).sum(1, true).neg());
  // the rows grouped by their largest class m (H is a sum over rows, in any order): each
  // group's block of e_m r^T + r e_m^T is then one product of consecutive rows
  const at::Tensor classes = top.squeeze(1);
  const at::Tensor order = at::argsort(classes, /*stable=*/true);
  const at::Tensor Xo = X.index_select(0, order);
  const at::Tensor Xa = fit_intercept ? at::cat({Xo, at::ones({N, 1}, X.options())}, 1) : Xo;
  const at::Tensor Ro = R.index_select(0, order);
  // M[i, a k + c] = Xa[i, a] R[i, c]: the per-sample outer products, flattened
  const at::Tensor M = (Xa.unsqueeze(2) * Ro.unsqueeze(1)).reshape({N, n});
  at::Tensor h = symmetric_product(M, M, -inv_n);
  // per class m, B_m = Xa_m^T M_m over its rows (N D n multiply-adds in all, 1 / k of
  // M^T M's): the diag(r) blocks are their sum, and -B_m (with its transpose) is
  // e_m r^T + r e_m^T in class m's rows and columns of H, taken in place (no second n x n)
  const at::Tensor counts = at::bincount(classes, {}, k).cpu();
  const int64_t* count = counts.data_ptr<int64_t>();
  at::Tensor by_row = h.view({D, k, n}), by_column = h.view({n, D, k});
  at::Tensor diag_blocks = at::zeros({D, n}, x.options());
  for (int64_t c = 0, start = 0; c < k; start += count[c], ++c) {
    if (count[c] == 0) continue;
    const at::Tensor block =
        at::mm(Xa.narrow(0, start, count[c]).t(), M.narrow(0, start, count[c])).mul_(inv_n);
    diag_blocks.add_(block);
    by_row.select(1, c).sub_(block);
    by_column.select(2, c).sub_(block.t());
  }
  h.view({D, k, D, k}).diagonal(0, 1, 3).add_(diag_blocks.view({D, D, k}));
  make_symmetric(h);  // the terms above round differently on either side of the diagonal
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
