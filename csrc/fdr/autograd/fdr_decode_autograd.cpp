// Autograd of fdr_decode_forward, for every device. Only the inputs and the top-k bins
// (4 * k bytes per box) are saved: backward recomputes the softmax. The kernels are reached through
// the dispatcher, so fake tensors (torch.compile, export) trace through here too.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace dfine {
namespace fdr {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_forward(const at::Tensor& pred, const at::Tensor& project,
                                                            const at::Tensor& ref, double reg_scale, int64_t topk) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dfine::fdr_decode_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                             const at::Tensor&, double, int64_t)>();
  return op.call(pred, project, ref, reg_scale, topk);
}

std::tuple<at::Tensor, at::Tensor> call_backward(const at::Tensor& grad_boxes, const at::Tensor& grad_stats,
                                                 const at::Tensor& pred, const at::Tensor& project,
                                                 const at::Tensor& ref, const at::Tensor& topk_index,
                                                 double reg_scale, int64_t topk) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dfine::fdr_decode_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&, double,
                                                                 int64_t)>();
  return op.call(grad_boxes, grad_stats, pred, project, ref, topk_index, reg_scale, topk);
}

class FdrDecodeFunction : public torch::autograd::Function<FdrDecodeFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& pred, const at::Tensor& project,
                               const at::Tensor& ref, double reg_scale, int64_t topk) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [boxes, stats, topk_index] = call_forward(pred, project, ref, reg_scale, topk);
    ctx->save_for_backward({pred, project, ref, topk_index});
    ctx->mark_non_differentiable({topk_index});
    ctx->set_materialize_grads(false);
    ctx->saved_data["reg_scale"] = reg_scale;
    ctx->saved_data["topk"] = topk;
    return {boxes, stats, topk_index};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &pred = saved[0], &ref = saved[2];
    const int64_t topk = ctx->saved_data["topk"].toInt();
    if (!grads[0].defined() && !grads[1].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), {}, {}};
    const at::Tensor grad_boxes = grads[0].defined() ? grads[0] : at::zeros_like(ref);
    const at::Tensor grad_stats = grads[1].defined() ? grads[1] : pred.new_zeros({pred.size(0), 4, topk + 1});
    auto [grad_pred, grad_ref] = call_backward(grad_boxes, grad_stats, pred, saved[1], ref, saved[3],
                                               ctx->saved_data["reg_scale"].toDouble(), topk);
    return {grad_pred, at::Tensor(), grad_ref, at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> fdr_decode_forward_autograd(const at::Tensor& pred,
                                                                           const at::Tensor& project,
                                                                           const at::Tensor& ref, double reg_scale,
                                                                           int64_t topk) {
  const variable_list out = FdrDecodeFunction::apply(pred, project, ref, reg_scale, topk);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace fdr
}  // namespace dfine

TORCH_LIBRARY_IMPL(dfine, Autograd, m) {
  m.impl("fdr_decode_forward", &dfine::fdr::fdr_decode_forward_autograd);
}
