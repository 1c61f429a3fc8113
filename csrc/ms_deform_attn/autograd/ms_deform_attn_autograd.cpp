// Autograd of ms_deform_attn_forward, for every device. Only the inputs are saved: backward
// recomputes the corners and weights of every sample. The kernels are reached through the
// dispatcher, so fake tensors (torch.compile, export) trace through here too.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

namespace dfine {
namespace msda {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_forward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& loc,
                        const at::Tensor& attn, at::IntArrayRef points) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dfine::ms_deform_attn_forward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         at::IntArrayRef)>();
  return op.call(value, shapes, loc, attn, points);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward(const at::Tensor& grad_out, const at::Tensor& value,
                                                             const at::Tensor& shapes, const at::Tensor& loc,
                                                             const at::Tensor& attn, at::IntArrayRef points) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dfine::ms_deform_attn_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, at::IntArrayRef)>();
  return op.call(grad_out, value, shapes, loc, attn, points);
}

class MsDeformAttnFunction : public torch::autograd::Function<MsDeformAttnFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& value, const at::Tensor& shapes,
                            const at::Tensor& loc, const at::Tensor& attn, at::IntArrayRef points) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = call_forward(value, shapes, loc, attn, points);
    ctx->save_for_backward({value, shapes, loc, attn});
    ctx->saved_data["points"] = points.vec();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<int64_t> points = ctx->saved_data["points"].toIntVector();
    auto [grad_value, grad_loc, grad_attn] = call_backward(grads[0], saved[0], saved[1], saved[2], saved[3], points);
    return {grad_value, at::Tensor(), grad_loc, grad_attn, at::Tensor()};
  }
};

at::Tensor ms_deform_attn_forward_autograd(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& loc,
                                           const at::Tensor& attn, at::IntArrayRef points) {
  return MsDeformAttnFunction::apply(value, shapes, loc, attn, points);
}

}  // namespace
}  // namespace msda
}  // namespace dfine

TORCH_LIBRARY_IMPL(dfine, Autograd, m) {
  m.impl("ms_deform_attn_forward", &dfine::msda::ms_deform_attn_forward_autograd);
}
