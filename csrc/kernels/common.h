// Host/device portability macro shared by the CPU twins (.cpp) and the CUDA kernels (.cu).
// Headers in csrc/kernels/ include only the C++ standard library, so nvcc compiles them without torch headers.
#pragma once

#if defined(__CUDACC__)
#define KEEPLORA_HD __host__ __device__ __forceinline__
#else
#define KEEPLORA_HD inline
#endif
