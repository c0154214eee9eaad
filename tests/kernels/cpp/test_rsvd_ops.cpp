// Standalone C++ test of the keeplora ops (built and run by CMake/ctest; no Python involved). Calls every op
// through the dispatcher, so it also checks the TORCH_LIBRARY registrations of the library it links.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "ops.h"

namespace {

int failures = 0;

#define EXPECT(cond, ...)                                              \
  do {                                                                 \
    if (!(cond)) {                                                     \
      ++failures;                                                      \
      std::fprintf(stderr, "FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                  \
  } while (0)

using at::Tensor;

c10::OperatorHandle op(const char* name) { return c10::Dispatcher::singleton().findSchemaOrThrow(name, ""); }

Tensor with_spectrum(int64_t b, int64_t m, int64_t n, const std::vector<double>& spectrum) {
  const int64_t k = static_cast<int64_t>(spectrum.size());
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const Tensor u = std::get<0>(at::linalg_qr(at::randn({b, m, k}, opts)));
  const Tensor v = std::get<0>(at::linalg_qr(at::randn({b, n, k}, opts)));
  const Tensor s = at::tensor(spectrum, opts);
  return at::matmul(u * s, v.mT());
}

double max_abs(const Tensor& t) { return t.abs().max().item<double>(); }

void test_registration() {
  for (const std::string& name : keeplora::op_names()) {
    const auto handle = c10::Dispatcher::singleton().findSchema({"keeplora::" + name, ""});
    EXPECT(handle.has_value());
    if (handle) EXPECT(handle->hasKernelForDispatchKey(c10::DispatchKey::CPU));
  }
}

void test_sketch() {
  auto sketch = op("keeplora::gaussian_sketch").typed<Tensor(const Tensor&, int64_t, int64_t, int64_t)>();
  const Tensor like = at::empty({0});
  const Tensor a = sketch.call(like, 42, 3001, 8);
  const Tensor b = sketch.call(like, 42, 3001, 12);
  EXPECT(at::equal(a, b.narrow(1, 0, 8)));
  EXPECT(std::abs(a.mean().item<double>()) < 0.05);
  EXPECT(std::abs(a.std().item<double>() - 1.0) < 0.05);
}

void test_jacobi() {
  auto jacobi = op("keeplora::jacobi_svd").typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&)>();
  const Tensor a = at::randn({6, 19, 19}, at::TensorOptions().dtype(at::kDouble));
  auto [u, s, v] = jacobi.call(a);
  EXPECT(max_abs(s - at::linalg_svdvals(a)) < 1e-12 * max_abs(s));
  EXPECT(max_abs(at::matmul(u * s.unsqueeze(-2), v.mT()) - a) < 1e-12 * max_abs(a) * 19);
}

void test_shifted_cholesky() {
  auto chol = op("keeplora::shifted_cholesky")
                  .typed<std::tuple<Tensor, Tensor>(const Tensor&, double, bool, const Tensor&)>();
  const Tensor y = at::randn({5, 60, 20}, at::TensorOptions().dtype(at::kDouble));
  const Tensor g = at::matmul(y.mT(), y);
  const Tensor info = at::zeros({5}, at::TensorOptions().dtype(at::kInt));
  auto [r, r_inv] = chol.call(g, 1e-12, true, info);
  const Tensor eye = at::eye(20, g.options());
  EXPECT(info.sum().item<int64_t>() == 0);
  EXPECT(at::equal(r, r.triu()));
  EXPECT(max_abs(at::matmul(r, r_inv) - eye) < 1e-12);
  EXPECT(max_abs(at::matmul(r.mT(), r) - g) < 1e-10 * max_abs(g));
}

void test_rsvd() {
  auto rsvd = op("keeplora::rsvd")
                  .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, int64_t, int64_t, int64_t,
                                                                    const std::optional<Tensor>&, int64_t,
                                                                    c10::string_view)>();
  std::vector<double> spectrum;
  for (int i = 0; i < 60; ++i) spectrum.push_back(std::pow(0.7, i));
  const Tensor a = with_spectrum(3, 100, 80, spectrum);
  const Tensor p = std::get<0>(at::linalg_qr(at::randn({3, 100, 5}, a.options())));
  // projection folded in == explicit projection, and equal to the exact SVD of the projected matrix
  auto [u, s, v, info] = rsvd.call(a, 6, 10, 4, p, 1, "cholqr");
  const Tensor explicit_a = a - at::matmul(p, at::matmul(p.mT(), a));
  const Tensor exact = at::linalg_svdvals(explicit_a).narrow(-1, 0, 6);
  EXPECT(max_abs(s - exact) < 1e-9);
  EXPECT(max_abs(at::matmul(p.mT(), u)) < 1e-12);
  EXPECT(max_abs(at::matmul(u.mT(), u) - at::eye(6, a.options())) < 1e-12);
  EXPECT(info.sum().item<int64_t>() == 0);
  // float32 and bfloat16 inputs compute in float32
  auto [u32, s32, v32, info32] = rsvd.call(a.to(at::kBFloat16), 6, 10, 4, std::nullopt, 1, "cholqr");
  EXPECT(s32.scalar_type() == at::kFloat);
  EXPECT(max_abs(s32.to(at::kDouble) - at::linalg_svdvals(a).narrow(-1, 0, 6)) < 1e-2);
}

}  // namespace

int main() {
  at::manual_seed(0);
  test_registration();
  test_sketch();
  test_jacobi();
  test_shifted_cholesky();
  test_rsvd();
  if (failures == 0) std::printf("keeplora C++ tests passed\n");
  return failures == 0 ? 0 : 1;
}
