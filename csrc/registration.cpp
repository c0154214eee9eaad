// The op schemas of the `keeplora` namespace (declared once) and their CPU and Meta kernels. CUDA kernels are
// registered in cuda_glue.cpp when the library is built with CUDA.
#include <torch/library.h>

#include "ops.h"

namespace keeplora {

const std::vector<std::string>& op_names() {
  static const std::vector<std::string> names = {"gaussian_sketch", "jacobi_svd", "shifted_cholesky",
                                                 "split_operand", "gram_of_sum", "split_product",
                                                 "cholesky_qr", "rsvd", "gesvdj_batched", "lora_linear"};
  return names;
}

}  // namespace keeplora

TORCH_LIBRARY(keeplora, m) {
  // Omega (rows x cols, float32, or float64 when `like` is float64) on like's device: the counter-based Gaussian
  // sketch of csrc/kernels/philox.h. Identical on CPU and CUDA for the same seed.
  m.def("gaussian_sketch(Tensor like, int seed, int rows, int cols) -> Tensor");
  // a (b, l, l) float32/float64 = U diag(S) V^T by one-sided Jacobi, S descending.
  m.def("jacobi_svd(Tensor a) -> (Tensor U, Tensor S, Tensor V)");
  // The same with cuSOLVER's gesvdjBatched (CUDA only, l <= 32): rsvd's alternative small-SVD launcher.
  m.def("gesvdj_batched(Tensor a) -> (Tensor U, Tensor S, Tensor V)");
  // One pass of shifted CholeskyQR on the Grams g (b, l, l) float32/float64: g + s I = R^T R with
  // s = shift_factor * tr(g) + tiny, R_inv = R^-1 (both upper); info (b,) int32 is or-ed in place with bit 1 when a
  // factorisation failed (R = R_inv = I then) and, with check_rank, bit 2 when a column of Q R^-1 keeps less than
  // half its squared norm (1 - s ||R_inv e_j||^2 < 1/2). The CUDA kernel is one launch, no host synchronisation.
  m.def("shifted_cholesky(Tensor gram, float shift_factor, bool check_rank, Tensor(a!) info) -> "
        "(Tensor R, Tensor R_inv)");
  // x (b, c, w) float32/float64 -> [hi | lo] (b, c, 2w) in dtype (bfloat16 or float16), hi = round(float(x)),
  // lo = round((float(x) - hi) * scale): the operand of a low-precision GEMM that keeps ~16 bits of x.
  m.def("split_operand(Tensor x, ScalarType dtype, float scale) -> Tensor");
  // The randomized SVD's intermediate basis from a GEMM's float32 output y (b, rows, parts * w): with v = y (parts
  // 1) or v = y[..., :w] + lo_scale * y[..., w:] (parts 2, the output of a GEMM on a split operand), gram_of_sum is
  // the float64 Gram double(v)^T double(v) (b, w, w) and split_product is split_operand(double(v) r_inv, dtype,
  // scale) (b, rows, 2w), r_inv (b, w, w) float64. w <= 64.
  m.def("gram_of_sum(Tensor y, int parts, float lo_scale) -> Tensor");
  m.def("split_product(Tensor y, int parts, float lo_scale, Tensor r_inv, ScalarType dtype, float scale) -> Tensor");
  // y (b, m, l) = Q R (float64) by shifted CholeskyQR: `shifted_passes` passes with the provably safe shift,
  // then `plain_passes` with a shift at the rounding level. info: bit 1 a Cholesky failed, bit 2 a column of Q
  // came out with norm < 1/sqrt(2) (numerically rank-deficient y).
  m.def("cholesky_qr(Tensor y, int shifted_passes=1, int plain_passes=1) -> (Tensor Q, Tensor R, Tensor info)");
  // Batched randomized SVD of (I - P P^T) a, a (b, m, n): U (b, m, rank), S (b, rank), V (b, n, rank), info (b,).
  m.def("rsvd(Tensor a, int rank, int oversample, int power_iters, Tensor? project_out, int seed, "
        "str orthonormalize=\"cholqr\") -> (Tensor U, Tensor S, Tensor V, Tensor info)");
}

// Every op but gesvdj_batched (cuSOLVER has no CPU side; the CPU small SVD is LAPACK or jacobi_svd's twin).
TORCH_LIBRARY_IMPL(keeplora, CPU, m) {
  m.impl("gaussian_sketch", &keeplora::gaussian_sketch_cpu);
  m.impl("jacobi_svd", &keeplora::jacobi_svd_cpu);
  m.impl("shifted_cholesky", &keeplora::shifted_cholesky_cpu);
  m.impl("split_operand", &keeplora::split_operand_cpu);
  m.impl("gram_of_sum", &keeplora::gram_of_sum_cpu);
  m.impl("split_product", &keeplora::split_product_cpu);
  m.impl("cholesky_qr", &keeplora::cholesky_qr);
  m.impl("rsvd", &keeplora::rsvd);
}

TORCH_LIBRARY_IMPL(keeplora, Meta, m) {
  m.impl("gaussian_sketch", &keeplora::gaussian_sketch_meta);
  m.impl("jacobi_svd", &keeplora::jacobi_svd_meta);
  m.impl("gesvdj_batched", &keeplora::jacobi_svd_meta);
  m.impl("shifted_cholesky", &keeplora::shifted_cholesky_meta);
  m.impl("split_operand", &keeplora::split_operand_meta);
  m.impl("gram_of_sum", &keeplora::gram_of_sum_meta);
  m.impl("split_product", &keeplora::split_product_meta);
  m.impl("cholesky_qr", &keeplora::cholesky_qr_meta);
  m.impl("rsvd", &keeplora::rsvd_meta);
}
