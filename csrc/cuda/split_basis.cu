// The randomized SVD's intermediate bases without an fp64 Q (csrc/rsvd.cpp, fused range finder): a GEMM's float32
// output y (rows x parts*w: one block, or [hi | lo] when the GEMM read a split operand) is read twice,
//   1. gram_of_sum: the float64 Gram of v = float(y_hi + lo_scale * y_lo), per block of rows (partial Grams that
//      the glue sums), for the shifted Cholesky that gives R^-1;
//   2. split_product: q = double(v) R^-1 per row, rounded to float32 and split into [hi | lo] low-precision parts
//      (as split_operand does), the operand of the next GEMM;
// where the library path converts y to float64, forms the Gram from it, writes Q = Y R^-1 in float64 and splits Q
// in a fifth pass. v and the split follow the library path's formulas; only the order of the sums differs.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"

namespace keeplora {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kGramRows = 64;  // rows staged per step of gram_of_sum (64 x 64 doubles = 32 KB at the largest w)

__device__ __forceinline__ float combined(const float* row, int parts, int w, int j, float lo_scale) {
  return parts == 2 ? row[j] + lo_scale * row[w + j] : row[j];
}

// grid (chunks, batch): block (c, b) sums the rows [c * rows_per_chunk, ...) of matrix b into partial[b][c].
__global__ void gram_of_sum_kernel(const float* __restrict__ y, double* __restrict__ partial, int64_t rows, int w,
                                   int parts, float lo_scale, int64_t rows_per_chunk) {
  __shared__ double tile[kGramRows * kMaxSplitBasisWidth];
  const int64_t b = blockIdx.y;
  const int64_t chunk = blockIdx.x;
  const int64_t first = chunk * rows_per_chunk;
  const int64_t last = first + rows_per_chunk < rows ? first + rows_per_chunk : rows;
  const int64_t stride = static_cast<int64_t>(parts) * w;
  const float* mat = y + b * rows * stride;
  const int entries = w * w;
  // entry e = threadIdx.x + k * kThreads of the w x w Gram; a fixed trip count keeps acc in registers
  constexpr int kPerThread = kMaxSplitBasisWidth * kMaxSplitBasisWidth / kThreads;
  double acc[kPerThread] = {};
  for (int64_t r0 = first; r0 < last; r0 += kGramRows) {
    const int n = static_cast<int>(last - r0 < kGramRows ? last - r0 : kGramRows);
    for (int e = threadIdx.x; e < n * w; e += kThreads) {
      const int r = e / w, j = e - r * w;
      tile[r * w + j] = static_cast<double>(combined(mat + (r0 + r) * stride, parts, w, j, lo_scale));
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int e = threadIdx.x + k * kThreads;
      if (e < entries) {
        const int i = e / w, j = e - i * w;
        double s = 0.0;
        for (int r = 0; r < n; ++r) s += tile[r * w + i] * tile[r * w + j];
        acc[k] += s;
      }
    }
    __syncthreads();
  }
  double* out = partial + (b * gridDim.x + chunk) * entries;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int e = threadIdx.x + k * kThreads;
    if (e < entries) out[e] = acc[k];
  }
}

__device__ __forceinline__ void split(float v, float scale, __nv_bfloat16* hi, __nv_bfloat16* lo) {
  *hi = __float2bfloat16_rn(v);
  *lo = __float2bfloat16_rn((v - __bfloat162float(*hi)) * scale);
}

__device__ __forceinline__ void split(float v, float scale, __half* hi, __half* lo) {
  *hi = __float2half_rn(v);
  *lo = __float2half_rn((v - __half2float(*hi)) * scale);
}

// grid (row tiles, batch), dynamic shared memory (w * w + tile_rows * w) doubles: R^-1 of the matrix and the
// tile's combined rows.
template <typename Out>
__global__ void split_product_kernel(const float* __restrict__ y, const double* __restrict__ r_inv,
                                     Out* __restrict__ out, int64_t rows, int w, int parts, float lo_scale,
                                     int tile_rows, float scale) {
  extern __shared__ double shared[];
  double* rinv = shared;          // w x w, row-major
  double* v = shared + w * w;     // tile_rows x w
  const int64_t b = blockIdx.y;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * tile_rows;
  const int n = static_cast<int>(rows - r0 < tile_rows ? rows - r0 : tile_rows);
  const int64_t stride = static_cast<int64_t>(parts) * w;
  const float* mat = y + (b * rows + r0) * stride;
  const double* rb = r_inv + b * static_cast<int64_t>(w) * w;
  for (int e = threadIdx.x; e < w * w; e += kThreads) rinv[e] = rb[e];
  for (int e = threadIdx.x; e < n * w; e += kThreads) {
    const int r = e / w, j = e - r * w;
    v[e] = static_cast<double>(combined(mat + r * stride, parts, w, j, lo_scale));
  }
  __syncthreads();
  Out* dst = out + (b * rows + r0) * 2 * static_cast<int64_t>(w);
  for (int e = threadIdx.x; e < n * w; e += kThreads) {
    const int r = e / w, j = e - r * w;
    double q = 0.0;
    for (int k = 0; k < w; ++k) q += v[r * w + k] * rinv[k * w + j];
    Out hi, lo;
    split(static_cast<float>(q), scale, &hi, &lo);  // as split_operand: to float32 first
    dst[r * 2 * w + j] = hi;
    dst[r * 2 * w + w + j] = lo;
  }
}

template <typename Out>
cudaError_t launch_product(const float* y, const double* r_inv, Out* out, int64_t batch, int64_t rows, int w,
                           int parts, float lo_scale, float scale, cudaStream_t stream) {
  const int tile_rows = 32;
  const size_t bytes = (static_cast<size_t>(w) * w + static_cast<size_t>(tile_rows) * w) * sizeof(double);
  const dim3 grid(static_cast<unsigned>((rows + tile_rows - 1) / tile_rows), static_cast<unsigned>(batch));
  split_product_kernel<Out><<<grid, kThreads, bytes, stream>>>(y, r_inv, out, rows, w, parts, lo_scale, tile_rows,
                                                                scale);
  return cudaGetLastError();
}

bool valid(int64_t batch, int64_t rows, int w, int parts) {
  return batch >= 0 && batch <= 65535 && rows >= 0 && w >= 1 && w <= kMaxSplitBasisWidth &&
         (parts == 1 || parts == 2);
}

}  // namespace

int64_t gram_of_sum_chunks(int64_t batch, int64_t rows) {
  // enough blocks to cover the SMs twice, each over at least kGramRows * 2 rows
  int64_t chunks = 1;
  while (batch * chunks < 264 && rows / (2 * chunks) >= 2 * kGramRows && chunks < 65535) chunks *= 2;
  return chunks;
}

cudaError_t launch_gram_of_sum(const float* y, double* partial, int64_t batch, int64_t rows, int w, int parts,
                               float lo_scale, int64_t chunks, cudaStream_t stream) {
  if (!valid(batch, rows, w, parts) || chunks < 1 || chunks > 65535) return cudaErrorInvalidValue;
  if (batch == 0) return cudaSuccess;
  const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(batch));
  gram_of_sum_kernel<<<grid, kThreads, 0, stream>>>(y, partial, rows, w, parts, lo_scale, rows_per_chunk);
  return cudaGetLastError();
}

cudaError_t launch_split_product(const float* y, const double* r_inv, void* out, bool out_is_bf16, int64_t batch,
                                 int64_t rows, int w, int parts, float lo_scale, float scale, cudaStream_t stream) {
  if (!valid(batch, rows, w, parts)) return cudaErrorInvalidValue;
  if (batch == 0 || rows == 0) return cudaSuccess;
  return out_is_bf16 ? launch_product(y, r_inv, static_cast<__nv_bfloat16*>(out), batch, rows, w, parts, lo_scale,
                                      scale, stream)
                     : launch_product(y, r_inv, static_cast<__half*>(out), batch, rows, w, parts, lo_scale, scale,
                                      stream);
}

}  // namespace cuda
}  // namespace keeplora
