// Fused Gaussian sketch generation on the GPU: one thread per group of four entries, no host RNG state, no
// host-to-device copy, the same numbers as the CPU twin (csrc/kernels/philox.h).
#include <cstdint>

#include <cuda_runtime.h>

#include "../kernels/philox.h"
#include "launchers.h"

namespace keeplora {
namespace cuda {
namespace {

template <typename T>
__global__ void gaussian_sketch_kernel(T* __restrict__ out, int64_t rows, int64_t cols, int64_t ld, uint64_t seed) {
  const int64_t total = rows * cols;
  const int64_t groups = (total + 3) / 4;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double z[4];
    philox::normal4(seed, static_cast<uint64_t>(g), z);
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t e = 4 * g + lane;  // column-major flat index: e = j * rows + i
      if (e >= total) break;
      const int64_t j = e / rows;
      const int64_t i = e - j * rows;
      out[i * ld + j] = static_cast<T>(static_cast<float>(z[lane]));
    }
  }
}

template <typename T>
cudaError_t launch(T* out, int64_t rows, int64_t cols, int64_t ld, uint64_t seed, cudaStream_t stream) {
  const int64_t groups = (rows * cols + 3) / 4;
  if (groups == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks64 = (groups + threads - 1) / threads;
  const unsigned blocks = static_cast<unsigned>(blocks64 < 65535 ? blocks64 : 65535);
  gaussian_sketch_kernel<T><<<blocks, threads, 0, stream>>>(out, rows, cols, ld, seed);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gaussian_sketch_f32(float* out, int64_t rows, int64_t cols, int64_t ld, uint64_t seed,
                                       cudaStream_t stream) {
  return launch(out, rows, cols, ld, seed, stream);
}

cudaError_t launch_gaussian_sketch_f64(double* out, int64_t rows, int64_t cols, int64_t ld, uint64_t seed,
                                       cudaStream_t stream) {
  return launch(out, rows, cols, ld, seed, stream);
}

}  // namespace cuda
}  // namespace keeplora
