// Direct Python entry points for the fused steps: METH_FASTCALL functions that skip the
// dispatcher's boxing and return the stats as Python floats, so the engine's seed-sized
// Newton step costs one C call. The same kernels are also the torch.ops.hessian.* ops.
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include "hessian.h"

namespace hessian {
namespace {

const at::Tensor& tensor_arg(PyObject* o, const char* name) {
  TORCH_CHECK_TYPE(THPVariable_Check(o), name, " must be a Tensor");
  return THPVariable_Unpack(o);
}

double float_arg(PyObject* o, const char* name) {
  const double v = PyFloat_AsDouble(o);
  if (v == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    TORCH_CHECK_TYPE(false, name, " must be a real number");
  }
  return v;
}

int64_t int_arg(PyObject* o, const char* name) {
  const long long v = PyLong_AsLongLong(o);
  if (v == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    TORCH_CHECK_TYPE(false, name, " must be an integer");
  }
  return v;
}

bool bool_arg(PyObject* o, const char* name) {
  TORCH_CHECK_TYPE(PyBool_Check(o), name, " must be a bool");
  return o == Py_True;
}

// Releases the GIL for the kernel (other server threads run meanwhile); reacquired on any
// exit, exceptions included, before the error is turned into a Python exception.
class ReleaseGil {
 public:
  explicit ReleaseGil(bool release) : state_(release ? PyEval_SaveThread() : nullptr) {}
  ~ReleaseGil() {
    if (state_ != nullptr) PyEval_RestoreThread(state_);
  }
  ReleaseGil(const ReleaseGil&) = delete;
  ReleaseGil& operator=(const ReleaseGil&) = delete;

 private:
  PyThreadState* state_;
};

// Below this many parameters the mse step takes less time than releasing the GIL.
constexpr int64_t kMseKeepGil = 4096;

void check_nargs(Py_ssize_t got, Py_ssize_t want, const char* fn) {
  TORCH_CHECK_TYPE(got == want, fn, " takes ", want, " arguments, got ", got);
}

// (x_new, (loss, grad_norm, grad_max, step_norm, damping, attempts, finite))
PyObject* pack(FusedStep&& step) {
  PyObject* stats = PyTuple_New(kFusedStats);
  if (stats == nullptr) return nullptr;
  for (int64_t i = 0; i < kFusedStats; ++i)
    PyTuple_SET_ITEM(stats, i, PyFloat_FromDouble(step.stats[i]));
  PyObject* x = THPVariable_Wrap(std::move(step.x_new));
  if (x == nullptr) {
    Py_DECREF(stats);
    return nullptr;
  }
  PyObject* out = PyTuple_New(2);
  PyTuple_SET_ITEM(out, 0, x);
  PyTuple_SET_ITEM(out, 1, stats);
  return out;
}

PyObject* py_mse(PyObject*, PyObject* const* a, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  check_nargs(n, 5, "mse_newton_step");
  const at::Tensor& x = tensor_arg(a[0], "x");
  const at::Tensor& target = tensor_arg(a[1], "target");
  const double lr = float_arg(a[2], "lr"), damping = float_arg(a[3], "damping");
  const int64_t attempts = int_arg(a[4], "max_attempts");
  FusedStep step;
  {
    ReleaseGil nogil(x.numel() > kMseKeepGil);
    step = mse_fused(x, target, lr, damping, attempts);
  }
  return pack(std::move(step));
  END_HANDLE_TH_ERRORS
}

PyObject* py_quadratic(PyObject*, PyObject* const* a, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  check_nargs(n, 6, "quadratic_newton_step");
  const at::Tensor &x = tensor_arg(a[0], "x"), &A = tensor_arg(a[1], "A");
  const at::Tensor& b = tensor_arg(a[2], "b");
  const double lr = float_arg(a[3], "lr"), damping = float_arg(a[4], "damping");
  const int64_t attempts = int_arg(a[5], "max_attempts");
  FusedStep step;
  {
    ReleaseGil nogil(true);
    step = quadratic_fused(x, A, b, lr, damping, attempts);
  }
  return pack(std::move(step));
  END_HANDLE_TH_ERRORS
}

using LinearFused = FusedStep (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                  bool, double, double, int64_t);

// least_squares and logistic_regression take the same arguments: (x, X, y, l2, fit_intercept,
// lr, damping, max_attempts).
template <LinearFused fused>
PyObject* py_linear_model(const char* name, PyObject* const* a, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  check_nargs(n, 8, name);
  const at::Tensor &x = tensor_arg(a[0], "x"), &X = tensor_arg(a[1], "X");
  const at::Tensor& y = tensor_arg(a[2], "y");
  const double l2 = float_arg(a[3], "l2");
  const bool fit = bool_arg(a[4], "fit_intercept");
  const double lr = float_arg(a[5], "lr"), damping = float_arg(a[6], "damping");
  const int64_t attempts = int_arg(a[7], "max_attempts");
  FusedStep step;
  {
    ReleaseGil nogil(true);
    step = fused(x, X, y, l2, fit, lr, damping, attempts);
  }
  return pack(std::move(step));
  END_HANDLE_TH_ERRORS
}

PyObject* py_least_squares(PyObject*, PyObject* const* a, Py_ssize_t n) {
  return py_linear_model<least_squares_fused>("least_squares_newton_step", a, n);
}

PyObject* py_logistic(PyObject*, PyObject* const* a, Py_ssize_t n) {
  return py_linear_model<logistic_fused>("logistic_regression_newton_step", a, n);
}

PyObject* py_softmax(PyObject*, PyObject* const* a, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  check_nargs(n, 9, "softmax_regression_newton_step");
  const at::Tensor &x = tensor_arg(a[0], "x"), &X = tensor_arg(a[1], "X");
  const at::Tensor& labels = tensor_arg(a[2], "labels");
  const int64_t k = int_arg(a[3], "num_classes");
  const double l2 = float_arg(a[4], "l2");
  const bool fit = bool_arg(a[5], "fit_intercept");
  const double lr = float_arg(a[6], "lr"), damping = float_arg(a[7], "damping");
  const int64_t attempts = int_arg(a[8], "max_attempts");
  FusedStep step;
  {
    ReleaseGil nogil(true);
    step = softmax_fused(x, X, labels, k, l2, fit, lr, damping, attempts);
  }
  return pack(std::move(step));
  END_HANDLE_TH_ERRORS
}

#define FASTCALL(f) reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(f)), METH_FASTCALL

PyMethodDef methods[] = {
    {"mse_newton_step", FASTCALL(py_mse), "Fused mse Newton step (x, target, lr, damping, "
                                          "max_attempts) -> (x_new, stats)."},
    {"quadratic_newton_step", FASTCALL(py_quadratic), "Fused quadratic Newton step."},
    {"least_squares_newton_step", FASTCALL(py_least_squares), "Fused least-squares step."},
    {"logistic_regression_newton_step", FASTCALL(py_logistic), "Fused logistic step."},
    {"softmax_regression_newton_step", FASTCALL(py_softmax), "Fused softmax step."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* python_methods() { return methods; }

}  // namespace hessian
