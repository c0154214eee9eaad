// Launchers of the hand-written CUDA kernels: raw pointers, sizes and a stream, no torch types, so the .cu files
// compile with nvcc alone (see csrc/README.md). Each returns the launch status; the ATen glue checks it.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace keeplora {
namespace cuda {

// out (rows x cols, row-major, leading dimension ld >= cols) <- the counter-based Gaussian sketch of
// csrc/kernels/philox.h for `seed`.
cudaError_t launch_gaussian_sketch_f32(float* out, int64_t rows, int64_t cols, int64_t ld, uint64_t seed,
                                       cudaStream_t stream);
cudaError_t launch_gaussian_sketch_f64(double* out, int64_t rows, int64_t cols, int64_t ld, uint64_t seed,
                                       cudaStream_t stream);

// Batched one-sided Jacobi SVD of `batch` column-major l x l matrices `a` (batch stride l*l):
// u, v column-major l x l, sigma descending (batch stride l). One thread block per matrix; the working copies
// live in shared memory when they fit, else in `workspace` (2 * batch * l * l elements, may be null when
// jacobi_svd_needs_workspace() is false).
bool jacobi_svd_needs_workspace_f32(int l);
bool jacobi_svd_needs_workspace_f64(int l);
cudaError_t launch_jacobi_svd_f32(const float* a, float* u, float* sigma, float* v, float* workspace,
                                  int64_t batch, int l, cudaStream_t stream);
cudaError_t launch_jacobi_svd_f64(const double* a, double* u, double* sigma, double* v, double* workspace,
                                  int64_t batch, int l, cudaStream_t stream);

// cuSOLVER's batched Jacobi SVD (cusolverDn<t>gesvdjBatched, gesvdj_batched.cu; the library is opened at run
// time) of `batch` column-major l x l matrices `a` (batch stride l*l, overwritten), l <= kGesvdjMaxSize: u, v
// column-major, sigma descending, info[i] cuSOLVER's per-matrix status (0, or > 0 when the sweeps did not
// converge). `work` holds *lwork elements from gesvdj_batched_workspace(). Each returns nullptr on success, else
// what failed (cuSOLVER missing, a status other than success, a launch error).
constexpr int kGesvdjMaxSize = 32;
const char* gesvdj_batched_workspace_f32(int l, int64_t batch, int* lwork);
const char* gesvdj_batched_workspace_f64(int l, int64_t batch, int* lwork);
const char* launch_gesvdj_batched_f32(float* a, float* sigma, float* u, float* v, float* work, int lwork, int* info,
                                      int64_t batch, int l, cudaStream_t stream);
const char* launch_gesvdj_batched_f64(double* a, double* sigma, double* u, double* v, double* work, int lwork,
                                      int* info, int64_t batch, int l, cudaStream_t stream);

// Batched shifted Cholesky + triangular inverse of `batch` row-major l x l SPD matrices g (batch stride l*l):
// g + s I = r^T r with s = factor * tr(g) + tiny, x = r^-1 (both upper), info[i] |= 1 when a factorisation failed
// (r = x = I then), and with check_rank info[i] |= 2 when a column of Q r^-1 loses half its norm (see
// csrc/kernels/cholesky.h). One thread block per matrix.
cudaError_t launch_shifted_cholesky_f32(const float* g, float* r, float* x, int* info, int64_t batch, int l,
                                        float factor, float tiny, bool check_rank, cudaStream_t stream);
cudaError_t launch_shifted_cholesky_f64(const double* g, double* r, double* x, int* info, int64_t batch, int l,
                                        double factor, double tiny, bool check_rank, cudaStream_t stream);

// x (rows x w, row-major, float32 or float64) -> out (rows x 2w, row-major, bf16 or fp16) = [hi | lo] with
// hi = round(float(x)), lo = round((float(x) - hi) * scale), round to nearest even.
cudaError_t launch_split_operand(const void* x, bool x_is_double, void* out, bool out_is_bf16, int64_t rows,
                                 int64_t w, float scale, cudaStream_t stream);

// The randomized SVD's intermediate basis from a GEMM's float32 output y (batch x rows x parts*w, row-major; parts 1:
// one block v, parts 2: [hi | lo] with v = hi + lo_scale * lo in float32), w <= kMaxSplitBasisWidth:
// gram_of_sum writes the float64 Gram of double(v) per chunk of rows, partial (batch x chunks x w x w), to be summed
// over the chunks (gram_of_sum_chunks picks the count); split_product writes out (batch x rows x 2w, bf16 or fp16)
// = [hi | lo] of q = double(v) r_inv (r_inv batch x w x w float64, row-major) as split_operand splits float(q).
constexpr int kMaxSplitBasisWidth = 64;
int64_t gram_of_sum_chunks(int64_t batch, int64_t rows);
cudaError_t launch_gram_of_sum(const float* y, double* partial, int64_t batch, int64_t rows, int w, int parts,
                               float lo_scale, int64_t chunks, cudaStream_t stream);
cudaError_t launch_split_product(const float* y, const double* r_inv, void* out, bool out_is_bf16, int64_t batch,
                                 int64_t rows, int w, int parts, float lo_scale, float scale, cudaStream_t stream);

}  // namespace cuda
}  // namespace keeplora
