// Batched shifted Cholesky factorisation + triangular inverse of small SPD matrices (one CholeskyQR pass's
// l x l work), one thread block per matrix, one launch for the batch. It replaces, per pass, the diagonal-shift
// arithmetic, linalg_cholesky_ex (cuSOLVER), the failure-flag ops, an identity and linalg_solve_triangular
// (cuBLAS trsm): about a dozen launches, several with host-side pointer-array setup.
//
// The factorisation is 2l dependent steps with a barrier after each, so its time is the latency of the memory the
// steps read: the block works on R and X in shared memory when both fit in kStagingBytes (l <= 55 in fp64, 78 in
// fp32; the rSVD's l = r + oversampling is 24-40), and writes them out once; larger matrices are worked on in place
// in the outputs (global memory, L2 resident). Every step is the shared code of csrc/kernels/cholesky.h with the
// block's threads as the item stride, and a barrier between steps; the serial CPU twin runs the same steps, so the
// results do not depend on where the matrices are staged.
#include <cstdint>

#include <cuda_runtime.h>

#include "../kernels/cholesky.h"
#include "launchers.h"

namespace keeplora {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// dynamic shared memory a block may use without an opt-in, less room for the kernel's few static bytes
constexpr size_t kStagingBytes = 48 * 1024 - 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    shifted_cholesky_kernel(const T* __restrict__ g, T* __restrict__ r, T* __restrict__ x, int* __restrict__ info,
                            int l, T factor, T tiny, bool check_rank, bool staged) {
  extern __shared__ __align__(16) unsigned char staging[];
  __shared__ T s_shift;
  __shared__ int s_failed;
  __shared__ int s_rank_lost;
  const int64_t ll = static_cast<int64_t>(l) * l;
  const int64_t mat = blockIdx.x;
  const T* gm = g + ll * mat;
  T* r_out = r + ll * mat;
  T* x_out = x + ll * mat;
  T* rm = staged ? reinterpret_cast<T*>(staging) : r_out;
  T* xm = staged ? rm + ll : x_out;
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;

  for (int64_t e = tid; e < ll; e += nthreads) {
    rm[e] = gm[e];
    xm[e] = T(0);
  }
  if (tid == 0) {
    s_shift = cholesky::shift(gm, l, factor, tiny);
    s_failed = 0;
    s_rank_lost = 0;
  }
  __syncthreads();
  const T s = s_shift;
  for (int i = tid; i < l; i += nthreads) rm[static_cast<int64_t>(i) * l + i] += s;
  __syncthreads();

  for (int k = 0; k < l; ++k) {
    if (tid == 0 && !cholesky::take_pivot(rm, l, k)) s_failed = 1;
    __syncthreads();
    if (s_failed) break;  // uniform over the block
    cholesky::scale_row(rm, l, k, tid, nthreads);
    __syncthreads();
    cholesky::update_trailing(rm, l, k, tid, nthreads);
    __syncthreads();
  }
  if (s_failed) {
    cholesky::set_identity(rm, xm, l, tid, nthreads);
    if (tid == 0) info[mat] |= cholesky::kFailed;
  } else {
    cholesky::zero_lower(rm, l, tid, nthreads);
    for (int k = l - 1; k >= 0; --k) {
      cholesky::finalise_inverse_row(rm, xm, l, k, tid, nthreads);
      __syncthreads();
      cholesky::fold_inverse_row(rm, xm, l, k, tid, nthreads);
      __syncthreads();
    }
    if (check_rank) {
      for (int c = tid; c < l; c += nthreads) {
        if (!cholesky::column_kept(xm, l, c, s)) s_rank_lost = 1;  // benign race: every writer stores 1
      }
      __syncthreads();
      if (tid == 0 && s_rank_lost) info[mat] |= cholesky::kRankDeficient;
    }
  }
  if (staged) {
    __syncthreads();
    for (int64_t e = tid; e < ll; e += nthreads) {
      r_out[e] = rm[e];
      x_out[e] = xm[e];
    }
  }
}

template <typename T>
cudaError_t launch(const T* g, T* r, T* x, int* info, int64_t batch, int l, T factor, T tiny, bool check_rank,
                   cudaStream_t stream) {
  if (batch == 0 || l == 0) return cudaSuccess;
  if (batch > 2147483647LL) return cudaErrorInvalidConfiguration;
  const size_t staging = 2 * static_cast<size_t>(l) * l * sizeof(T);
  const bool staged = staging <= kStagingBytes;
  shifted_cholesky_kernel<T><<<static_cast<unsigned>(batch), kThreads, staged ? staging : 0, stream>>>(
      g, r, x, info, l, factor, tiny, check_rank, staged);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_shifted_cholesky_f32(const float* g, float* r, float* x, int* info, int64_t batch, int l,
                                        float factor, float tiny, bool check_rank, cudaStream_t stream) {
  return launch(g, r, x, info, batch, l, factor, tiny, check_rank, stream);
}

cudaError_t launch_shifted_cholesky_f64(const double* g, double* r, double* x, int* info, int64_t batch, int l,
                                        double factor, double tiny, bool check_rank, cudaStream_t stream) {
  return launch(g, r, x, info, batch, l, factor, tiny, check_rank, stream);
}

}  // namespace cuda
}  // namespace keeplora
