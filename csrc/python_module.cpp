// The Python module `keeplora_kernels._C`: importing it loads this library, whose static initialisers register
// the torch.ops.keeplora.* ops. It also tells Python which ops exist (dir(torch.ops.keeplora) does not list
// ops reliably) and whether CUDA kernels were compiled. Not part of the CMake library (no Python there).
#include <Python.h>

#include <exception>

#include "ops.h"

namespace {

PyObject* registered_ops(PyObject*, PyObject*) {
  const auto& names = keeplora::op_names();
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(names.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < names.size(); ++i) {
    PyObject* name = PyUnicode_FromString(names[i].c_str());
    if (name == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), name);
  }
  return list;
}

PyObject* built_with_cuda(PyObject*, PyObject*) {
#ifdef KEEPLORA_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyObject* small_svd_method(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(keeplora::small_svd_method().c_str());
  } catch (const std::exception& e) {  // a bad KEEPLORA_SMALL_SVD
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

PyObject* set_small_svd_method(PyObject*, PyObject* args) {
  const char* method = nullptr;
  if (!PyArg_ParseTuple(args, "s", &method)) return nullptr;
  try {
    keeplora::set_small_svd_method(method);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"small_svd_method", small_svd_method, METH_NOARGS,
     "rsvd's small-SVD launcher on CUDA for l <= 32: 'jacobi' or 'cusolver' (KEEPLORA_SMALL_SVD, read once)."},
    {"set_small_svd_method", set_small_svd_method, METH_VARARGS,
     "Set rsvd's small-SVD launcher on CUDA for l <= 32: 'jacobi' or 'cusolver'."},
    {"registered_ops", registered_ops, METH_NOARGS, "Names of the torch.ops.keeplora ops this library defines."},
    {"built_with_cuda", built_with_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "keeplora C++/CUDA ops (registered in torch.ops.keeplora)",
                          -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
