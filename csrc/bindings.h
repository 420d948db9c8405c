// What the extension module's source files share: the functions each adds to the
// Python module (csrc/module.cpp builds it from them), unpacking a Python object
// into a tensor without pybind's casters (host time on the eager paths), and the
// scale rule both fast paths check.
#pragma once

#include <cmath>

#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

namespace splitkv_binding {

// The merges' eager fast paths (csrc/merge_ops.cu; the merge ops themselves are
// registered with the dispatcher there).
void add_merge_functions(pybind11::module_& m);
// attention_inputs_ok (csrc/attention_checks.cpp).
void add_attention_checks(pybind11::module_& m);
// TritonLaunchCache (csrc/triton_launch.cpp).
void add_triton_launch(pybind11::module_& m);

// False when obj is not a plain tensor (or a Parameter), or when a torch dispatch mode
// is active (FakeTensorMode, make_fx): a subclass or a mode must see the call go
// through the dispatcher, as the Python path does, not a kernel launched on its data
// (a fake tensor has none).
inline bool unpack_tensor(pybind11::handle obj, at::Tensor& out) {
  if (!THPVariable_CheckExact(obj.ptr()) || c10::impl::dispatch_mode_enabled()) return false;
  out = THPVariable_Unpack(obj.ptr());
  return out.layout() == at::kStrided;  // a sparse tensor has no storage to compare
}

// Whether obj is a Python float or int (exactly: NumPy scalars and bools excluded),
// finite and positive, into value: the rule of softmax_scale and of the fp8
// output_scale. False sends the call to Python, which checks and names the argument.
inline bool finite_positive_scale(pybind11::handle obj, double& value) {
  PyObject* scale = obj.ptr();
  if (!PyFloat_CheckExact(scale) && !PyLong_CheckExact(scale)) return false;
  value = PyFloat_AsDouble(scale);
  if (PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  return std::isfinite(value) && value > 0;
}

}  // namespace splitkv_binding
