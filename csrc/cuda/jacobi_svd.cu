// Batched one-sided Jacobi SVD of small square matrices (the l x l core of the randomized SVD), one thread block
// per matrix. It replaces torch.linalg.svd/eigh for this step: those check their info on the host (a device
// synchronisation per call) and loop over the batch. Here the whole batch runs in one launch, convergence is
// decided on the device, and nothing returns to the host.
//
// Layout: every matrix is column-major (column j contiguous), so a warp reads a column with consecutive lanes.
// Each round of the round-robin schedule has l_pad/2 disjoint column pairs; warp k handles pairs k, k + nwarps,
// ...; per pair the warp forms alpha, beta, gamma with shuffles, every lane derives the same rotation and updates
// its slice of the two columns of W and V. __syncthreads() separates rounds.
#include <cstdint>

#include <cuda_runtime.h>

#include "../kernels/jacobi.h"
#include "launchers.h"

namespace keeplora {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxWarps = 16;

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename T>
size_t shared_bytes(int l, bool matrices_in_shared) {
  const size_t small = static_cast<size_t>(l) * (sizeof(T) + sizeof(int));  // sigma and output positions
  const size_t mats = matrices_in_shared ? 2 * static_cast<size_t>(l) * l * sizeof(T) : 0;
  return mats + small;
}

template <typename T>
__global__ void jacobi_svd_kernel(const T* __restrict__ a, T* __restrict__ u_out, T* __restrict__ sigma_out,
                                  T* __restrict__ v_out, T* __restrict__ workspace, int l) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  const int64_t mat = blockIdx.x;
  const int64_t ll = static_cast<int64_t>(l) * l;
  T* w;
  T* v;
  unsigned char* rest;
  if (workspace == nullptr) {
    w = reinterpret_cast<T*>(shared_raw);
    v = w + ll;
    rest = shared_raw + 2 * ll * sizeof(T);
  } else {
    w = workspace + 2 * ll * mat;
    v = w + ll;
    rest = shared_raw;
  }
  T* sigma = reinterpret_cast<T*>(rest);
  int* position = reinterpret_cast<int*>(rest + l * sizeof(T));
  __shared__ int rotated;

  const T* a_mat = a + ll * mat;
  for (int64_t k = threadIdx.x; k < ll; k += blockDim.x) {
    w[k] = a_mat[k];
    const int64_t col = k / l;
    v[k] = (k - col * l == col) ? T(1) : T(0);
  }
  __syncthreads();

  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  const int lp = jacobi::padded(l);
  const T tol = jacobi::tolerance<T>(l);

  for (int sweep = 0; sweep < jacobi::kMaxSweeps; ++sweep) {
    if (threadIdx.x == 0) rotated = 0;
    __syncthreads();
    for (int round = 0; round < lp - 1; ++round) {
      for (int k = warp; k < lp / 2; k += nwarps) {
        int p, q;
        jacobi::pair_of(round, k, lp, &p, &q);
        if (q >= l) continue;  // the dummy column of an odd l (uniform over the warp)
        T* wp = w + static_cast<int64_t>(p) * l;
        T* wq = w + static_cast<int64_t>(q) * l;
        T alpha = 0, beta = 0, gamma = 0;
        for (int i = lane; i < l; i += kWarp) {
          const T x = wp[i], y = wq[i];
          alpha += x * x;
          beta += y * y;
          gamma += x * y;
        }
        alpha = warp_sum(alpha);
        beta = warp_sum(beta);
        gamma = warp_sum(gamma);
        T c, s;
        if (!jacobi::rotation(alpha, beta, gamma, tol, &c, &s)) continue;  // same decision on every lane
        if (lane == 0) rotated = 1;
        T* vp = v + static_cast<int64_t>(p) * l;
        T* vq = v + static_cast<int64_t>(q) * l;
        for (int i = lane; i < l; i += kWarp) {
          const T x = wp[i], y = wq[i];
          wp[i] = c * x - s * y;
          wq[i] = s * x + c * y;
          const T vx = vp[i], vy = vq[i];
          vp[i] = c * vx - s * vy;
          vq[i] = s * vx + c * vy;
        }
      }
      __syncthreads();
    }
    const int any = rotated;
    __syncthreads();  // everyone has read `rotated` before thread 0 resets it
    if (!any) break;  // uniform over the block
  }

  for (int j = warp; j < l; j += nwarps) {
    const T* wj = w + static_cast<int64_t>(j) * l;
    T norm2 = 0;
    for (int i = lane; i < l; i += kWarp) norm2 += wj[i] * wj[i];
    norm2 = warp_sum(norm2);
    if (lane == 0) sigma[j] = sqrt(norm2);
  }
  __syncthreads();
  for (int j = threadIdx.x; j < l; j += blockDim.x) position[j] = jacobi::output_position(sigma, l, j);
  __syncthreads();

  T* u_mat = u_out + ll * mat;
  T* v_mat = v_out + ll * mat;
  T* s_mat = sigma_out + static_cast<int64_t>(l) * mat;
  for (int j = warp; j < l; j += nwarps) {
    const int dst = position[j];
    const T sj = sigma[j];
    const T inv = sj > T(0) ? T(1) / sj : T(0);
    if (lane == 0) s_mat[dst] = sj;
    const T* wj = w + static_cast<int64_t>(j) * l;
    const T* vj = v + static_cast<int64_t>(j) * l;
    for (int i = lane; i < l; i += kWarp) {
      u_mat[static_cast<int64_t>(dst) * l + i] = wj[i] * inv;
      v_mat[static_cast<int64_t>(dst) * l + i] = vj[i];
    }
  }
}

template <typename T>
bool needs_workspace(int l) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return true;
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) return true;
  // keep room for the kernel's static shared memory (the `rotated` flag) and alignment
  return shared_bytes<T>(l, true) + 256 > static_cast<size_t>(optin);
}

template <typename T>
cudaError_t launch(const T* a, T* u, T* sigma, T* v, T* workspace, int64_t batch, int l, cudaStream_t stream) {
  if (batch == 0 || l == 0) return cudaSuccess;
  const bool in_shared = !needs_workspace<T>(l);
  if (!in_shared && workspace == nullptr) return cudaErrorInvalidValue;
  if (batch > 2147483647LL) return cudaErrorInvalidConfiguration;
  const size_t bytes = shared_bytes<T>(l, in_shared);
  cudaError_t err = cudaFuncSetAttribute(jacobi_svd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(bytes));
  if (err != cudaSuccess) return err;
  const int pairs = jacobi::padded(l) / 2;
  const int warps = pairs < kMaxWarps ? (pairs > 0 ? pairs : 1) : kMaxWarps;
  jacobi_svd_kernel<T><<<static_cast<unsigned>(batch), warps * kWarp, bytes, stream>>>(
      a, u, sigma, v, in_shared ? nullptr : workspace, l);
  return cudaGetLastError();
}

}  // namespace

bool jacobi_svd_needs_workspace_f32(int l) { return needs_workspace<float>(l); }
bool jacobi_svd_needs_workspace_f64(int l) { return needs_workspace<double>(l); }

cudaError_t launch_jacobi_svd_f32(const float* a, float* u, float* sigma, float* v, float* workspace,
                                  int64_t batch, int l, cudaStream_t stream) {
  return launch(a, u, sigma, v, workspace, batch, l, stream);
}

cudaError_t launch_jacobi_svd_f64(const double* a, double* u, double* sigma, double* v, double* workspace,
                                  int64_t batch, int l, cudaStream_t stream) {
  return launch(a, u, sigma, v, workspace, batch, l, stream);
}

}  // namespace cuda
}  // namespace keeplora
