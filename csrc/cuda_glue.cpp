// ATen glue of the CUDA kernels (csrc/cuda/*.cu) and the CUDA registrations of every op. Compiled to nothing
// unless the library is built with CUDA (setup.py defines KEEPLORA_WITH_CUDA for CUDAExtension builds).
// Only c10/cuda headers are used here (stream and device guard), not ATen/cuda, which would pull in cuBLAS.
#ifdef KEEPLORA_WITH_CUDA

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/launchers.h"
#include "ops.h"

namespace keeplora {
namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "keeplora::", what, ": CUDA error: ", cudaGetErrorString(err));
}

at::Tensor gaussian_sketch_cuda(const at::Tensor& like, int64_t seed, int64_t rows, int64_t cols) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "keeplora::gaussian_sketch: rows and cols must be >= 0, got ", rows, ", ",
              cols);
  const c10::cuda::CUDAGuard guard(like.device());
  const auto dtype = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({rows, cols}, like.options().dtype(dtype));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(like.device().index()).stream();
  const uint64_t useed = static_cast<uint64_t>(seed);
  if (dtype == at::kDouble) {
    check_launch(cuda::launch_gaussian_sketch_f64(out.data_ptr<double>(), rows, cols, cols, useed, stream),
                 "gaussian_sketch");
  } else {
    check_launch(cuda::launch_gaussian_sketch_f32(out.data_ptr<float>(), rows, cols, cols, useed, stream),
                 "gaussian_sketch");
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobi_svd_cuda(const at::Tensor& a) {
  check_jacobi_input(a);
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t batch = a.size(0);
  const int l = static_cast<int>(a.size(1));
  const at::Tensor a_cm = a.mT().contiguous();  // column-major per matrix
  at::Tensor u_cm = at::empty_like(a_cm);
  at::Tensor v_cm = at::empty_like(a_cm);
  at::Tensor sigma = at::empty({batch, l}, a.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.device().index()).stream();
  if (a.scalar_type() == at::kDouble) {
    at::Tensor work;
    if (cuda::jacobi_svd_needs_workspace_f64(l)) work = at::empty({2 * batch * l * l}, a.options());
    check_launch(cuda::launch_jacobi_svd_f64(a_cm.data_ptr<double>(), u_cm.data_ptr<double>(),
                                             sigma.data_ptr<double>(), v_cm.data_ptr<double>(),
                                             work.defined() ? work.data_ptr<double>() : nullptr, batch, l, stream),
                 "jacobi_svd");
  } else {
    at::Tensor work;
    if (cuda::jacobi_svd_needs_workspace_f32(l)) work = at::empty({2 * batch * l * l}, a.options());
    check_launch(cuda::launch_jacobi_svd_f32(a_cm.data_ptr<float>(), u_cm.data_ptr<float>(),
                                             sigma.data_ptr<float>(), v_cm.data_ptr<float>(),
                                             work.defined() ? work.data_ptr<float>() : nullptr, batch, l, stream),
                 "jacobi_svd");
  }
  return {u_cm.mT(), sigma, v_cm.mT()};
}

}  // namespace
}  // namespace keeplora

TORCH_LIBRARY_IMPL(keeplora, CUDA, m) {
  m.impl("gaussian_sketch", &keeplora::gaussian_sketch_cuda);
  m.impl("jacobi_svd", &keeplora::jacobi_svd_cuda);
  m.impl("cholesky_qr", &keeplora::cholesky_qr);
  m.impl("rsvd", &keeplora::rsvd);
  m.impl("principal_subspace", &keeplora::principal_subspace);
}

#endif  // KEEPLORA_WITH_CUDA
