// ATen-level entry points of the keeplora library (declared once; schemas in registration.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace keeplora {

// Names of every op this library defines in the `keeplora` namespace (what Python sees as torch.ops.keeplora.*).
const std::vector<std::string>& op_names();

// Per-device kernels.
at::Tensor gaussian_sketch_cpu(const at::Tensor& like, int64_t seed, int64_t rows, int64_t cols);
std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobi_svd_cpu(const at::Tensor& a);
at::Tensor split_operand_cpu(const at::Tensor& x, at::ScalarType dtype, double scale);
std::tuple<at::Tensor, at::Tensor> shifted_cholesky_cpu(const at::Tensor& gram, double shift_factor, bool check_rank,
                                                        const at::Tensor& info);
at::Tensor gram_of_sum_cpu(const at::Tensor& y, int64_t parts, double lo_scale);
at::Tensor split_product_cpu(const at::Tensor& y, int64_t parts, double lo_scale, const at::Tensor& r_inv,
                             at::ScalarType dtype, double scale);

// cuSOLVER's batched Jacobi SVD (CUDA only, l <= 32): the same contract as jacobi_svd.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gesvdj_batched_cuda(const at::Tensor& a);
// Largest l that gesvdj_batched accepts (cuSOLVER's limit for gesvdjBatched).
constexpr int64_t kGesvdjMaxSize = 32;
// The small-SVD launcher rsvd uses on CUDA for l <= kGesvdjMaxSize: "jacobi" (the hand-written kernel, default)
// or "cusolver" (gesvdj_batched). The environment variable KEEPLORA_SMALL_SVD sets it, read once at first use;
// set_small_svd_method changes it for the process (benchmarks' A/B rows, tests).
std::string small_svd_method();
void set_small_svd_method(const std::string& method);

// Device-generic implementations (ATen calls only): registered for CPU here and for CUDA in cuda_glue.cpp.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cholesky_qr(const at::Tensor& y, int64_t shifted_passes,
                                                           int64_t plain_passes);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rsvd(const at::Tensor& a, int64_t rank,
                                                                int64_t oversample, int64_t power_iters,
                                                                const std::optional<at::Tensor>& project_out,
                                                                int64_t seed, c10::string_view orthonormalize);
at::Tensor lora_linear_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                               c10::string_view forward_order, c10::string_view backward_order);

// Shape-only (Meta) versions.
at::Tensor gaussian_sketch_meta(const at::Tensor& like, int64_t seed, int64_t rows, int64_t cols);
std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobi_svd_meta(const at::Tensor& a);
at::Tensor split_operand_meta(const at::Tensor& x, at::ScalarType dtype, double scale);
std::tuple<at::Tensor, at::Tensor> shifted_cholesky_meta(const at::Tensor& gram, double shift_factor,
                                                         bool check_rank, const at::Tensor& info);
at::Tensor gram_of_sum_meta(const at::Tensor& y, int64_t parts, double lo_scale);
at::Tensor split_product_meta(const at::Tensor& y, int64_t parts, double lo_scale, const at::Tensor& r_inv,
                              at::ScalarType dtype, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> cholesky_qr_meta(const at::Tensor& y, int64_t shifted_passes,
                                                                int64_t plain_passes);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rsvd_meta(const at::Tensor& a, int64_t rank,
                                                                     int64_t oversample, int64_t power_iters,
                                                                     const std::optional<at::Tensor>& project_out,
                                                                     int64_t seed, c10::string_view orthonormalize);

// Checks shared by every kernel of an op.
void check_jacobi_input(const at::Tensor& a);
void check_split_operand_input(const at::Tensor& x, at::ScalarType dtype);
void check_shifted_cholesky_input(const at::Tensor& gram, const at::Tensor& info);
// Widest basis (w columns) the split basis ops take (the CUDA kernels' limit).
constexpr int64_t kMaxSplitBasisWidth = 64;
// y (b, rows, parts * w) float32, parts 1 or 2, 1 <= w <= kMaxSplitBasisWidth; r_inv (b, w, w) float64 and the
// output dtype (bfloat16 or float16) when given.
void check_split_basis_input(const at::Tensor& y, int64_t parts, const at::Tensor* r_inv,
                             std::optional<at::ScalarType> dtype = std::nullopt);
// v = y[..., :w] + lo_scale * y[..., w:] (parts 2) or y (parts 1), float32: the value a split GEMM's output holds.
at::Tensor combined_columns(const at::Tensor& y, int64_t parts, double lo_scale);
// Tiny diagonal shift that lets an all-zero block factor (its Q is then zero), per dtype.
double cholesky_tiny_shift(at::ScalarType dtype);
void check_rsvd_input(const at::Tensor& a, int64_t rank, int64_t oversample, int64_t power_iters,
                      const std::optional<at::Tensor>& project_out, c10::string_view orthonormalize);

}  // namespace keeplora
