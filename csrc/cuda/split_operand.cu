// The float32/float64 operand of a low-precision GEMM split into two low-precision parts in one pass:
// x = hi + lo / scale with hi = round(x), lo = round((x - hi) * scale), written side by side as [hi | lo] so that
// one bf16/fp16 GEMM with float32 output reads the big matrix once and keeps ~16 mantissa bits of x
// (csrc/rsvd.cpp, Residual::gemm). Replaces seven element-wise library launches per GEMM.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"

namespace keeplora {
namespace cuda {
namespace {

__device__ __forceinline__ void round_to(float v, __nv_bfloat16* out, float* back) {
  *out = __float2bfloat16_rn(v);
  *back = __bfloat162float(*out);
}

__device__ __forceinline__ void round_to(float v, __half* out, float* back) {
  *out = __float2half_rn(v);
  *back = __half2float(*out);
}

// x (rows, w) row-major -> out (rows, 2 w): out[i][j] = hi, out[i][w + j] = lo.
template <typename In, typename Out>
__global__ void split_operand_kernel(const In* __restrict__ x, Out* __restrict__ out, int64_t rows, int64_t w,
                                     float scale) {
  const int64_t total = rows * w;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / w;
    const int64_t j = e - i * w;
    const float v = static_cast<float>(x[e]);  // as the library path: to float32 first
    Out hi, lo;
    float hi_f, lo_f;
    round_to(v, &hi, &hi_f);
    round_to((v - hi_f) * scale, &lo, &lo_f);
    out[i * 2 * w + j] = hi;
    out[i * 2 * w + w + j] = lo;
  }
}

template <typename In, typename Out>
cudaError_t launch(const In* x, Out* out, int64_t rows, int64_t w, float scale, cudaStream_t stream) {
  const int64_t total = rows * w;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks64 = (total + threads - 1) / threads;
  const unsigned blocks = static_cast<unsigned>(blocks64 < 65535 ? blocks64 : 65535);
  split_operand_kernel<In, Out><<<blocks, threads, 0, stream>>>(x, out, rows, w, scale);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_split_operand(const void* x, bool x_is_double, void* out, bool out_is_bf16, int64_t rows,
                                 int64_t w, float scale, cudaStream_t stream) {
  if (x_is_double) {
    const double* in = static_cast<const double*>(x);
    return out_is_bf16 ? launch(in, static_cast<__nv_bfloat16*>(out), rows, w, scale, stream)
                       : launch(in, static_cast<__half*>(out), rows, w, scale, stream);
  }
  const float* in = static_cast<const float*>(x);
  return out_is_bf16 ? launch(in, static_cast<__nv_bfloat16*>(out), rows, w, scale, stream)
                     : launch(in, static_cast<__half*>(out), rows, w, scale, stream);
}

}  // namespace cuda
}  // namespace keeplora
