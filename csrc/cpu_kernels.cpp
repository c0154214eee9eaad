// CPU twins of the hand-written CUDA kernels: the same per-element (sketch) and per-matrix (Jacobi, Cholesky) code from
// csrc/kernels/, run by a loop (at::parallel_for) instead of a grid.
#include <ATen/Parallel.h>

#include "kernels/cholesky.h"
#include "kernels/jacobi.h"
#include "kernels/philox.h"
#include "ops.h"

namespace keeplora {

at::Tensor gaussian_sketch_cpu(const at::Tensor& like, int64_t seed, int64_t rows, int64_t cols) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "keeplora::gaussian_sketch: rows and cols must be >= 0, got ", rows, ", ",
              cols);
  const auto dtype = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({rows, cols}, like.options().dtype(dtype));
  const int64_t total = rows * cols;
  const int64_t groups = (total + 3) / 4;
  const uint64_t useed = static_cast<uint64_t>(seed);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "gaussian_sketch_cpu", [&] {
    scalar_t* data = out.data_ptr<scalar_t>();
    at::parallel_for(0, groups, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        double z[4];
        philox::normal4(useed, static_cast<uint64_t>(g), z);
        for (int lane = 0; lane < 4; ++lane) {
          const int64_t e = 4 * g + lane;  // column-major flat index e = j * rows + i
          if (e >= total) break;
          const int64_t j = e / rows;
          const int64_t i = e - j * rows;
          data[i * cols + j] = static_cast<scalar_t>(static_cast<float>(z[lane]));
        }
      }
    });
  });
  return out;
}

void check_jacobi_input(const at::Tensor& a) {
  TORCH_CHECK(a.dim() == 3 && a.size(1) == a.size(2), "keeplora::jacobi_svd expects (b, l, l), got ", a.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
              "keeplora::jacobi_svd expects float32 or float64, got ", a.scalar_type());
  TORCH_CHECK(a.size(1) <= (1 << 20), "keeplora::jacobi_svd: l too large");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobi_svd_cpu(const at::Tensor& a) {
  check_jacobi_input(a);
  const int64_t batch = a.size(0);
  const int l = static_cast<int>(a.size(1));
  // Column-major per matrix: the row-major buffer of a^T.
  const at::Tensor a_cm = a.mT().contiguous();
  at::Tensor u_cm = at::empty_like(a_cm);
  at::Tensor v_cm = at::empty_like(a_cm);
  at::Tensor sigma = at::empty({batch, l}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "jacobi_svd_cpu", [&] {
    const scalar_t* src = a_cm.data_ptr<scalar_t>();
    scalar_t* u = u_cm.data_ptr<scalar_t>();
    scalar_t* v = v_cm.data_ptr<scalar_t>();
    scalar_t* s = sigma.data_ptr<scalar_t>();
    const int64_t ll = static_cast<int64_t>(l) * l;
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> w(ll), vv(ll), sig(l);
      std::vector<int> pos(l);
      for (int64_t k = begin; k < end; ++k) {
        jacobi::svd_serial<scalar_t>(src + k * ll, l, w.data(), vv.data(), sig.data(), pos.data(), u + k * ll,
                                     s + k * l, v + k * ll);
      }
    });
  });
  return {u_cm.mT(), sigma, v_cm.mT()};
}

void check_split_operand_input(const at::Tensor& x, at::ScalarType dtype) {
  TORCH_CHECK(x.dim() == 3, "keeplora::split_operand expects x of shape (b, c, w), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "keeplora::split_operand expects float32 or float64 x, got ", x.scalar_type());
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf,
              "keeplora::split_operand: dtype must be bfloat16 or float16, got ", dtype);
}

// The element-wise formula in library calls (the CUDA kernel does it in one pass with the same rounding).
at::Tensor split_operand_cpu(const at::Tensor& x, at::ScalarType dtype, double scale) {
  check_split_operand_input(x, dtype);
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor hi = xf.to(dtype);
  const at::Tensor lo = xf.sub(hi.to(at::kFloat)).mul_(scale).to(dtype);
  return at::cat({hi, lo}, -1);
}

void check_split_basis_input(const at::Tensor& y, int64_t parts, const at::Tensor* r_inv,
                             std::optional<at::ScalarType> dtype) {
  TORCH_CHECK(parts == 1 || parts == 2, "keeplora split basis ops: parts must be 1 or 2, got ", parts);
  TORCH_CHECK(y.dim() == 3 && y.scalar_type() == at::kFloat && y.size(2) % parts == 0,
              "keeplora split basis ops expect float32 y of shape (b, rows, parts * w), got ", y.scalar_type(), " ",
              y.sizes());
  const int64_t w = y.size(2) / parts;
  TORCH_CHECK(w >= 1 && w <= kMaxSplitBasisWidth, "keeplora split basis ops: w must be in [1, ",
              kMaxSplitBasisWidth, "], got ", w);
  if (r_inv != nullptr) {
    TORCH_CHECK(r_inv->dim() == 3 && r_inv->size(0) == y.size(0) && r_inv->size(1) == w && r_inv->size(2) == w &&
                    r_inv->scalar_type() == at::kDouble,
                "keeplora::split_product expects float64 r_inv of shape (", y.size(0), ", ", w, ", ", w, "), got ",
                r_inv->scalar_type(), " ", r_inv->sizes());
    TORCH_CHECK(r_inv->device() == y.device(), "keeplora::split_product: r_inv is on ", r_inv->device(),
                " but y on ", y.device());
  }
  TORCH_CHECK(!dtype || *dtype == at::kBFloat16 || *dtype == at::kHalf,
              "keeplora::split_product: dtype must be bfloat16 or float16, got ", *dtype);
}

at::Tensor combined_columns(const at::Tensor& y, int64_t parts, double lo_scale) {
  const int64_t w = y.size(2) / parts;
  return parts == 2 ? y.narrow(-1, 0, w).add(y.narrow(-1, w, w), lo_scale) : y;
}

// The formulas in library calls (the CUDA kernels read y once each, in the same arithmetic but another summation
// order).
at::Tensor gram_of_sum_cpu(const at::Tensor& y, int64_t parts, double lo_scale) {
  check_split_basis_input(y, parts, nullptr);
  const at::Tensor v = combined_columns(y, parts, lo_scale).to(at::kDouble);
  return at::matmul(v.mT(), v);
}

at::Tensor split_product_cpu(const at::Tensor& y, int64_t parts, double lo_scale, const at::Tensor& r_inv,
                             at::ScalarType dtype, double scale) {
  check_split_basis_input(y, parts, &r_inv, dtype);
  const at::Tensor q = at::matmul(combined_columns(y, parts, lo_scale).to(at::kDouble), r_inv);
  return split_operand_cpu(q, dtype, scale);
}

double cholesky_tiny_shift(at::ScalarType dtype) { return dtype == at::kDouble ? 1e-290 : 1e-30; }

void check_shifted_cholesky_input(const at::Tensor& gram, const at::Tensor& info) {
  TORCH_CHECK(gram.dim() == 3 && gram.size(1) == gram.size(2), "keeplora::shifted_cholesky expects gram of shape ",
              "(b, l, l), got ", gram.sizes());
  TORCH_CHECK(gram.scalar_type() == at::kFloat || gram.scalar_type() == at::kDouble,
              "keeplora::shifted_cholesky expects float32 or float64, got ", gram.scalar_type());
  TORCH_CHECK(gram.size(1) <= (1 << 15), "keeplora::shifted_cholesky: l too large");
  TORCH_CHECK(info.dim() == 1 && info.size(0) == gram.size(0) && info.scalar_type() == at::kInt &&
                  info.is_contiguous(),
              "keeplora::shifted_cholesky expects info to be a contiguous int32 tensor of shape (", gram.size(0),
              ",), got ", info.scalar_type(), " ", info.sizes());
  TORCH_CHECK(info.device() == gram.device(), "keeplora::shifted_cholesky: info is on ", info.device(),
              " but gram on ", gram.device());
}

std::tuple<at::Tensor, at::Tensor> shifted_cholesky_cpu(const at::Tensor& gram, double shift_factor,
                                                        bool check_rank, const at::Tensor& info) {
  check_shifted_cholesky_input(gram, info);
  const at::Tensor g = gram.contiguous();
  at::Tensor r = at::empty_like(g);
  at::Tensor x = at::empty_like(g);
  const int64_t batch = g.size(0);
  const int l = static_cast<int>(g.size(1));
  const int64_t ll = static_cast<int64_t>(l) * l;
  int* flags = info.data_ptr<int>();
  const double tiny = cholesky_tiny_shift(g.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "shifted_cholesky_cpu", [&] {
    const scalar_t* src = g.data_ptr<scalar_t>();
    scalar_t* rp = r.data_ptr<scalar_t>();
    scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        flags[k] |= cholesky::factor_serial<scalar_t>(src + k * ll, l, static_cast<scalar_t>(shift_factor),
                                                      static_cast<scalar_t>(tiny), check_rank, rp + k * ll,
                                                      xp + k * ll);
      }
    });
  });
  return {r, x};
}

}  // namespace keeplora
