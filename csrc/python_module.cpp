// The Python module `keeplora_kernels._C` (pybind11): importing it loads this library, whose static initialisers
// register the torch.ops.keeplora.* ops. It also tells Python which ops exist (dir(torch.ops.keeplora) does not
// list ops reliably) and whether CUDA kernels were compiled. Not part of the CMake library (no Python there).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <exception>
#include <string>
#include <vector>

#include "ops.h"

namespace py = pybind11;

namespace {

bool built_with_cuda() {
#ifdef KEEPLORA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// A bad method name (from the argument or KEEPLORA_SMALL_SVD) is a ValueError in Python, not a RuntimeError.
template <typename Fn>
auto as_value_error(Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const std::exception& e) {
    throw py::value_error(e.what());
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "keeplora C++/CUDA ops (registered in torch.ops.keeplora)";
  m.def(
      "small_svd_method", [] { return as_value_error([] { return keeplora::small_svd_method(); }); },
      "rsvd's small-SVD launcher on CUDA for l <= 32: 'jacobi' or 'cusolver' (KEEPLORA_SMALL_SVD, read once).");
  m.def(
      "set_small_svd_method",
      [](const std::string& method) { as_value_error([&] { keeplora::set_small_svd_method(method); }); },
      py::arg("method"), "Set rsvd's small-SVD launcher on CUDA for l <= 32: 'jacobi' or 'cusolver'.");
  m.def(
      "registered_ops", [] { return std::vector<std::string>(keeplora::op_names()); },
      "Names of the torch.ops.keeplora ops this library defines.");
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels were compiled in.");
}
