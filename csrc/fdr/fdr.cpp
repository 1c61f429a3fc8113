// Schemas of the FDR decode and GO-LSD loss ops (kernels: cpu/, cuda/; autograd: autograd/), and
// the argument checks the CPU and CUDA kernels share.
#include "fdr/fdr.h"

#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"
#include "fdr/fdr_math.h"

namespace dfine {
namespace fdr {

void check_decode_args(const at::Tensor& pred, const at::Tensor& project, const at::Tensor& ref, int64_t topk,
                       const char* op) {
  check_floating_point(pred, op, "pred_corners");
  TORCH_CHECK(pred.dim() == 2, op, ": pred_corners must have shape [R, 4*(K+1)], got ", pred.sizes());
  TORCH_CHECK(project.dim() == 1 && project.size(0) >= 2 && project.size(0) <= kMaxBins, op,
              ": project must have shape [K+1] with 2 <= K+1 <= ", kMaxBins, ", got ", project.sizes());
  TORCH_CHECK(pred.size(1) == 4 * project.size(0), op, ": pred_corners must have shape [R, 4*(K+1)=",
              4 * project.size(0), "], got ", pred.sizes());
  TORCH_CHECK(ref.dim() == 2 && ref.size(0) == pred.size(0) && ref.size(1) == 4, op,
              ": ref_boxes must have shape [R=", pred.size(0), ", 4], got ", ref.sizes());
  TORCH_CHECK(topk >= 1 && topk <= kMaxTopk && topk <= project.size(0), op, ": lqe_topk must be in [1, ",
              std::min<int64_t>(kMaxTopk, project.size(0)), "], got ", topk);
  check_like(project, pred, op, "project", "pred_corners");
  check_like(ref, pred, op, "ref_boxes", "pred_corners");
}

void check_decode_grads(const at::Tensor& grad_boxes, const at::Tensor& grad_stats, const at::Tensor& topk_index,
                        const at::Tensor& pred, const at::Tensor& ref, int64_t topk, const char* op) {
  const int64_t rows = pred.size(0);
  TORCH_CHECK(grad_boxes.sizes() == ref.sizes(), op, ": grad_boxes must have shape ", ref.sizes(), ", got ",
              grad_boxes.sizes());
  TORCH_CHECK(grad_stats.dim() == 3 && grad_stats.size(0) == rows && grad_stats.size(1) == 4 &&
                  grad_stats.size(2) == topk + 1,
              op, ": grad_stats must have shape [R, 4, lqe_topk + 1], got ", grad_stats.sizes());
  TORCH_CHECK(topk_index.scalar_type() == at::kByte && topk_index.dim() == 3 && topk_index.size(0) == rows &&
                  topk_index.size(1) == 4 && topk_index.size(2) == topk,
              op, ": topk_index must be a uint8 tensor [R, 4, lqe_topk] (from fdr_decode_forward), got ",
              topk_index.scalar_type(), " ", topk_index.sizes());
  const char* names[3] = {"grad_boxes", "grad_stats", "topk_index"};
  const at::Tensor* tensors[3] = {&grad_boxes, &grad_stats, &topk_index};
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK(tensors[i]->device() == pred.device(), op, ": ", names[i], " is on ", tensors[i]->device(),
                " but pred_corners is on ", pred.device(), "; they must match");
  }
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(at::isFloatingType(tensors[i]->scalar_type()), op, ": ", names[i],
                " must be a floating-point tensor, got ", tensors[i]->scalar_type());
  }
  // Every saved bin indexes a row of K+1 = pred_corners.size(1) / 4 bins (the kernels read and write
  // there). Checked on the host for CPU tensors; the CUDA kernel asserts it (no sync).
  const int64_t bins = pred.size(1) / 4;
  if (topk_index.device().is_cpu() && topk_index.numel() > 0) {
    const int64_t largest = topk_index.max().item<uint8_t>();
    TORCH_CHECK(largest < bins, op, ": topk_index holds bin ", largest, " but the rows of pred_corners have K+1=",
                bins, " bins (topk_index must come from fdr_decode_forward on the same pred_corners)");
  }
}

static void check_loss_pred(const at::Tensor& pred, const char* op) {
  check_floating_point(pred, op, "pred_corners");
  TORCH_CHECK(pred.dim() == 2 && pred.size(1) >= 2 && pred.size(1) <= kMaxBins, op,
              ": pred_corners must have shape [N, K+1] with 2 <= K+1 <= ", kMaxBins, ", got ", pred.sizes());
}

void check_fgl_args(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& wl, const at::Tensor& wr,
                    const char* op) {
  check_loss_pred(pred, op);
  const int64_t rows = pred.size(0);
  check_rows(target, rows, pred, op, "target_bins", "pred_corners");
  check_rows(wl, rows, pred, op, "weight_left", "pred_corners");
  check_rows(wr, rows, pred, op, "weight_right", "pred_corners");
}

void check_ddf_args(const at::Tensor& pred, const at::Tensor& teacher, double temperature, const char* op) {
  check_loss_pred(pred, op);
  TORCH_CHECK(teacher.sizes() == pred.sizes(), op, ": teacher_corners must have shape ", pred.sizes(), ", got ",
              teacher.sizes());
  check_like(teacher, pred, op, "teacher_corners", "pred_corners");
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0, got ", temperature);
}

at::Tensor optional_rows(const c10::optional<at::Tensor>& weight, int64_t rows, const at::Tensor& like,
                         const char* op) {
  if (!weight.has_value() || !weight->defined()) return at::Tensor();
  check_rows(*weight, rows, like, op, "weight", "pred_corners");
  return weight->contiguous();
}

}  // namespace fdr
}  // namespace dfine

// The forward ops of the losses return the weighted per-row loss [N] and, when compute_grad is
// set, d(row loss)/d(pred) [N, K+1] from the same pass (backward then only scales its rows);
// otherwise an empty tensor. The backward ops recompute the gradient from the inputs (used when
// the forward pass did not keep it, e.g. a second backward through the same graph). The *_total
// ops reduce the rows inside the op (reduction="sum"/"mean"; autograd/golsd_losses_autograd.cpp).
TORCH_LIBRARY_FRAGMENT(dfine, m) {
  m.def(
      "fdr_decode_forward(Tensor pred_corners, Tensor project, Tensor ref_boxes, float reg_scale, int lqe_topk) "
      "-> (Tensor boxes, Tensor lqe_stats, Tensor topk_index)");
  m.def(
      "fdr_decode_backward(Tensor grad_boxes, Tensor grad_stats, Tensor pred_corners, Tensor project, "
      "Tensor ref_boxes, Tensor topk_index, float reg_scale, int lqe_topk) -> (Tensor, Tensor)");
  m.def(
      "fgl_loss_forward(Tensor pred_corners, Tensor target_bins, Tensor weight_left, Tensor weight_right, "
      "Tensor? weight, bool compute_grad) -> (Tensor rows, Tensor grad_pred)");
  m.def(
      "fgl_loss_backward(Tensor grad_rows, Tensor pred_corners, Tensor target_bins, Tensor weight_left, "
      "Tensor weight_right, Tensor? weight) -> Tensor");
  m.def(
      "ddf_loss_forward(Tensor pred_corners, Tensor teacher_corners, Tensor? weight, float temperature, "
      "bool compute_grad) -> (Tensor rows, Tensor grad_pred)");
  m.def(
      "ddf_loss_backward(Tensor grad_rows, Tensor pred_corners, Tensor teacher_corners, Tensor? weight, "
      "float temperature) -> Tensor");
  m.def(
      "fgl_loss_total(Tensor pred_corners, Tensor target_bins, Tensor weight_left, Tensor weight_right, "
      "Tensor? weight, bool compute_grad, bool mean) -> (Tensor total, Tensor grad_pred)");
  m.def(
      "ddf_loss_total(Tensor pred_corners, Tensor teacher_corners, Tensor? weight, float temperature, "
      "bool compute_grad, bool mean) -> (Tensor total, Tensor grad_pred)");
}
