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

}  // namespace cuda
}  // namespace keeplora
