// The frozen-A LoRA linear as one registered op with its backward in C++: y = x W^T + b + scale (x A^T) B^T, W and A
// frozen, only s = x A^T (T x r) saved. The same GEMMs in the same orders as the Python LoRALinearFunction
// (keeplora_kernels/lora_linear.py, which stays the reference and the path torch.compile traces); here the whole
// forward is one dispatcher call from Python and the backward runs in the autograd engine without entering Python,
// which is what the host-bound small layers (T x 768) pay for. Device-generic: ATen calls only, so one kernel
// serves CPU, CUDA and Meta.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops.h"

namespace keeplora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool expand_first(c10::string_view order, const char* which) {
  if (order == "expand_first") return true;
  TORCH_CHECK(order == "base_first", "lora_linear: ", which, " must be 'base_first' or 'expand_first', got '",
              std::string(order), "'");
  return false;
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& lora_a, const at::Tensor& lora_b) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && lora_a.dim() == 2 && lora_b.dim() == 2,
              "lora_linear: x must be (..., d_in), weight (d_out, d_in), lora_a (r, d_in), lora_b (d_out, r)");
  const auto d_in = x.size(-1), d_out = weight.size(0), r = lora_a.size(0);
  TORCH_CHECK(weight.size(1) == d_in && lora_a.size(1) == d_in && lora_b.size(0) == d_out && lora_b.size(1) == r,
              "lora_linear: shapes do not match: x ", x.sizes(), ", weight ", weight.sizes(), ", lora_a ",
              lora_a.sizes(), ", lora_b ", lora_b.sizes());
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == d_out),
              "lora_linear: bias must be (", d_out, ",)");
}

// Y (T x d_out) and s = X A^T; a and b are the adapters cast to X's dtype.
std::tuple<at::Tensor, at::Tensor> forward_gemms(const at::Tensor& x2, const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& bias, const at::Tensor& a,
                                                 const at::Tensor& b, double scale, bool expand) {
  auto s = at::mm(x2, a.t());
  at::Tensor y2;
  if (expand) {  // Y = b + scale s B^T first; the base GEMM then reads it as its C operand
    if (bias.has_value()) {
      y2 = at::addmm(bias->to(x2.scalar_type()), s, b.t(), 1, scale);
    } else {
      y2 = at::empty({x2.size(0), weight.size(0)}, x2.options());
      y2.addmm_(s, b.t(), 0, scale);  // beta = 0: the uninitialised Y is not read
    }
    y2.addmm_(x2, weight.t());
  } else {
    y2 = bias.has_value() ? at::addmm(bias->to(x2.scalar_type()), x2, weight.t()) : at::mm(x2, weight.t());
    y2.addmm_(s, b.t(), 1, scale);
  }
  return {y2, s};
}

std::vector<int64_t> output_shape(const at::Tensor& x, int64_t d_out) {
  auto shape = x.sizes().vec();
  shape.back() = d_out;
  return shape;
}

// aten::mm.dtype (16-bit inputs, fp32 output in one tensor-core GEMM) where this torch has a CUDA kernel for it;
// looked up at run time so the library builds against torch versions without the overload.
std::optional<c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, at::ScalarType)>>
mixed_dtype_mm() {
  static const auto op = []() -> std::optional<
                                  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                                      at::ScalarType)>> {
    const auto handle = c10::Dispatcher::singleton().findSchema({"aten::mm", "dtype"});
    if (!handle || !handle->hasKernelForDispatchKey(c10::DispatchKey::CUDA)) return std::nullopt;
    return handle->typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::ScalarType)>();
  }();
  return op;
}

// scale dY^T s in out_dtype; one fp32-output GEMM on CUDA for 16-bit inputs (no rounding of dB to 16 bits), as the
// Python path does.
at::Tensor scaled_outer(const at::Tensor& dy2, const at::Tensor& s, double scale, at::ScalarType out_dtype) {
  const bool low = dy2.scalar_type() == at::kBFloat16 || dy2.scalar_type() == at::kHalf;
  if (out_dtype == at::kFloat && low && dy2.is_cuda() && s.scalar_type() == dy2.scalar_type()) {
    if (const auto op = mixed_dtype_mm()) return op->call(dy2.t(), s, at::kFloat).mul_(scale);
  }
  return at::mm(dy2.t(), s).mul_(scale).to(out_dtype);
}

class LoRALinearFn : public torch::autograd::Function<LoRALinearFn> {
 public:
  // bias is a 0-element tensor when absent: an empty optional or an undefined tensor is not a usable input of the
  // graph node
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                            c10::string_view forward_order, c10::string_view backward_order) {
    const bool expand_bwd = expand_first(backward_order, "backward_order");
    const auto x2 = x.reshape({-1, x.size(-1)});
    const auto a = lora_a.to(x.scalar_type());
    const auto b = lora_b.to(x.scalar_type());
    const auto maybe_bias = bias.numel() > 0 ? std::optional<at::Tensor>(bias) : std::nullopt;
    auto [y2, s] = forward_gemms(x2, weight, maybe_bias, a, b, scale, expand_first(forward_order, "forward_order"));
    ctx->save_for_backward({s, weight, a, b});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["expand"] = expand_bwd;
    ctx->saved_data["x_shape"] = x.sizes().vec();
    ctx->saved_data["b_dtype"] = static_cast<int64_t>(lora_b.scalar_type());
    ctx->saved_data["bias_dtype"] = static_cast<int64_t>(bias.scalar_type());
    return y2.reshape(output_shape(x, weight.size(0)));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &s = saved[0], &weight = saved[1], &a = saved[2], &b = saved[3];
    const double scale = ctx->saved_data["scale"].toDouble();
    const bool expand = ctx->saved_data["expand"].toBool();
    const auto dy2 = grads[0].reshape({-1, grads[0].size(-1)}).to(s.scalar_type());
    at::Tensor dx, dbias, dlora_b;
    if (ctx->needs_input_grad(4)) {
      dlora_b = scaled_outer(dy2, s, scale, static_cast<at::ScalarType>(ctx->saved_data["b_dtype"].toInt()));
    }
    if (ctx->needs_input_grad(0)) {
      const auto ds = at::mm(dy2, b);
      const auto w = weight.to(dy2.scalar_type());
      at::Tensor dx2;
      if (expand) {  // dX = scale ds A first; the dX GEMM reads it as its C operand
        dx2 = at::empty({dy2.size(0), a.size(1)}, dy2.options());
        dx2.addmm_(ds, a, 0, scale);
        dx2.addmm_(dy2, w);
      } else {
        dx2 = at::mm(dy2, w);
        dx2.addmm_(ds, a, 1, scale);
      }
      dx = dx2.reshape(ctx->saved_data["x_shape"].toIntVector());
    }
    if (ctx->needs_input_grad(2)) {
      dbias = dy2.sum(0).to(static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt()));
    }
    return {dx, at::Tensor(), dbias, at::Tensor(), dlora_b, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

// Below autograd (no graph to record): the forward alone; registered for CPU and Meta here, CUDA in cuda_glue.cpp.
at::Tensor lora_linear_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                             c10::string_view forward_order, c10::string_view backward_order) {
  check_inputs(x, weight, bias, lora_a, lora_b);
  expand_first(backward_order, "backward_order");
  const auto x2 = x.reshape({-1, x.size(-1)});
  auto [y2, s] = forward_gemms(x2, weight, bias, lora_a.to(x.scalar_type()), lora_b.to(x.scalar_type()), scale,
                               expand_first(forward_order, "forward_order"));
  return y2.reshape(output_shape(x, weight.size(0)));
}

namespace {

at::Tensor lora_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                                c10::string_view forward_order, c10::string_view backward_order) {
  TORCH_CHECK(!weight.requires_grad() && !lora_a.requires_grad(),
              "lora_linear treats `weight` and `lora_a` as frozen, but one of them requires grad; call "
              ".requires_grad_(False) on it or use lora_linear_ref");
  check_inputs(x, weight, bias, lora_a, lora_b);
  const auto bias_or_empty = bias.has_value() ? *bias : at::empty({0}, x.options());
  return LoRALinearFn::apply(x, weight, bias_or_empty, lora_a, lora_b, scale, forward_order, backward_order);
}

}  // namespace
}  // namespace keeplora

TORCH_LIBRARY_FRAGMENT(keeplora, m) {
  // x (..., d_in) -> (..., d_out): x W^T + bias + scale (x A^T) B^T with W and A frozen (only B and bias may
  // require grad); the adapters are used in x's dtype, dB comes back in B's dtype. Orders: "base_first" or
  // "expand_first" (see keeplora_kernels/lora_linear.py).
  m.def("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scale, "
        "str forward_order, str backward_order) -> Tensor");
}

TORCH_LIBRARY_IMPL(keeplora, CPU, m) { m.impl("lora_linear", &keeplora::lora_linear_forward); }

TORCH_LIBRARY_IMPL(keeplora, Meta, m) { m.impl("lora_linear", &keeplora::lora_linear_forward); }

TORCH_LIBRARY_IMPL(keeplora, Autograd, m) { m.impl("lora_linear", &keeplora::lora_linear_autograd); }
