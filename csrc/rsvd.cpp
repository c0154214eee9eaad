// Batched randomized SVD with an implicit residual projection (the energy-rule loops that call it are Python:
// keeplora_kernels/sketch_growth.py).
//
// Device-generic: only ATen calls plus two ops reached through the dispatcher (keeplora::gaussian_sketch and,
// on CUDA, keeplora::jacobi_svd), so the same code is the CPU kernel and the CUDA kernel of `rsvd`. On CUDA it
// never reads a device value on the host (see csrc/README.md, "Host synchronisation").
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/version.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <tuple>

#include "ops.h"

namespace keeplora {
namespace {

using at::Tensor;

constexpr double kUnitRoundoff64 = 1.1102230246251565e-16;  // 2^-53
// Largest core size for which CUDA uses the Jacobi kernel (one block per matrix); larger ones use linalg_svd.
constexpr int64_t kJacobiMaxCuda = 256;

// ---------------------------------------------------------------------------------------------------------------
// Ops reached through the dispatcher so the device-specific kernel runs.

Tensor gaussian_sketch(const Tensor& like, int64_t seed, int64_t rows, int64_t cols) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("keeplora::gaussian_sketch", "")
                       .typed<Tensor(const Tensor&, int64_t, int64_t, int64_t)>();
  return op.call(like, seed, rows, cols);
}

// x (b, c, w) float32/float64 -> [hi | lo] (b, c, 2w) in `dtype` with x ~ hi + lo / scale.
Tensor split_operand(const Tensor& x, at::ScalarType dtype, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("keeplora::split_operand", "")
                       .typed<Tensor(const Tensor&, at::ScalarType, double)>();
  return op.call(x, dtype, scale);
}

Tensor gram_of_sum(const Tensor& y, int64_t parts, double lo_scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("keeplora::gram_of_sum", "")
                       .typed<Tensor(const Tensor&, int64_t, double)>();
  return op.call(y, parts, lo_scale);
}

Tensor split_product(const Tensor& y, int64_t parts, double lo_scale, const Tensor& r_inv, at::ScalarType dtype,
                     double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("keeplora::split_product", "")
                       .typed<Tensor(const Tensor&, int64_t, double, const Tensor&, at::ScalarType, double)>();
  return op.call(y, parts, lo_scale, r_inv, dtype, scale);
}

std::tuple<Tensor, Tensor, Tensor> jacobi_svd(const Tensor& a) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("keeplora::jacobi_svd", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&)>();
  return op.call(a);
}

std::tuple<Tensor, Tensor, Tensor> gesvdj_batched(const Tensor& a) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("keeplora::gesvdj_batched", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&)>();
  return op.call(a);
}

// The small-SVD launcher on CUDA (small_svd_method()): 0 = the Jacobi kernel, 1 = cuSOLVER gesvdjBatched.
std::atomic<int> g_small_svd{-1};  // -1: KEEPLORA_SMALL_SVD not read yet

int parse_small_svd(const std::string& method, const char* source) {
  TORCH_CHECK(method == "jacobi" || method == "cusolver", source, " must be 'jacobi' or 'cusolver', got '", method,
              "'");
  return method == "cusolver" ? 1 : 0;
}

int small_svd_choice() {
  int choice = g_small_svd.load();
  if (choice < 0) {
    const char* env = std::getenv("KEEPLORA_SMALL_SVD");
    const int parsed = env == nullptr || *env == '\0' ? 0 : parse_small_svd(env, "KEEPLORA_SMALL_SVD");
    g_small_svd.compare_exchange_strong(choice, parsed);  // a concurrent setter wins
    choice = g_small_svd.load();
  }
  return choice;
}

// SVD of the small fp64 cores m (b, l, l) = U diag(S) V^T. CPU: LAPACK (no synchronisation concern on the host).
// CUDA: the batched Jacobi kernel, which needs no host round trip (torch.linalg.svd checks its info on the host),
// or for l <= 32 with small_svd_method() == "cusolver" cuSOLVER's gesvdjBatched (no host round trip either).
std::tuple<Tensor, Tensor, Tensor> small_svd(const Tensor& m) {
  if (m.is_cuda() && m.size(-1) <= kGesvdjMaxSize && m.size(0) > 0 && small_svd_choice() == 1) {
    return gesvdj_batched(m);
  }
  if (m.is_cuda() && m.size(-1) <= kJacobiMaxCuda) return jacobi_svd(m);
  auto [u, s, vh] = at::linalg_svd(m, /*full_matrices=*/false);
  return {u, s, vh.mT()};
}

// ---------------------------------------------------------------------------------------------------------------
// Orthonormalisation.

struct Factor {
  Tensor q;     // (b, m, l) float64
  Tensor r;     // (b, l, l) float64 upper triangular, y = q r (only when requested)
};

// One pass's l x l step through the dispatcher (CPU twin or the CUDA kernel): R and R^-1 of G + s I with
// s = factor tr(G) + tiny, failure and (with check_rank) rank-loss bits or-ed into `info` in place.
std::tuple<Tensor, Tensor> shifted_cholesky(const Tensor& g, double factor, bool check_rank, const Tensor& info) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("keeplora::shifted_cholesky", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, double, bool, const Tensor&)>();
  return op.call(g, factor, check_rank, info);
}

// The same step in library calls, for l beyond the one-block kernel: cholesky_ex, a triangular solve against I,
// a failed factorisation replaced by the identity, the rank check through the same identity as the kernel.
std::tuple<Tensor, Tensor> shifted_cholesky_library(const Tensor& gram, double factor, bool check_rank,
                                                    const Tensor& info) {
  const int64_t b = gram.size(0), l = gram.size(1);
  Tensor g = gram.clone();
  Tensor diag = g.diagonal(0, -2, -1);
  const Tensor s = diag.sum(-1, /*keepdim=*/true).mul(factor).add(cholesky_tiny_shift(g.scalar_type()));
  diag.add_(s);
  auto [r, failed] = at::linalg_cholesky_ex(g, /*upper=*/true, /*check_errors=*/false);
  const Tensor eye = at::eye(l, r.options()).expand({b, l, l});
  Tensor x = at::linalg_solve_triangular(r, eye, /*upper=*/true, /*left=*/true);
  const Tensor bad = failed.ne(0).view({b, 1, 1});
  r = at::where(bad, eye, r);
  x = at::where(bad, eye, x);
  Tensor bits = failed.ne(0).to(at::kInt);
  if (check_rank) {
    const Tensor lost = at::rsub(x.square().sum(-2).mul(s), 1.0).lt(0.5).any(-1);
    bits.bitwise_or_(lost.logical_and(failed.eq(0)).to(at::kInt).mul(2));
  }
  info.bitwise_or_(bits);
  return {r, x};
}

// G = Q^T Q for q (b, m, l). On CUDA, cuBLAS runs this batched GEMM with its small l x l output as one CTA per
// matrix looping over all m rows, far below its bandwidth, so the rows are split into chunks that become extra
// batch entries (more CTAs), and the chunk Grams are summed.
Tensor gram(const Tensor& q) {
  const int64_t b = q.size(0), m = q.size(1), l = q.size(2);
  int64_t chunks = 1;
  if (q.is_cuda()) {
    const int64_t min_rows = std::max<int64_t>(l, 128);
    while (chunks < 16 && b * chunks < 256 && m % (2 * chunks) == 0 && m / (2 * chunks) >= min_rows) chunks *= 2;
  }
  if (chunks == 1) return at::matmul(q.mT(), q);
  const Tensor parts = q.reshape({b * chunks, m / chunks, l});
  return at::matmul(parts.mT(), parts).view({b, chunks, l, l}).sum(1);
}

// Largest l for which the one-block shifted_cholesky kernel is used (as for the Jacobi kernel).
constexpr int64_t kFusedCholeskyMax = 256;

// The shift factor of a shifted CholeskyQR pass on an m x l block (s = factor tr(G); see cholesky_qr_fp64).
double safe_shift_factor(int64_t m, int64_t l) {
  return 11.0 * (static_cast<double>(m) * l + static_cast<double>(l) * (l + 1)) * kUnitRoundoff64;
}

// Shifted CholeskyQR in float64 on batched GEMMs. Each pass: G = Q^T Q, G += s I, R = chol(G), Q <- Q R^-1.
// The first `shifted` passes use s = 11 (m l + l (l + 1)) u tr(G), the shift with which the factorisation
// provably succeeds for any finite input (Fukaya, Kannan, Nakatsukasa, Yamamoto, Yanagisawa 2020); the remaining
// passes use s = u tr(G), which only keeps an exactly zero column from failing. The shift changes how orthonormal
// a pass leaves Q, never the identity y = Q R; the later passes restore orthonormality (CholeskyQR2).
// Per pass: two GEMMs and one shifted_cholesky launch. `info` (b,) int32 is or-ed in place: bit 1 a
// factorisation failed, bit 2 (checked in the last pass, with `check_rank`) a column of Q lost rank.
Factor cholesky_qr_fp64(const Tensor& y, int64_t shifted, int64_t plain, bool want_r, const Tensor& info,
                        bool check_rank = true) {
  Tensor q = y.to(at::kDouble);
  const int64_t b = y.size(0), m = y.size(1), l = y.size(2);
  Tensor r_total;
  if (l == 0) return {q, at::zeros({b, 0, 0}, q.options())};
  const double c_shift = safe_shift_factor(m, l);
  const int64_t passes = shifted + plain;
  for (int64_t pass = 0; pass < passes; ++pass) {
    const Tensor g = gram(q);
    const double factor = pass < shifted ? c_shift : kUnitRoundoff64;
    const bool last = pass + 1 == passes;
    // Q R^-1 as a GEMM with the explicit l x l inverse: batched GEMMs run near peak on both devices, batched
    // triangular solves do not. R is well conditioned after the shifted pass, so the explicit inverse costs no
    // accuracy that the next pass does not restore.
    auto [r, r_inv] = l <= kFusedCholeskyMax ? shifted_cholesky(g, factor, last && check_rank, info)
                                             : shifted_cholesky_library(g, factor, last && check_rank, info);
    q = at::matmul(q, r_inv);
    if (want_r) r_total = r_total.defined() ? at::matmul(r, r_total) : r;
  }
  return {q, r_total};
}

Factor householder_qr_fp64(const Tensor& y, bool want_r) {
  auto [q, r] = at::linalg_qr(y.to(at::kDouble), "reduced");
  return {q, want_r ? r : Tensor()};
}

int64_t shifted_passes(at::ScalarType compute) { return compute == at::kDouble ? 2 : 1; }
int64_t plain_passes(at::ScalarType compute) { return compute == at::kDouble ? 2 : 1; }

// Orthonormal basis of the columns of y (b, m, l), m >= l. "cholqr": shifted CholeskyQR2 (fp32 data) or
// CholeskyQR4 (fp64 data), flags or-ed into `info`. On CPU the matrices this call flags are redone by Householder
// QR (the flag costs nothing to read there); on CUDA reading it would synchronise, so it is only accumulated.
// `intermediate` (the power iterations' bases before the last one): one shifted pass and no rank check. That
// basis only feeds the next product, so it needs the right span and a modest condition number, not orthonormality
// to working precision: one shifted pass leaves kappa(Q) ~ sqrt(11 m l u) kappa(y), near 1 for any y float32
// data can produce, and the final CholeskyQR2 restores orthonormality. A rank-deficient block is flagged there.
Factor orthonormalize(const Tensor& y, at::ScalarType compute, bool householder, bool want_r, const Tensor& info,
                      bool intermediate = false) {
  if (householder) return householder_qr_fp64(y, want_r);
  const int64_t shifted = intermediate ? 1 : shifted_passes(compute);
  const int64_t plain = intermediate ? 0 : plain_passes(compute);
  if (y.is_cuda()) return cholesky_qr_fp64(y, shifted, plain, want_r, info, !intermediate);
  const Tensor flags = at::zeros({y.size(0)}, y.options().dtype(at::kInt));
  Factor f = cholesky_qr_fp64(y, shifted, plain, want_r, flags, !intermediate);
  info.bitwise_or_(flags);
  const Tensor bad = flags.nonzero().flatten();
  if (bad.numel() > 0) {
    Factor redo = householder_qr_fp64(y.index_select(0, bad), want_r);
    f.q = f.q.index_copy(0, bad, redo.q);
    if (want_r) f.r = f.r.index_copy(0, bad, redo.r);
  }
  return f;
}

// ---------------------------------------------------------------------------------------------------------------
// The operator A_hat = (I - P P^T) a, applied without forming it.

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define KEEPLORA_HAVE_BMM_OUT_DTYPE 1
#else
#define KEEPLORA_HAVE_BMM_OUT_DTYPE 0
#endif

// Whether bf16/fp16 x bf16/fp16 -> fp32 batched GEMMs (aten::bmm.dtype) work here; set to false on first failure.
std::atomic<bool> g_out_dtype_gemm_ok{true};

struct Residual {
  Tensor a;          // (b, m, n): compute dtype, or bf16/fp16 when `split` (CUDA)
  Tensor p;          // (b, m, k) compute dtype, or undefined (no projection)
  at::ScalarType cd;  // compute dtype (float32 or float64)
  bool split = false;

  // The split operand's scale: x = hi + lo / scale, lo's exponent range in the matrix's dtype.
  double split_scale() const { return a.scalar_type() == at::kHalf ? 2048.0 : 256.0; }

  // mat (b, r, c) times x (b, c, w), result in the compute dtype.
  Tensor gemm(const Tensor& mat, const Tensor& x) const {
    if (!split) return at::matmul(mat, x.to(cd));
    // Low-precision matrix, float32/float64 operand: x = hi + lo / scale with hi, lo in the matrix's dtype
    // (one split_operand launch); one GEMM on [hi | lo] with float32 accumulation and output reads the matrix
    // once and keeps ~16 mantissa bits of x.
    const double scale = split_scale();
    return combined_columns(gemm_split(mat, split_operand(x, mat.scalar_type(), scale)), 2, 1.0 / scale);
  }

  // mat (b, r, c) times an operand already split, xs (b, c, 2w) [hi | lo]: the float32 output (b, r, 2w).
  Tensor gemm_split(const Tensor& mat, const Tensor& xs) const {
#if KEEPLORA_HAVE_BMM_OUT_DTYPE
    return at::bmm(mat, xs, at::kFloat);
#else
    TORCH_CHECK(false, "keeplora::rsvd: internal error, split GEMM without aten::bmm.dtype");
#endif
  }

  Tensor project(const Tensor& y) const {  // y - P (P^T y)
    if (!p.defined()) return y;
    return at::baddbmm(y, p, at::bmm(p.mT(), y), /*beta=*/1, /*alpha=*/-1);
  }

  Tensor times(const Tensor& x) const { return project(gemm(a, x)); }           // A_hat x
  Tensor t_times(const Tensor& y) const {  // A_hat^T y (gemm converts y itself when there is no projection)
    return gemm(a.mT(), p.defined() ? project(y.to(cd)) : y);
  }

  // A_hat Omega for the sketch omega (n, w), shared by every matrix of the batch.
  Tensor sketch(const Tensor& omega) const {
    if (!split) return project(at::matmul(a, omega.to(cd)));
#if KEEPLORA_HAVE_BMM_OUT_DTYPE
    // A Gaussian sketch needs no extra precision: use it in the matrix's dtype directly.
    const Tensor om = omega.to(a.scalar_type()).unsqueeze(0).expand({a.size(0), omega.size(0), omega.size(1)});
    return project(at::bmm(a, om.contiguous(), at::kFloat));
#else
    return Tensor();
#endif
  }

  Tensor dense() const { return project(a.to(cd)); }  // A_hat itself (exact path only)
};

Residual make_residual(const Tensor& a, const std::optional<Tensor>& project_out, at::ScalarType cd) {
  Residual op;
  op.cd = cd;
  if (project_out.has_value() && project_out->defined() && project_out->size(-1) > 0) {
    op.p = project_out->to(cd);
  }
  const bool low = a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf;
  op.split = low && a.is_cuda() && KEEPLORA_HAVE_BMM_OUT_DTYPE && g_out_dtype_gemm_ok.load();
  op.a = op.split ? a : a.to(cd);
  return op;
}

using RsvdResult = std::tuple<Tensor, Tensor, Tensor, Tensor>;

// Whether the range finder keeps its intermediate bases as split operands (fused_range_finder): CUDA with a split
// GEMM, no projection, cholqr, l within the split basis ops' width, power iterations to run, and
// KEEPLORA_RSVD_FUSED_BASIS=1 (read at every call: an A/B switch until a GPU run decides the default).
bool use_fused_basis(const Residual& op, int64_t l, int64_t power_iters, bool householder) {
  const char* env = std::getenv("KEEPLORA_RSVD_FUSED_BASIS");
  return env != nullptr && std::string(env) == "1" && op.split && !op.p.defined() && !householder &&
         power_iters > 0 && l <= kMaxSplitBasisWidth;
}

// The range finder's power iterations with each intermediate basis kept as the split operand of the next GEMM:
// a GEMM's float32 output y gives the Gram of its one shifted CholeskyQR pass (gram_of_sum) and then, times R^-1,
// the next operand (split_product), where orthonormalize would write Q in float64 and split_operand read it again
// (the same formulas: the shift, float32 rounding before the split). Returns A_hat z for the last z, in float32, for
// orthonormalize to finish as on the library path.
Tensor fused_range_finder(const Residual& op, const Tensor& omega, int64_t power_iters, const Tensor& info) {
  const auto lowp = op.a.scalar_type();
  const double scale = op.split_scale(), lo_scale = 1.0 / scale;
  auto next_operand = [&](const Tensor& y, int64_t parts) {
    const double factor = safe_shift_factor(y.size(1), y.size(2) / parts);
    auto [r, r_inv] = shifted_cholesky(gram_of_sum(y, parts, lo_scale), factor, false, info);
    return split_product(y, parts, lo_scale, r_inv, lowp, scale);
  };
  Tensor xs = next_operand(op.sketch(omega), 1);
  Tensor y2;
  for (int64_t it = 0; it < power_iters; ++it) {
    y2 = op.gemm_split(op.a, next_operand(op.gemm_split(op.a.mT(), xs), 2));
    if (it + 1 < power_iters) xs = next_operand(y2, 2);
  }
  return combined_columns(y2, 2, lo_scale);
}

RsvdResult rsvd_impl(const Residual& op, int64_t rank, int64_t oversample, int64_t power_iters, int64_t seed,
                     bool householder) {
  const Tensor& a = op.a;
  const int64_t b = a.size(0), m = a.size(1), n = a.size(2);
  const int64_t mn = std::min(m, n);
  const int64_t l = std::min(rank + oversample, mn);
  const Tensor info = at::zeros({b}, a.options().dtype(at::kInt));
  auto orth = [&](const Tensor& y, bool want_r, bool intermediate = false) {
    return orthonormalize(y, op.cd, householder, want_r, info, intermediate);
  };

  // 1. Range finder: Q (b, m, l) float64 with orthonormal columns spanning (approximately) the top of range(A_hat).
  //    Every basis but the last only feeds the next product: one shifted CholeskyQR pass each (orthonormalize).
  Tensor q64;
  if (l < mn) {
    const Tensor omega = gaussian_sketch(a, seed, n, l);  // (n, l), identical on every device
    if (use_fused_basis(op, l, power_iters, householder)) {
      q64 = orth(fused_range_finder(op, omega, power_iters, info), false).q;
    } else {
      q64 = orth(op.sketch(omega), false, power_iters > 0).q;
      for (int64_t it = 0; it < power_iters; ++it) {
        const Tensor z = orth(op.t_times(q64), false, true).q;
        q64 = orth(op.times(z), false, it + 1 < power_iters).q;
      }
    }
  } else if (n <= m) {  // the sketch would span R^n: orthonormalise A_hat itself (exact)
    q64 = orth(op.dense(), false).q;
  } else {  // l = m: R^m itself is the range
    q64 = at::eye(m, a.options().dtype(at::kDouble)).expand({b, m, m});
  }

  // 2. Rayleigh-Ritz: B = Q^T A_hat (l x n). Factor B^T = Q2 R (n x l), then B = R^T Q2^T and the small SVD of
  //    R^T (l x l) = Us diag(S) Ws^T gives A_hat ~ (Q Us) diag(S) (Q2 Ws)^T with both factors orthonormal.
  const Tensor bt = op.t_times(q64);
  const Factor f2 = orth(bt, true);
  auto [us, s, ws] = small_svd(f2.r.mT());
  const Tensor u = at::matmul(q64, us.narrow(-1, 0, rank)).to(op.cd);
  const Tensor v = at::matmul(f2.q, ws.narrow(-1, 0, rank)).to(op.cd);
  return {u, s.narrow(-1, 0, rank).to(op.cd), v, info};
}

at::ScalarType compute_dtype(const Tensor& a) { return a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// rsvd_impl on A_hat = (I - P P^T) a; a low-precision CUDA matrix is read as is through the split GEMM, and if
// aten::bmm.dtype turns out to be unavailable there, the matrix is converted to float32 once instead.
RsvdResult run_rsvd(const Tensor& a, const std::optional<Tensor>& p, at::ScalarType cd, int64_t rank,
                    int64_t oversample, int64_t power_iters, int64_t seed, bool householder) {
  Residual op = make_residual(a, p, cd);
  if (op.split) {
    try {
      return rsvd_impl(op, rank, oversample, power_iters, seed, householder);
    } catch (const c10::Error&) {
      g_out_dtype_gemm_ok.store(false);
      op = make_residual(a, p, cd);
    }
  }
  return rsvd_impl(op, rank, oversample, power_iters, seed, householder);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Ops.

void check_rsvd_input(const Tensor& a, int64_t rank, int64_t oversample, int64_t power_iters,
                      const std::optional<Tensor>& project_out, c10::string_view orthonormalize) {
  TORCH_CHECK(a.dim() == 3, "keeplora::rsvd expects a of shape (b, m, n), got ", a.sizes());
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), "keeplora::rsvd expects a floating dtype, got ",
              a.scalar_type());
  const int64_t mn = std::min(a.size(1), a.size(2));
  TORCH_CHECK(rank >= 1 && rank <= mn, "keeplora::rsvd: rank must be in [1, min(m, n)] = [1, ", mn, "], got ",
              rank);
  TORCH_CHECK(oversample >= 0 && power_iters >= 0, "keeplora::rsvd: oversample and power_iters must be >= 0");
  TORCH_CHECK(orthonormalize == "cholqr" || orthonormalize == "householder",
              "keeplora::rsvd: orthonormalize must be 'cholqr' or 'householder', got '", std::string(orthonormalize),
              "'");
  if (project_out.has_value() && project_out->defined()) {
    const Tensor& p = *project_out;
    TORCH_CHECK(p.dim() == 3 && p.size(0) == a.size(0) && p.size(1) == a.size(1),
                "keeplora::rsvd: project_out must be (b, m, k) = (", a.size(0), ", ", a.size(1), ", k), got ",
                p.sizes());
    TORCH_CHECK(p.device() == a.device(), "keeplora::rsvd: project_out is on ", p.device(), " but a is on ",
                a.device());
    TORCH_CHECK(at::isFloatingType(p.scalar_type()), "keeplora::rsvd: project_out must be floating");
  }
}

std::string small_svd_method() { return small_svd_choice() == 1 ? "cusolver" : "jacobi"; }

void set_small_svd_method(const std::string& method) {
  g_small_svd.store(parse_small_svd(method, "keeplora small-SVD method"));
}

std::tuple<Tensor, Tensor, Tensor> cholesky_qr(const Tensor& y, int64_t shifted_passes, int64_t plain_passes) {
  TORCH_CHECK(y.dim() == 3 && y.size(1) >= y.size(2), "keeplora::cholesky_qr expects y of shape (b, m, l) with ",
              "m >= l, got ", y.sizes());
  TORCH_CHECK(at::isFloatingType(y.scalar_type()), "keeplora::cholesky_qr expects a floating dtype");
  TORCH_CHECK(shifted_passes >= 0 && plain_passes >= 0 && shifted_passes + plain_passes >= 1,
              "keeplora::cholesky_qr needs at least one pass");
  at::NoGradGuard no_grad;
  const Tensor info = at::zeros({y.size(0)}, y.options().dtype(at::kInt));
  Factor f = cholesky_qr_fp64(y.detach(), shifted_passes, plain_passes, true, info);
  return {f.q, f.r, info};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> rsvd(const Tensor& a, int64_t rank, int64_t oversample,
                                                int64_t power_iters, const std::optional<Tensor>& project_out,
                                                int64_t seed, c10::string_view orthonormalize) {
  check_rsvd_input(a, rank, oversample, power_iters, project_out, orthonormalize);
  at::NoGradGuard no_grad;
  const bool householder = orthonormalize == "householder";
  const at::ScalarType cd = compute_dtype(a);
  std::optional<Tensor> p;
  if (project_out.has_value() && project_out->defined()) p = project_out->detach();
  return run_rsvd(a.detach(), p, cd, rank, oversample, power_iters, seed, householder);
}

// ---------------------------------------------------------------------------------------------------------------
// Meta (shape-only) kernels.

std::tuple<Tensor, Tensor, Tensor, Tensor> rsvd_meta(const Tensor& a, int64_t rank, int64_t oversample,
                                                     int64_t power_iters, const std::optional<Tensor>& project_out,
                                                     int64_t seed, c10::string_view orthonormalize) {
  check_rsvd_input(a, rank, oversample, power_iters, project_out, orthonormalize);
  const auto opts = a.options().dtype(compute_dtype(a));
  const int64_t b = a.size(0), m = a.size(1), n = a.size(2);
  return {at::empty({b, m, rank}, opts), at::empty({b, rank}, opts), at::empty({b, n, rank}, opts),
          at::empty({b}, a.options().dtype(at::kInt))};
}

std::tuple<Tensor, Tensor, Tensor> cholesky_qr_meta(const Tensor& y, int64_t, int64_t) {
  TORCH_CHECK(y.dim() == 3 && y.size(1) >= y.size(2), "keeplora::cholesky_qr expects (b, m, l) with m >= l");
  const auto opts = y.options().dtype(at::kDouble);
  return {at::empty(y.sizes(), opts), at::empty({y.size(0), y.size(2), y.size(2)}, opts),
          at::empty({y.size(0)}, y.options().dtype(at::kInt))};
}

Tensor gaussian_sketch_meta(const Tensor& like, int64_t, int64_t rows, int64_t cols) {
  const auto dtype = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::empty({rows, cols}, like.options().dtype(dtype));
}

Tensor split_operand_meta(const Tensor& x, at::ScalarType dtype, double) {
  check_split_operand_input(x, dtype);
  return at::empty({x.size(0), x.size(1), 2 * x.size(2)}, x.options().dtype(dtype));
}

Tensor gram_of_sum_meta(const Tensor& y, int64_t parts, double) {
  check_split_basis_input(y, parts, nullptr);
  const int64_t w = y.size(2) / parts;
  return at::empty({y.size(0), w, w}, y.options().dtype(at::kDouble));
}

Tensor split_product_meta(const Tensor& y, int64_t parts, double, const Tensor& r_inv, at::ScalarType dtype, double) {
  check_split_basis_input(y, parts, &r_inv, dtype);
  return at::empty({y.size(0), y.size(1), 2 * (y.size(2) / parts)}, y.options().dtype(dtype));
}

std::tuple<Tensor, Tensor> shifted_cholesky_meta(const Tensor& gram, double, bool, const Tensor& info) {
  check_shifted_cholesky_input(gram, info);
  return {at::empty(gram.sizes(), gram.options()), at::empty(gram.sizes(), gram.options())};
}

std::tuple<Tensor, Tensor, Tensor> jacobi_svd_meta(const Tensor& a) {
  check_jacobi_input(a);
  return {at::empty(a.sizes(), a.options()), at::empty({a.size(0), a.size(1)}, a.options()),
          at::empty(a.sizes(), a.options())};
}

}  // namespace keeplora
