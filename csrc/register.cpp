// Op registration: torch.ops.hessian.* (schemas, CPU and CUDA kernels). The fake (meta)
// kernels are registered from Python, in hessian_service.engine.native_ops.
#include <Python.h>
#include <torch/library.h>

#include "hessian.h"
#ifdef WITH_CUDA
#include "cuda/cuda_ops.h"
#endif

namespace hessian {
PyMethodDef* python_methods();  // python_bindings.cpp
}

extern "C" {
// `import hessian_service._C` loads this library (and so runs the registrations below);
// the module itself holds only the direct fused-step entry points.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "hessian_service native kernels", -1,
      hessian::python_methods()};
  return PyModule_Create(&module_def);
}
}

namespace hessian {

TORCH_LIBRARY(hessian, m) {
  m.def("damped_cholesky(Tensor H, Tensor g, float damping, int max_attempts)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("saddle_free(Tensor H, Tensor g, float eigenvalue_floor) -> (Tensor, Tensor)");
  m.def("mse_system(Tensor x, Tensor target) -> (Tensor, Tensor, Tensor)");
  m.def("quadratic_system(Tensor x, Tensor A, Tensor b) -> (Tensor, Tensor, Tensor)");
  m.def("least_squares_system(Tensor x, Tensor X, Tensor y, float l2, bool fit_intercept)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("logistic_regression_system(Tensor x, Tensor X, Tensor y, float l2,"
        " bool fit_intercept) -> (Tensor, Tensor, Tensor)");
  m.def("softmax_regression_system(Tensor x, Tensor X, Tensor labels, int num_classes,"
        " float l2, bool fit_intercept) -> (Tensor, Tensor, Tensor)");
  m.def("gauss_newton(Tensor J, Tensor? weights=None) -> Tensor");
  m.def("mse_newton_step(Tensor x, Tensor target, float lr, float damping, int max_attempts)"
        " -> (Tensor, Tensor)");
  m.def("quadratic_newton_step(Tensor x, Tensor A, Tensor b, float lr, float damping,"
        " int max_attempts) -> (Tensor, Tensor)");
  m.def("least_squares_newton_step(Tensor x, Tensor X, Tensor y, float l2,"
        " bool fit_intercept, float lr, float damping, int max_attempts) -> (Tensor, Tensor)");
  m.def("logistic_regression_newton_step(Tensor x, Tensor X, Tensor y, float l2,"
        " bool fit_intercept, float lr, float damping, int max_attempts) -> (Tensor, Tensor)");
  m.def("softmax_regression_newton_step(Tensor x, Tensor X, Tensor labels, int num_classes,"
        " float l2, bool fit_intercept, float lr, float damping, int max_attempts)"
        " -> (Tensor, Tensor)");
}

// The kernels are written with ATen calls (plus CPU-only loops behind is_cpu()), so the
// same functions serve CPU and CUDA tensors; a CUDA build (WITH_CUDA) swaps in its own
// kernels for the three ops below HESSIAN_ATEN_IMPLS, one implementation per dispatch key.
#define HESSIAN_ATEN_IMPLS(m)                                             \
  m.impl("saddle_free", &saddle_free);                                   \
  m.impl("mse_system", &mse_system);                                     \
  m.impl("quadratic_system", &quadratic_system);                         \
  m.impl("least_squares_system", &least_squares_system);                 \
  m.impl("logistic_regression_system", &logistic_system);                \
  m.impl("softmax_regression_system", &softmax_system);                  \
  m.impl("gauss_newton", &gauss_newton);                                 \
  m.impl("least_squares_newton_step", &least_squares_newton_step);       \
  m.impl("logistic_regression_newton_step", &logistic_newton_step);      \
  m.impl("softmax_regression_newton_step", &softmax_newton_step);

#define HESSIAN_IMPLS(m)                                                  \
  HESSIAN_ATEN_IMPLS(m)                                                   \
  m.impl("damped_cholesky", &damped_cholesky);                           \
  m.impl("mse_newton_step", &mse_newton_step);                           \
  m.impl("quadratic_newton_step", &quadratic_newton_step);

TORCH_LIBRARY_IMPL(hessian, CPU, m) { HESSIAN_IMPLS(m) }

#ifdef WITH_CUDA
// csrc/cuda/: small systems on the GPU's own kernels, the rest handed to the ATen path.
TORCH_LIBRARY_IMPL(hessian, CUDA, m) {
  HESSIAN_ATEN_IMPLS(m)
  m.impl("damped_cholesky", &cuda::damped_cholesky);
  m.impl("mse_newton_step", &cuda::mse_newton_step);
  m.impl("quadratic_newton_step", &cuda::quadratic_newton_step);
}
#else
TORCH_LIBRARY_IMPL(hessian, CUDA, m) { HESSIAN_IMPLS(m) }
#endif

}  // namespace hessian
