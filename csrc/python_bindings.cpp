// The Python module hessian_service._C: its direct entry points for the fused steps, built
// from kFusedSteps (fused_steps.h) by one template. They are METH_FASTCALL functions that skip
// the dispatcher's boxing and return the stats as Python floats, so the engine's seed-sized
// Newton step costs one C call (about a fifth of the op's time); the same kernels are also the
// torch.ops.hessian.*_newton_step ops. Importing the module loads the library, and so runs
// every TORCH_LIBRARY registration of csrc/.
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>

#include "fused_steps.h"

namespace hessian {
namespace {

// The name of argument `index` in a schema's argument list ("Tensor x, float lr, ...").
std::string arg_name(std::string_view args, size_t index) {
  for (; index > 0; --index) args.remove_prefix(args.find(',') + 1);
  args = args.substr(0, args.find(','));
  return std::string(args.substr(args.rfind(' ') + 1));
}

// Converts a Python argument to the kernel's parameter type T; a wrong type raises TypeError
// naming the argument (looked up only then).
template <typename T>
struct Arg;

template <>
struct Arg<at::Tensor> {
  static const at::Tensor& get(PyObject* o, const char* args, size_t i) {
    TORCH_CHECK_TYPE(THPVariable_Check(o), arg_name(args, i), " must be a Tensor");
    return THPVariable_Unpack(o);
  }
};

template <>
struct Arg<double> {
  static double get(PyObject* o, const char* args, size_t i) {
    const double v = PyFloat_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      TORCH_CHECK_TYPE(false, arg_name(args, i), " must be a real number");
    }
    return v;
  }
};

template <>
struct Arg<int64_t> {
  static int64_t get(PyObject* o, const char* args, size_t i) {
    const long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      TORCH_CHECK_TYPE(false, arg_name(args, i), " must be an integer");
    }
    return v;
  }
};

template <>
struct Arg<bool> {
  static bool get(PyObject* o, const char* args, size_t i) {
    TORCH_CHECK_TYPE(PyBool_Check(o), arg_name(args, i), " must be a bool");
    return o == Py_True;
  }
};

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

void check_nargs(Py_ssize_t got, Py_ssize_t want, const char* fn) {
  TORCH_CHECK_TYPE(got == want, fn, " takes ", want, " arguments, got ", got);
}

// (x_new, (loss, grad_norm, grad_max, step_norm, damping, attempts, finite, slope))
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

// The direct entry of a fused step: its arguments converted in order to the kernel's
// parameter types, the kernel run without the GIL (unless x is small), the result packed.
template <typename Def, typename Kernel = decltype(Def::kernel)>
struct Direct;

template <typename Def, typename... Params>
struct Direct<Def, FusedStep (*const)(Params...)> {
  template <size_t... I>
  static FusedStep run(const Def& def, PyObject* const* a, std::index_sequence<I...>) {
    // braced initialisation converts the arguments left to right
    const std::tuple<Params...> args{
        Arg<std::remove_cvref_t<Params>>::get(a[I], def.args, I)...};
    ReleaseGil nogil(std::get<0>(args).numel() > def.keep_gil_numel);
    return std::apply(Def::kernel, args);
  }

  template <size_t Index>
  static PyObject* call(PyObject*, PyObject* const* a, Py_ssize_t n) {
    HANDLE_TH_ERRORS
    const Def& def = std::get<Index>(kFusedSteps);
    check_nargs(n, sizeof...(Params), def.name);
    return pack(run(def, a, std::index_sequence_for<Params...>{}));
    END_HANDLE_TH_ERRORS
  }
};

template <size_t Index>
PyObject* direct(PyObject* self, PyObject* const* a, Py_ssize_t n) {
  using Def = std::remove_cvref_t<decltype(std::get<Index>(kFusedSteps))>;
  return Direct<Def>::template call<Index>(self, a, n);
}

// "name(args) -> (x_new, stats)", kept for the module's lifetime.
template <size_t Index>
const char* doc() {
  const auto& def = std::get<Index>(kFusedSteps);
  static const std::string text = std::string(def.name) + "(" + def.args +
                                  ") -> (x_new, (loss, grad_norm, grad_max, step_norm, damping,"
                                  " attempts, finite, slope)): the fused Newton step, called"
                                  " directly.";
  return text.c_str();
}

#define FASTCALL(f) reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(f)), METH_FASTCALL

template <size_t... Index>
std::array<PyMethodDef, sizeof...(Index) + 1> make_methods(std::index_sequence<Index...>) {
  return {{{std::get<Index>(kFusedSteps).name, FASTCALL(&direct<Index>), doc<Index>()}...,
           {nullptr, nullptr, 0, nullptr}}};
}

}  // namespace
}  // namespace hessian

extern "C" {
// `import hessian_service._C` loads this library (and so runs csrc/'s op registrations); the
// module itself holds only the direct fused-step entries.
PyMODINIT_FUNC PyInit__C(void) {
  static auto methods = hessian::make_methods(
      std::make_index_sequence<std::tuple_size_v<decltype(hessian::kFusedSteps)>>{});
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "hessian_service native kernels", -1, methods.data()};
  return PyModule_Create(&module_def);
}
}
