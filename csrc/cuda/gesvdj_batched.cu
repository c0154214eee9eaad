// cuSOLVER's batched Jacobi SVD (cusolverDn<t>gesvdjBatched, matrices up to 32 x 32) as an alternative launcher
// for the small SVD of the randomized SVD, next to the hand-written Jacobi kernel (jacobi_svd.cu).
//
// The library is opened at run time (dlopen) rather than linked: the few entry points below are declared here with
// the types of the cuSOLVER API, so this file compiles with nvcc and the CUDA runtime headers alone (the build
// machines that run the compile checks have no cuSOLVER headers or libraries), and a process without cuSOLVER
// loses only this launcher, with an error saying so. On a CUDA build of torch the library is normally loaded
// already (torch links it), and dlopen returns that copy.
#include <dlfcn.h>

#include <cstdint>
#include <map>
#include <mutex>

#include <cuda_runtime_api.h>

#include "launchers.h"

namespace keeplora {
namespace cuda {
namespace {

// The subset of cusolverDn.h used here (opaque handles, status and mode enums as ints with the API's values).
using SolverHandle = void*;  // cusolverDnHandle_t
using GesvdjParams = void*;  // gesvdjInfo_t
using Status = int;          // cusolverStatus_t, 0 = CUSOLVER_STATUS_SUCCESS
constexpr int kEigModeVector = 1;  // CUSOLVER_EIG_MODE_VECTOR

using CreateFn = Status (*)(SolverHandle*);
using SetStreamFn = Status (*)(SolverHandle, cudaStream_t);
using CreateParamsFn = Status (*)(GesvdjParams*);
using SetSortFn = Status (*)(GesvdjParams, int);
template <typename T>
using BufferSizeFn = Status (*)(SolverHandle, int, int, int, const T*, int, const T*, const T*, int, const T*, int,
                                int*, GesvdjParams, int);
template <typename T>
using BatchedFn = Status (*)(SolverHandle, int, int, int, T*, int, T*, T*, int, T*, int, T*, int, int*, GesvdjParams,
                             int);

struct Library {
  void* handle = nullptr;
  const char* error = nullptr;
  CreateFn create = nullptr;
  SetStreamFn set_stream = nullptr;
  CreateParamsFn create_params = nullptr;
  SetSortFn set_sort = nullptr;
  BufferSizeFn<float> s_buffer = nullptr;
  BufferSizeFn<double> d_buffer = nullptr;
  BatchedFn<float> s_batched = nullptr;
  BatchedFn<double> d_batched = nullptr;
};

template <typename F>
bool resolve(void* lib, const char* name, F* out) {
  *out = reinterpret_cast<F>(dlsym(lib, name));
  return *out != nullptr;
}

const Library& library() {
  static const Library lib = [] {
    Library l;
    for (const char* name : {"libcusolver.so.12", "libcusolver.so.11", "libcusolver.so"}) {
      l.handle = dlopen(name, RTLD_NOW | RTLD_GLOBAL);
      if (l.handle != nullptr) break;
    }
    if (l.handle == nullptr) {
      l.error = "cuSOLVER not found (dlopen of libcusolver.so.12, .so.11 and .so failed)";
      return l;
    }
    const bool ok = resolve(l.handle, "cusolverDnCreate", &l.create) &&
                    resolve(l.handle, "cusolverDnSetStream", &l.set_stream) &&
                    resolve(l.handle, "cusolverDnCreateGesvdjInfo", &l.create_params) &&
                    resolve(l.handle, "cusolverDnXgesvdjSetSortEig", &l.set_sort) &&
                    resolve(l.handle, "cusolverDnSgesvdjBatched_bufferSize", &l.s_buffer) &&
                    resolve(l.handle, "cusolverDnDgesvdjBatched_bufferSize", &l.d_buffer) &&
                    resolve(l.handle, "cusolverDnSgesvdjBatched", &l.s_batched) &&
                    resolve(l.handle, "cusolverDnDgesvdjBatched", &l.d_batched);
    if (!ok) l.error = "cuSOLVER loaded but a gesvdjBatched entry point is missing";
    return l;
  }();
  return lib;
}

// One cuSOLVER handle and one parameter object (sorted singular values, default tolerance and sweeps) per device,
// created on first use (the first call of a process is never inside a graph capture: GraphedCall warms up first).
// Handles are not freed: they live as long as the process, like torch's own handle pools.
struct DeviceState {
  SolverHandle handle = nullptr;
  GesvdjParams params = nullptr;
};

const char* device_state(DeviceState* out) {
  const Library& lib = library();
  if (lib.error != nullptr) return lib.error;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return "cudaGetDevice failed";
  static std::mutex mutex;
  static std::map<int, DeviceState> states;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = states.find(device);
  if (found == states.end()) {
    DeviceState state;
    if (lib.create(&state.handle) != 0) return "cusolverDnCreate failed";
    if (lib.create_params(&state.params) != 0) return "cusolverDnCreateGesvdjInfo failed";
    if (lib.set_sort(state.params, 1) != 0) return "cusolverDnXgesvdjSetSortEig failed";
    found = states.emplace(device, state).first;
  }
  *out = found->second;
  return nullptr;
}

template <typename T>
const char* workspace(BufferSizeFn<T> fn, int l, int64_t batch, int* lwork) {
  if (l < 1 || l > kGesvdjMaxSize) return "gesvdjBatched needs 1 <= l <= 32";
  if (batch < 1 || batch > INT32_MAX) return "gesvdjBatched needs 1 <= batch < 2^31";
  DeviceState state;
  if (const char* err = device_state(&state)) return err;
  if (fn(state.handle, kEigModeVector, l, l, nullptr, l, nullptr, nullptr, l, nullptr, l, lwork, state.params,
         static_cast<int>(batch)) != 0) {
    return "cusolverDn<t>gesvdjBatched_bufferSize failed";
  }
  return nullptr;
}

template <typename T>
const char* run(BatchedFn<T> fn, T* a, T* sigma, T* u, T* v, T* work, int lwork, int* info, int64_t batch, int l,
                cudaStream_t stream) {
  if (l < 1 || l > kGesvdjMaxSize) return "gesvdjBatched needs 1 <= l <= 32";
  if (batch < 1 || batch > INT32_MAX) return "gesvdjBatched needs 1 <= batch < 2^31";
  DeviceState state;
  if (const char* err = device_state(&state)) return err;
  // The handle is shared by every stream of the device: set the caller's stream for this call.
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  if (library().set_stream(state.handle, stream) != 0) return "cusolverDnSetStream failed";
  if (fn(state.handle, kEigModeVector, l, l, a, l, sigma, u, l, v, l, work, lwork, info, state.params,
         static_cast<int>(batch)) != 0) {
    return "cusolverDn<t>gesvdjBatched failed";
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* gesvdj_batched_workspace_f32(int l, int64_t batch, int* lwork) {
  return workspace(library().s_buffer, l, batch, lwork);
}

const char* gesvdj_batched_workspace_f64(int l, int64_t batch, int* lwork) {
  return workspace(library().d_buffer, l, batch, lwork);
}

const char* launch_gesvdj_batched_f32(float* a, float* sigma, float* u, float* v, float* work, int lwork, int* info,
                                      int64_t batch, int l, cudaStream_t stream) {
  return run(library().s_batched, a, sigma, u, v, work, lwork, info, batch, l, stream);
}

const char* launch_gesvdj_batched_f64(double* a, double* sigma, double* u, double* v, double* work, int lwork,
                                      int* info, int64_t batch, int l, cudaStream_t stream) {
  return run(library().d_batched, a, sigma, u, v, work, lwork, info, batch, l, stream);
}

}  // namespace cuda
}  // namespace keeplora
