// ATen glue of the CUDA kernels (csrc/cuda/*.cu) and the CUDA registrations of every op. Compiled to nothing
// unless the library is built with CUDA (setup.py defines KEEPLORA_WITH_CUDA for CUDAExtension builds).
// Only c10/cuda headers are used here (stream and device guard), not ATen/cuda, which would pull in cuBLAS.
#ifdef KEEPLORA_WITH_CUDA

#include <algorithm>

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

void check_solver(const char* error, const char* what) {
  TORCH_CHECK(error == nullptr, "keeplora::", what, ": ", error);
}

}  // namespace

// cuSOLVER's gesvdjBatched on the same column-major copies as jacobi_svd. Its per-matrix info (sweeps not
// converged) stays on the device: reading it would synchronise, and gesvdj's result after the sweep limit is still
// its best iterate.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gesvdj_batched_cuda(const at::Tensor& a) {
  check_jacobi_input(a);
  TORCH_CHECK(a.is_cuda(), "keeplora::gesvdj_batched runs on CUDA tensors only, got ", a.device());
  TORCH_CHECK(a.size(1) >= 1 && a.size(1) <= kGesvdjMaxSize && a.size(0) >= 1,
              "keeplora::gesvdj_batched needs (b, l, l) with b >= 1 and 1 <= l <= ", kGesvdjMaxSize, ", got ",
              a.sizes());
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t batch = a.size(0);
  const int l = static_cast<int>(a.size(1));
  at::Tensor a_cm = a.mT().contiguous();  // column-major per matrix; cuSOLVER overwrites it
  at::Tensor u_cm = at::empty_like(a_cm);
  at::Tensor v_cm = at::empty_like(a_cm);
  at::Tensor sigma = at::empty({batch, l}, a.options());
  at::Tensor info = at::empty({batch}, a.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.device().index()).stream();
  int lwork = 0;
  if (a.scalar_type() == at::kDouble) {
    check_solver(cuda::gesvdj_batched_workspace_f64(l, batch, &lwork), "gesvdj_batched");
    at::Tensor work = at::empty({std::max(lwork, 1)}, a.options());
    check_solver(cuda::launch_gesvdj_batched_f64(a_cm.data_ptr<double>(), sigma.data_ptr<double>(),
                                                 u_cm.data_ptr<double>(), v_cm.data_ptr<double>(),
                                                 work.data_ptr<double>(), lwork, info.data_ptr<int>(), batch, l,
                                                 stream),
                 "gesvdj_batched");
  } else {
    check_solver(cuda::gesvdj_batched_workspace_f32(l, batch, &lwork), "gesvdj_batched");
    at::Tensor work = at::empty({std::max(lwork, 1)}, a.options());
    check_solver(cuda::launch_gesvdj_batched_f32(a_cm.data_ptr<float>(), sigma.data_ptr<float>(),
                                                 u_cm.data_ptr<float>(), v_cm.data_ptr<float>(),
                                                 work.data_ptr<float>(), lwork, info.data_ptr<int>(), batch, l,
                                                 stream),
                 "gesvdj_batched");
  }
  return {u_cm.mT(), sigma, v_cm.mT()};
}

namespace {

at::Tensor split_operand_cuda(const at::Tensor& x, at::ScalarType dtype, double scale) {
  check_split_operand_input(x, dtype);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({x.size(0), x.size(1), 2 * x.size(2)}, x.options().dtype(dtype));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  check_launch(cuda::launch_split_operand(xc.data_ptr(), xc.scalar_type() == at::kDouble, out.data_ptr(),
                                          dtype == at::kBFloat16, x.size(0) * x.size(1), x.size(2),
                                          static_cast<float>(scale), stream),
               "split_operand");
  return out;
}

static_assert(cuda::kMaxSplitBasisWidth == kMaxSplitBasisWidth, "one width limit for the split basis ops");

at::Tensor gram_of_sum_cuda(const at::Tensor& y, int64_t parts, double lo_scale) {
  check_split_basis_input(y, parts, nullptr);
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor yc = y.contiguous();
  const int64_t batch = y.size(0), rows = y.size(1), w = y.size(2) / parts;
  const int64_t chunks = cuda::gram_of_sum_chunks(batch, rows);
  at::Tensor partial = at::empty({batch, chunks, w, w}, y.options().dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(y.device().index()).stream();
  check_launch(cuda::launch_gram_of_sum(yc.data_ptr<float>(), partial.data_ptr<double>(), batch, rows,
                                        static_cast<int>(w), static_cast<int>(parts), static_cast<float>(lo_scale),
                                        chunks, stream),
               "gram_of_sum");
  return chunks == 1 ? partial.squeeze(1) : partial.sum(1);
}

at::Tensor split_product_cuda(const at::Tensor& y, int64_t parts, double lo_scale, const at::Tensor& r_inv,
                              at::ScalarType dtype, double scale) {
  check_split_basis_input(y, parts, &r_inv, dtype);
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor yc = y.contiguous();
  const at::Tensor rc = r_inv.contiguous();
  const int64_t batch = y.size(0), rows = y.size(1), w = y.size(2) / parts;
  at::Tensor out = at::empty({batch, rows, 2 * w}, y.options().dtype(dtype));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(y.device().index()).stream();
  check_launch(cuda::launch_split_product(yc.data_ptr<float>(), rc.data_ptr<double>(), out.data_ptr(),
                                          dtype == at::kBFloat16, batch, rows, static_cast<int>(w),
                                          static_cast<int>(parts), static_cast<float>(lo_scale),
                                          static_cast<float>(scale), stream),
               "split_product");
  return out;
}

std::tuple<at::Tensor, at::Tensor> shifted_cholesky_cuda(const at::Tensor& gram, double shift_factor,
                                                         bool check_rank, const at::Tensor& info) {
  check_shifted_cholesky_input(gram, info);
  const c10::cuda::CUDAGuard guard(gram.device());
  const at::Tensor g = gram.contiguous();
  at::Tensor r = at::empty_like(g);
  at::Tensor x = at::empty_like(g);
  const int64_t batch = g.size(0);
  const int l = static_cast<int>(g.size(1));
  const double tiny = cholesky_tiny_shift(g.scalar_type());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(g.device().index()).stream();
  if (g.scalar_type() == at::kDouble) {
    check_launch(cuda::launch_shifted_cholesky_f64(g.data_ptr<double>(), r.data_ptr<double>(), x.data_ptr<double>(),
                                                   info.data_ptr<int>(), batch, l, shift_factor, tiny, check_rank,
                                                   stream),
                 "shifted_cholesky");
  } else {
    check_launch(cuda::launch_shifted_cholesky_f32(g.data_ptr<float>(), r.data_ptr<float>(), x.data_ptr<float>(),
                                                   info.data_ptr<int>(), batch, l, static_cast<float>(shift_factor),
                                                   static_cast<float>(tiny), check_rank, stream),
                 "shifted_cholesky");
  }
  return {r, x};
}

}  // namespace
}  // namespace keeplora

TORCH_LIBRARY_IMPL(keeplora, CUDA, m) {
  m.impl("gaussian_sketch", &keeplora::gaussian_sketch_cuda);
  m.impl("jacobi_svd", &keeplora::jacobi_svd_cuda);
  m.impl("gesvdj_batched", &keeplora::gesvdj_batched_cuda);
  m.impl("shifted_cholesky", &keeplora::shifted_cholesky_cuda);
  m.impl("split_operand", &keeplora::split_operand_cuda);
  m.impl("gram_of_sum", &keeplora::gram_of_sum_cuda);
  m.impl("split_product", &keeplora::split_product_cuda);
  m.impl("cholesky_qr", &keeplora::cholesky_qr);
  m.impl("rsvd", &keeplora::rsvd);
  m.impl("lora_linear", &keeplora::lora_linear_forward);
}

#endif  // KEEPLORA_WITH_CUDA
