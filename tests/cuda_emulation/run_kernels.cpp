// Runs csrc/cuda/step_kernels.cuh's kernels on the CPU (cuda_emulation.h) for the cases read
// from stdin, launched with the host wrappers' shapes (small_solve.cu, fused_steps.cu), and
// prints their raw outputs; tests/test_cuda_emulation.py writes the cases and checks them.
//
// Input, whitespace-separated, one case after another (dtype f = float32, d = float64):
//   solve DTYPE n damping max_attempts  H (n*n, row-major)  g (n)
//   quadratic DTYPE n lr damping max_attempts  A (n*n)  b (n)  x (n)
//   mse DTYPE n lr damping blocks  x (n)  t (n)
// Output, one line per case: "solve attempts damping d...", "quadratic stats(7) x_new...",
// "mse sums(5) x_new..." (the mse host wrapper turns the sums into stats).
#include "cuda_emulation.h"  // first: it stands in for the CUDA runtime

#include <cstdio>
#include <iostream>
#include <string>

#include "step_kernels.cuh"

namespace {

std::vector<double> read(int64_t count) {
  std::vector<double> v(static_cast<size_t>(count));
  for (auto& x : v) {
    std::string token;
    std::cin >> token;
    x = std::strtod(token.c_str(), nullptr);  // accepts nan and inf
  }
  return v;
}

template <typename T>
std::vector<T> cast(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

void print(const char* kind, const std::vector<double>& head, const std::vector<double>& tail) {
  std::printf("%s", kind);
  for (double v : head) std::printf(" %.17g", v);
  for (double v : tail) std::printf(" %.17g", v);
  std::printf("\n");
}

template <typename T>
void solve(int n, double damping, int64_t max_attempts) {
  const auto h = cast<T>(read(int64_t{n} * n));
  const auto g = cast<T>(read(n));
  std::vector<T> d(static_cast<size_t>(n), T(-7));
  double lam = -1;
  int64_t attempts = -1;
  const size_t bytes = hessian::cuda::shared_doubles(n, 2) * sizeof(double);
  emulation::launch(1, hessian::cuda::warps_for(n), bytes, hessian::cuda::damped_cholesky_kernel<T>,
                    h.data(), g.data(), n, damping, max_attempts, hessian::cuda::sqrt_eps<T>(),
                    d.data(), &lam, &attempts);
  print("solve", {static_cast<double>(attempts), lam}, std::vector<double>(d.begin(), d.end()));
}

template <typename T>
void quadratic(int n, double lr, double damping, int64_t max_attempts) {
  const auto a = cast<T>(read(int64_t{n} * n));
  const auto b = cast<T>(read(n));
  const auto x = cast<T>(read(n));
  std::vector<T> out(static_cast<size_t>(n), T(-7));
  std::vector<double> stats(7, -7.0);
  const size_t bytes = hessian::cuda::shared_doubles(n, 3) * sizeof(double);
  emulation::launch(1, hessian::cuda::warps_for(n), bytes,
                    hessian::cuda::quadratic_step_kernel<T>, x.data(), a.data(), b.data(), n, lr,
                    damping, max_attempts, hessian::cuda::sqrt_eps<T>(), out.data(),
                    stats.data());
  print("quadratic", stats, std::vector<double>(out.begin(), out.end()));
}

template <typename T>
void mse(int64_t n, double lr, double damping, unsigned blocks) {
  const auto x = cast<T>(read(n));
  const auto t = cast<T>(read(n));
  std::vector<T> out(static_cast<size_t>(n), T(-7));
  // as the host wrapper: one block writes its sums, several add into zeros
  std::vector<double> sums(hessian::cuda::kMseSums, blocks == 1 ? -7.0 : 0.0);
  const double two_over_n = 2.0 / static_cast<double>(n);
  emulation::launch(blocks, hessian::cuda::kMseWarps, 0, hessian::cuda::mse_step_kernel<T>,
                    x.data(), t.data(), n, two_over_n, 1.0 / (two_over_n + damping),
                    static_cast<T>(lr), out.data(), sums.data());
  print("mse", sums, std::vector<double>(out.begin(), out.end()));
}

}  // namespace

int main() {
  std::string kind, dtype;
  while (std::cin >> kind >> dtype) {
    const bool f64 = dtype == "d";
    if (kind == "solve") {
      int n;
      double damping;
      int64_t attempts;
      std::cin >> n >> damping >> attempts;
      f64 ? solve<double>(n, damping, attempts) : solve<float>(n, damping, attempts);
    } else if (kind == "quadratic") {
      int n;
      double lr, damping;
      int64_t attempts;
      std::cin >> n >> lr >> damping >> attempts;
      f64 ? quadratic<double>(n, lr, damping, attempts)
          : quadratic<float>(n, lr, damping, attempts);
    } else if (kind == "mse") {
      int64_t n;
      double lr, damping;
      unsigned blocks;
      std::cin >> n >> lr >> damping >> blocks;
      f64 ? mse<double>(n, lr, damping, blocks) : mse<float>(n, lr, damping, blocks);
    } else {
      std::fprintf(stderr, "unknown case kind %s\n", kind.c_str());
      return 2;
    }
    std::fflush(stdout);
  }
  return 0;
}
