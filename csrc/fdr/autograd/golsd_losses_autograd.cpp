// Autograd of the GO-LSD loss ops (fgl_loss_forward, ddf_loss_forward), for every device.
//
// The forward ops return the weighted per-row loss [N] and, when compute_grad is set, the gradient
// of every row's loss w.r.t. pred_corners from the same pass over the row. Backward then only
// scales that gradient's rows by the upstream gradient, in place (no second pass over the logits,
// no second [N, K+1] buffer). Without it (compute_grad unset, as under torch.compile, or a second
// backward through a retained graph) the backward ops recompute it from the saved inputs.
//
// fgl_loss_total / ddf_loss_total are the same ops followed by the sum (or mean) of the rows, for
// reduction="sum"/"mean": one autograd node instead of two, and no reduction dispatched from Python.
// Their backward turns the scalar's gradient into the row gradients the reduction would have sent
// (one value, expanded) and shares the per-row ops' backward, so the gradients are the same bits.
//
// Registered in C++ (like torchvision's ops), as the autograd of every C++/CUDA op is: the losses
// are small (~8k rows of 33 bins per decoder layer), and the Python autograd wrapper of
// torch.library.register_autograd cost about as much as the kernel. The kernels are reached
// through the dispatcher, so fake tensors (torch.compile, export) trace through here too.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace dfine {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_fgl_forward(const at::Tensor& pred, const at::Tensor& target,
                                                    const at::Tensor& wl, const at::Tensor& wr,
                                                    const c10::optional<at::Tensor>& weight, bool compute_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dfine::fgl_loss_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&,
                                                                 const c10::optional<at::Tensor>&, bool)>();
  return op.call(pred, target, wl, wr, weight, compute_grad);
}

at::Tensor call_fgl_backward(const at::Tensor& grad_rows, const at::Tensor& pred, const at::Tensor& target,
                             const at::Tensor& wl, const at::Tensor& wr, const c10::optional<at::Tensor>& weight) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dfine::fgl_loss_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const c10::optional<at::Tensor>&)>();
  return op.call(grad_rows, pred, target, wl, wr, weight);
}

std::tuple<at::Tensor, at::Tensor> call_ddf_forward(const at::Tensor& pred, const at::Tensor& teacher,
                                                    const c10::optional<at::Tensor>& weight, double temperature,
                                                    bool compute_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dfine::ddf_loss_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const c10::optional<at::Tensor>&, double, bool)>();
  return op.call(pred, teacher, weight, temperature, compute_grad);
}

at::Tensor call_ddf_backward(const at::Tensor& grad_rows, const at::Tensor& pred, const at::Tensor& teacher,
                             const c10::optional<at::Tensor>& weight, double temperature) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dfine::ddf_loss_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const c10::optional<at::Tensor>&, double)>();
  return op.call(grad_rows, pred, teacher, weight, temperature);
}

c10::optional<at::Tensor> as_optional(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// Keeps the fused gradient (if the forward made one) for the first backward, and tells the
// engine not to materialise a zero gradient for the (non-differentiable) second output.
void keep_fused_gradient(AutogradContext* ctx, const at::Tensor& fused) {
  ctx->mark_non_differentiable({fused});
  ctx->set_materialize_grads(false);
  ctx->saved_data["fused"] = fused.numel() > 0 ? c10::IValue(fused) : c10::IValue();
}

// The upstream gradient of a reduction="sum"/"mean" loss: one value sent to every row (an expanded
// scalar on the CPU). Returns that value, or nullopt for any other upstream gradient and while
// tracing (fake and functional tensors have no data to read).
c10::optional<double> expanded_scalar(const at::Tensor& grad_rows) {
  static const c10::DispatchKeySet tracing_keys({c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                                                 c10::DispatchKey::PythonTLSSnapshot});
  if (grad_rows.device().is_cpu() && !grad_rows.key_set().has_any(tracing_keys) && grad_rows.dim() == 1 &&
      grad_rows.numel() > 0 && grad_rows.stride(0) == 0 &&
      (grad_rows.scalar_type() == at::kFloat || grad_rows.scalar_type() == at::kDouble)) {
    return grad_rows.scalar_type() == at::kFloat ? *grad_rows.const_data_ptr<float>()
                                                 : *grad_rows.const_data_ptr<double>();
  }
  return c10::nullopt;
}

// A per-row gradient of the loss (from a forward with compute_grad) scaled by the upstream row
// gradients, in place. For an expanded scalar, reading it is free: a factor of exactly 1 (a plain
// sum) leaves the gradient as it is, saving a pass over [N, K+1]; any other value is a scalar multiply.
at::Tensor scale_row_gradient(at::Tensor grad, const at::Tensor& grad_rows) {
  if (const auto factor = expanded_scalar(grad_rows)) {
    return *factor == 1.0 ? grad : grad.mul_(*factor);
  }
  return grad.mul_(grad_rows.unsqueeze(1));
}

// The fused gradient scaled by the upstream row gradients, or an undefined tensor if there is none
// (used once: a second backward through a retained graph recomputes).
at::Tensor take_fused_gradient(AutogradContext* ctx, const at::Tensor& grad_rows) {
  c10::IValue& slot = ctx->saved_data["fused"];
  if (slot.isNone()) return at::Tensor();
  at::Tensor grad = slot.toTensor();
  slot = c10::IValue();
  return scale_row_gradient(grad, grad_rows);
}

// The sum (mean: divided by max(N, 1)) of the per-row losses, as dfine/ops/golsd_losses.py's
// _reduce computes it.
at::Tensor reduce_rows(const at::Tensor& rows, bool mean) {
  const at::Tensor total = rows.sum();
  return mean ? total.div(std::max<int64_t>(rows.size(0), 1)) : total;
}

// The row gradients of a reduction's scalar gradient: the same value for every row (1/N of it for a mean).
at::Tensor reduction_row_gradients(const at::Tensor& grad_total, AutogradContext* ctx) {
  const int64_t rows = ctx->saved_data["rows"].toInt();
  const at::Tensor per_row = ctx->saved_data["mean"].toBool() ? grad_total.div(std::max<int64_t>(rows, 1)) : grad_total;
  return per_row.expand({rows});
}

void save_fgl(AutogradContext* ctx, const at::Tensor& pred, const at::Tensor& target, const at::Tensor& wl,
              const at::Tensor& wr, const c10::optional<at::Tensor>& weight, const at::Tensor& fused) {
  ctx->save_for_backward({pred, target, wl, wr, weight.has_value() ? *weight : at::Tensor()});
  // (needs_input_grad cannot be asked about an absent optional input)
  ctx->saved_data["weight_grad"] = weight.has_value() && weight->defined() && weight->requires_grad();
  keep_fused_gradient(ctx, fused);
}

// Gradients of pred (out[0]) and weight (out[4]) for the row gradients grad_rows.
void fgl_backward(AutogradContext* ctx, const at::Tensor& grad_rows, variable_list& out) {
  if (!grad_rows.defined()) return;
  if (ctx->needs_input_grad(0)) out[0] = take_fused_gradient(ctx, grad_rows);
  // the usual case ends here, without unpacking the saved inputs
  const bool weight_grad = ctx->saved_data["weight_grad"].toBool();
  if ((out[0].defined() || !ctx->needs_input_grad(0)) && !weight_grad) return;
  const variable_list saved = ctx->get_saved_variables();
  const c10::optional<at::Tensor> weight = as_optional(saved[4]);
  if (ctx->needs_input_grad(0) && !out[0].defined()) {
    // Recompute. For an expanded scalar, the way the first backward did (fused gradient, then the
    // same scaling), so that every backward through the graph gives the same bits.
    out[0] = expanded_scalar(grad_rows)
                 ? scale_row_gradient(
                       std::get<1>(call_fgl_forward(saved[0], saved[1], saved[2], saved[3], weight, true)), grad_rows)
                 : call_fgl_backward(grad_rows.contiguous(), saved[0], saved[1], saved[2], saved[3], weight);
  }
  if (weight_grad) {
    out[4] = grad_rows.mul(std::get<0>(call_fgl_forward(saved[0], saved[1], saved[2], saved[3], c10::nullopt, false)));
  }
}

class FglLossFunction : public torch::autograd::Function<FglLossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& pred, const at::Tensor& target,
                               const at::Tensor& wl, const at::Tensor& wr, const c10::optional<at::Tensor>& weight,
                               bool compute_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [rows, fused] = call_fgl_forward(pred, target, wl, wr, weight, compute_grad);
    save_fgl(ctx, pred, target, wl, wr, weight, fused);
    return {rows, fused};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(6);
    fgl_backward(ctx, grads[0], out);
    return out;
  }
};

class FglLossTotalFunction : public torch::autograd::Function<FglLossTotalFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& pred, const at::Tensor& target,
                               const at::Tensor& wl, const at::Tensor& wr, const c10::optional<at::Tensor>& weight,
                               bool compute_grad, bool mean) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [rows, fused] = call_fgl_forward(pred, target, wl, wr, weight, compute_grad);
    save_fgl(ctx, pred, target, wl, wr, weight, fused);
    ctx->saved_data["rows"] = rows.size(0);
    ctx->saved_data["mean"] = mean;
    return {reduce_rows(rows, mean), fused};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(7);
    if (grads[0].defined()) fgl_backward(ctx, reduction_row_gradients(grads[0], ctx), out);
    return out;
  }
};

void save_ddf(AutogradContext* ctx, const at::Tensor& pred, const at::Tensor& teacher,
              const c10::optional<at::Tensor>& weight, double temperature, const at::Tensor& fused) {
  ctx->save_for_backward({pred, teacher, weight.has_value() ? *weight : at::Tensor()});
  ctx->saved_data["temperature"] = temperature;
  ctx->saved_data["weight_grad"] = weight.has_value() && weight->defined() && weight->requires_grad();
  keep_fused_gradient(ctx, fused);
}

// Gradients of pred (out[0]) and weight (out[2]) for the row gradients grad_rows.
void ddf_backward(AutogradContext* ctx, const at::Tensor& grad_rows, variable_list& out) {
  if (!grad_rows.defined()) return;
  if (ctx->needs_input_grad(0)) out[0] = take_fused_gradient(ctx, grad_rows);
  // the usual case ends here, without unpacking the saved inputs
  const bool weight_grad = ctx->saved_data["weight_grad"].toBool();
  if ((out[0].defined() || !ctx->needs_input_grad(0)) && !weight_grad) return;
  const variable_list saved = ctx->get_saved_variables();
  const c10::optional<at::Tensor> weight = as_optional(saved[2]);
  const double temperature = ctx->saved_data["temperature"].toDouble();
  if (ctx->needs_input_grad(0) && !out[0].defined()) {
    out[0] = expanded_scalar(grad_rows)
                 ? scale_row_gradient(std::get<1>(call_ddf_forward(saved[0], saved[1], weight, temperature, true)),
                                      grad_rows)
                 : call_ddf_backward(grad_rows.contiguous(), saved[0], saved[1], weight, temperature);
  }
  if (weight_grad) {
    out[2] = grad_rows.mul(std::get<0>(call_ddf_forward(saved[0], saved[1], c10::nullopt, temperature, false)));
  }
}

class DdfLossFunction : public torch::autograd::Function<DdfLossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& pred, const at::Tensor& teacher,
                               const c10::optional<at::Tensor>& weight, double temperature, bool compute_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [rows, fused] = call_ddf_forward(pred, teacher, weight, temperature, compute_grad);
    save_ddf(ctx, pred, teacher, weight, temperature, fused);
    return {rows, fused};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(5);
    ddf_backward(ctx, grads[0], out);
    return out;
  }
};

class DdfLossTotalFunction : public torch::autograd::Function<DdfLossTotalFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& pred, const at::Tensor& teacher,
                               const c10::optional<at::Tensor>& weight, double temperature, bool compute_grad,
                               bool mean) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [rows, fused] = call_ddf_forward(pred, teacher, weight, temperature, compute_grad);
    save_ddf(ctx, pred, teacher, weight, temperature, fused);
    ctx->saved_data["rows"] = rows.size(0);
    ctx->saved_data["mean"] = mean;
    return {reduce_rows(rows, mean), fused};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(6);
    if (grads[0].defined()) ddf_backward(ctx, reduction_row_gradients(grads[0], ctx), out);
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> fgl_loss_forward_autograd(const at::Tensor& pred, const at::Tensor& target,
                                                             const at::Tensor& wl, const at::Tensor& wr,
                                                             const c10::optional<at::Tensor>& weight,
                                                             bool compute_grad) {
  const variable_list out = FglLossFunction::apply(pred, target, wl, wr, weight, compute_grad);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> ddf_loss_forward_autograd(const at::Tensor& pred, const at::Tensor& teacher,
                                                             const c10::optional<at::Tensor>& weight,
                                                             double temperature, bool compute_grad) {
  const variable_list out = DdfLossFunction::apply(pred, teacher, weight, temperature, compute_grad);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> fgl_loss_total_autograd(const at::Tensor& pred, const at::Tensor& target,
                                                           const at::Tensor& wl, const at::Tensor& wr,
                                                           const c10::optional<at::Tensor>& weight, bool compute_grad,
                                                           bool mean) {
  const variable_list out = FglLossTotalFunction::apply(pred, target, wl, wr, weight, compute_grad, mean);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> ddf_loss_total_autograd(const at::Tensor& pred, const at::Tensor& teacher,
                                                           const c10::optional<at::Tensor>& weight,
                                                           double temperature, bool compute_grad, bool mean) {
  const variable_list out = DdfLossTotalFunction::apply(pred, teacher, weight, temperature, compute_grad, mean);
  return {out[0], out[1]};
}

// Below autograd (no gradient recorded), on any device: the per-row op, then the reduction.
std::tuple<at::Tensor, at::Tensor> fgl_loss_total_composite(const at::Tensor& pred, const at::Tensor& target,
                                                            const at::Tensor& wl, const at::Tensor& wr,
                                                            const c10::optional<at::Tensor>& weight,
                                                            bool compute_grad, bool mean) {
  auto [rows, fused] = call_fgl_forward(pred, target, wl, wr, weight, compute_grad);
  return {reduce_rows(rows, mean), fused};
}

std::tuple<at::Tensor, at::Tensor> ddf_loss_total_composite(const at::Tensor& pred, const at::Tensor& teacher,
                                                            const c10::optional<at::Tensor>& weight,
                                                            double temperature, bool compute_grad, bool mean) {
  auto [rows, fused] = call_ddf_forward(pred, teacher, weight, temperature, compute_grad);
  return {reduce_rows(rows, mean), fused};
}

}  // namespace
}  // namespace dfine

TORCH_LIBRARY_IMPL(dfine, CompositeExplicitAutograd, m) {
  m.impl("fgl_loss_total", &dfine::fgl_loss_total_composite);
  m.impl("ddf_loss_total", &dfine::ddf_loss_total_composite);
}

TORCH_LIBRARY_IMPL(dfine, Autograd, m) {
  m.impl("fgl_loss_forward", &dfine::fgl_loss_forward_autograd);
  m.impl("ddf_loss_forward", &dfine::ddf_loss_forward_autograd);
  m.impl("fgl_loss_total", &dfine::fgl_loss_total_autograd);
  m.impl("ddf_loss_total", &dfine::ddf_loss_total_autograd);
}
