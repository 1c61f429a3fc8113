"""fgl_loss: reference vs the published unimodal distribution focal loss written out, fused
backends vs the reference (values and gradients), edge cases, accuracy vs float64.

``TestFglLoss`` declares fgl_loss's cases for the shared ``OpTester`` (tests/ops/op_tester.py):
forward, gradients, gradcheck, non-contiguous, empty and bad-argument checks on every backend; the
tests after it are fgl_loss's own (reductions inside the op, second backward, compile, ...)."""

import pytest
import torch
import torch.nn.functional as F

from dfine.ops import fdr_targets, fgl_loss, fgl_loss_reference, weighting_function
from tests.conftest import require_backend
from tests.ops.op_tester import BadArg, Call, OpTester, Tol, case

K = 32
BINS = K + 1


def _inputs(n=40, dtype=torch.float32, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    pred = (torch.randn(n, BINS, generator=gen, dtype=torch.float64) * scale).to(dtype)
    target = (torch.rand(n, generator=gen, dtype=torch.float64) * (K - 0.1)).to(dtype)
    if n >= 4:  # the ends of the valid range
        target[0], target[1], target[2], target[3] = 0.0, K - 0.1, 0.5, K - 1.0
    weight_right = (target - target.floor()).to(dtype)
    weight_left = 1 - weight_right
    iou = torch.rand(n, generator=gen, dtype=torch.float64).to(dtype)
    return pred, target, weight_left, weight_right, iou


def _published(pred, label, weight_right, weight_left, weight=None, reduction="sum", avg_factor=None):
    """The published criterion's loss, written out (argument order as published: right, left)."""
    dis_left = label.long()
    dis_right = dis_left + 1
    loss = F.cross_entropy(pred, dis_left, reduction="none") * weight_left.reshape(-1) + F.cross_entropy(
        pred, dis_right, reduction="none"
    ) * weight_right.reshape(-1)
    if weight is not None:
        loss = loss * weight.float() if pred.dtype == torch.float32 else loss * weight
    if avg_factor is not None:
        return loss.sum() / avg_factor
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reference_matches_published_formula(reduction):
    pred, target, wl, wr, iou = _inputs(dtype=torch.float64)
    got = fgl_loss_reference(pred, target, wl, wr, iou, reduction=reduction)
    want = _published(pred, target, wr, wl, iou, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    # the criterion normalises by the number of boxes itself: sum / num_boxes
    num_boxes = 7.0
    torch.testing.assert_close(fgl_loss_reference(pred, target, wl, wr, iou) / num_boxes,
                               _published(pred, target, wr, wl, iou, avg_factor=num_boxes))


def test_reference_with_fdr_targets_end_to_end():
    project = weighting_function(K, 0.5, 4.0, dtype=torch.float64)
    ref = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.6, 0.1, 0.3]], dtype=torch.float64)
    gt = torch.tensor([[0.35, 0.42, 0.66, 0.61], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    target, wl, wr = fdr_targets(ref, gt, project, 4.0, K)
    pred = torch.randn(8, BINS, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = fgl_loss_reference(pred, target, wl, wr, reduction="none")
    want = _published(pred, target.reshape(-1), wr, wl, reduction="none")
    torch.testing.assert_close(got, want)


def _finite_results(inputs, outputs, grads):
    assert all(torch.isfinite(o).all() for o in outputs)
    assert all(torch.isfinite(g).all() for g in grads.values())


def _call(pred, target, wl, wr, iou, device, reduction="none", **kwargs):
    inputs = dict(pred_corners=pred, target_bins=target, weight_left=wl, weight_right=wr, weight=iou)
    inputs = {k: None if v is None else v.to(device) for k, v in inputs.items()}
    return Call({**inputs, "reduction": reduction}, **kwargs)


class TestFglLoss(OpTester):
    op = staticmethod(fgl_loss)
    reference = staticmethod(fgl_loss_reference)
    differentiable = ("pred_corners", "weight")  # the targets get no gradient
    tolerances = {
        torch.float32: {"forward": Tol(2e-6, 2e-6), "backward": Tol(2e-6, 2e-6)},
        torch.float64: {"forward": Tol(1e-13, 1e-13), "backward": Tol(1e-13, 1e-13)},
        # 16-bit inputs: float32 arithmetic, one rounding per output (vs float64 on the same values)
        torch.float16: {"forward": Tol(2e-3, 1e-3, scaled=True), "backward": Tol(2e-3, 1e-3, scaled=True)},
        torch.bfloat16: {"forward": Tol(1e-2, 8e-3, scaled=True), "backward": Tol(1e-2, 8e-3, scaled=True)},
    }
    # the first backward scales the gradient kept by the forward pass, a repeated one recomputes it:
    # the two differ by rounding (~1e-18 in float64), which gradcheck's reentrancy check would flag
    gradcheck_kwargs = dict(eps=1e-6, atol=1e-5, rtol=1e-3, nondet_tol=1e-12)

    # targets 0 and K - 0.1 (the ends of the valid range) are rows 0 and 1 of every _inputs(n >= 4)

    def case_random(self, dtype, device):
        return _call(*_inputs(n=37, dtype=dtype), device)

    def case_random_sum(self, dtype, device):
        return _call(*_inputs(n=37, dtype=dtype), device, reduction="sum")

    def case_random_mean(self, dtype, device):
        return _call(*_inputs(n=37, dtype=dtype), device, reduction="mean")

    @case(heavy=True)
    def case_random_large(self, dtype, device):
        """301 rows: full and partial groups of the C++ lane kernels."""
        return _call(*_inputs(n=301, dtype=dtype), device)

    @case(heavy=True)
    def case_random_large_sum(self, dtype, device):
        return _call(*_inputs(n=301, dtype=dtype), device, reduction="sum")

    @case(heavy=True)
    def case_random_large_mean(self, dtype, device):
        return _call(*_inputs(n=301, dtype=dtype), device, reduction="mean")

    @case(dtypes=(torch.float64,))
    def case_no_weight_fp64(self, dtype, device):
        pred, target, wl, wr, _ = _inputs(n=33, dtype=dtype)
        return _call(pred, target, wl, wr, None, device)

    def case_single(self, dtype, device):
        return _call(*_inputs(n=1, dtype=dtype, seed=1), device)

    @case(dtypes=(torch.float16, torch.bfloat16))
    def case_half(self, dtype, device):
        """Every input fp16/bf16: the kernels load 16-bit values and compute in float32."""
        return _call(*_inputs(n=37, dtype=dtype, seed=5), device)

    @case(dtypes=(torch.float16, torch.bfloat16))
    def case_half_sum(self, dtype, device):
        return _call(*_inputs(n=37, dtype=dtype, seed=6), device, reduction="sum")

    @case(dtypes=(torch.float16, torch.bfloat16))
    def case_half_logits_float32_targets(self, dtype, device):
        """16-bit logits and weights with float32 targets (what fdr_targets returns): computed in
        float32, as the reference promotes. In bf16, 15.98 and 23.99 would round up to the next bin."""
        pred, target, wl, wr, iou = _inputs(n=12, dtype=torch.float32, seed=7)
        target[4:8] = torch.tensor([15.98, 23.99, 7.5, 0.99])
        wr = target - target.floor()
        return _call(pred.to(dtype), target, 1 - wr, wr, iou.to(dtype), device)

    def case_saturated_logits(self, dtype, device):
        """+-1e4 logits: one-hot-like softmax (ties among the +1e4 bins)."""
        pred, target, wl, wr, iou = _inputs(n=16, dtype=dtype)
        return _call(torch.sign(pred) * 1e4, target, wl, wr, iou, device, expect=_finite_results)

    def case_targets_out_of_range_and_inf_logits(self, dtype, device):
        """-inf logits away from the target bins (probability 0, finite loss), targets below 0
        (left bin 0) and above K (left bin K - 1)."""
        pred, target, wl, wr, iou = _inputs(n=12, dtype=dtype, seed=3)
        pred[8, 20:] = float("-inf")
        target[8], wl[8], wr[8] = 3.25, 0.75, 0.25
        pred[9, :2] = float("-inf")
        pred[9, 5:] = float("-inf")
        target[9], wl[9], wr[9] = 2.5, 0.5, 0.5
        target[6], wl[6], wr[6] = -1.0, 1.0, 0.0
        target[7] = K + 3.0
        return _call(pred, target, wl, wr, iou, device, expect=_finite_results)

    def case_non_contiguous(self, dtype, device):
        """Transposed logits; targets and weights as rows of a transposed [4, N] tensor."""
        pred, target, wl, wr, iou = (t.to(device) for t in _inputs(n=24, dtype=dtype))
        packed = torch.stack([target, wl, wr, iou], 0).t().contiguous().t()
        return _call(pred.t().contiguous().t(), packed[0], packed[1], packed[2], packed[3], device)

    def case_empty(self, dtype, device):
        """No rows, reduction="sum": 0."""
        empty = torch.zeros(0, dtype=dtype)
        return _call(torch.zeros(0, BINS, dtype=dtype), empty, empty, empty, empty, device, reduction="sum")

    def case_empty_rows(self, dtype, device):
        empty = torch.zeros(0, dtype=dtype)
        return _call(torch.zeros(0, BINS, dtype=dtype), empty, empty, empty, None, device)

    def case_empty_mean(self, dtype, device):
        """reduction="mean" of no rows is 0, not NaN."""
        empty = torch.zeros(0, dtype=dtype)
        return _call(torch.zeros(0, BINS, dtype=dtype), empty, empty, empty, None, device, reduction="mean")

    @case(dtypes=(torch.float64,))
    def case_gradcheck(self, dtype, device):
        return _call(*_inputs(n=6, dtype=dtype, scale=1.0), device)

    @case(dtypes=(torch.float64,))
    def case_gradcheck_sum(self, dtype, device):  # sum/mean: reduced inside the C++ op
        return _call(*_inputs(n=6, dtype=dtype, scale=1.0), device, reduction="sum")

    @case(dtypes=(torch.float64,))
    def case_gradcheck_mean(self, dtype, device):
        return _call(*_inputs(n=6, dtype=dtype, scale=1.0), device, reduction="mean")

    bad_arguments = [
        BadArg("pred_rank", lambda a: {**a, "pred_corners": a["pred_corners"][:, None]}, ValueError, "pred_corners"),
        BadArg("pred_int", lambda a: {**a, "pred_corners": a["pred_corners"].long()}, TypeError, "pred_corners"),
        BadArg("target_length", lambda a: {**a, "target_bins": a["target_bins"][:-1]}, ValueError, "target_bins"),
        BadArg("weight_left_int", lambda a: {**a, "weight_left": a["weight_left"].long()}, TypeError, "weight_left"),
        BadArg("weight_right_length", lambda a: {**a, "weight_right": a["weight_right"][:3]}, ValueError,
               "weight_right"),
        BadArg("weight_length", lambda a: {**a, "weight": torch.cat([a["weight"], a["weight"]])}, ValueError,
               "weight"),
        BadArg("reduction", lambda a: {**a, "reduction": "max", "weight": None}, ValueError, "reduction"),
    ]

    def bad_argument_inputs(self, device):
        return _call(*_inputs(n=8), device, reduction="sum").inputs


# ---------------------------------------------------------------------------------------------
# fgl_loss's own tests


def test_cpp_row_and_lane_kernels_agree():
    # float32 rows of 33 bins go through the AVX2 copy's 8-row vector groups when they fill a group,
    # the others through the scalar template row by row: the same row must give the same loss and
    # gradient either way (27 rows = 3 x 8 + 3; edge targets 0 and K - 0.1 are in the first group)
    require_backend("cpp")
    pred, target, wl, wr, iou = _inputs(n=27)
    pred[5] = torch.sign(pred[5]) * 1e4
    pred[8, 20:] = float("-inf")  # probability 0 away from the target bins (finite loss)
    target[8], wl[8], wr[8] = 3.25, 0.75, 0.25
    target[6], wl[6], wr[6] = -1.0, 1.0, 0.0  # below the range: left bin 0
    target[7] = K + 3.0  # above the range: left bin K - 1

    def rows_and_grads(p, *rest):
        p = p.detach().clone().requires_grad_(True)
        loss = fgl_loss(p, *rest, reduction="none", backend="cpp")
        return loss.detach(), torch.autograd.grad(loss, p, torch.linspace(0.5, 1.5, loss.numel()))[0]

    # upstream gradients 0.5 ... 1.5 over the rows: 0.5 for a row alone
    together = rows_and_grads(pred, target, wl, wr, iou)
    alone = [rows_and_grads(pred[i:i + 1], target[i:i + 1], wl[i:i + 1], wr[i:i + 1], iou[i:i + 1]) for i in range(27)]
    upstream = torch.linspace(0.5, 1.5, 27)
    torch.testing.assert_close(together[0], torch.cat([a[0] for a in alone]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(together[1], torch.cat([a[1] / 0.5 * u for a, u in zip(alone, upstream)]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together[0], fgl_loss_reference(pred, target, wl, wr, iou, reduction="none"),
                               rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_torch_compile_fullgraph_cpp(reduction):
    require_backend("cpp")
    pred, target, wl, wr, iou = _inputs(n=16)

    def step(p):
        return fgl_loss(p, target, wl, wr, iou, reduction=reduction, backend="cpp")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    p1, p2 = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    (compiled(p1) * 3).backward()
    (step(p2) * 3).backward()
    torch.testing.assert_close(p1.grad, p2.grad)
    torch.testing.assert_close(compiled(pred), fgl_loss_reference(pred, target, wl, wr, iou, reduction=reduction))


def test_float32_sum_is_within_1e6_of_float64(fused_backend):
    n = 200 if fused_backend == "triton" else 8000
    pred, target, wl, wr, iou = _inputs(n=n, dtype=torch.float32)
    exact = fgl_loss_reference(pred.double(), target.double(), wl.double(), wr.double(), iou.double())
    got = fgl_loss(pred, target, wl, wr, iou, backend=fused_backend)
    assert abs(got.double().item() - exact.item()) <= 1e-6 * abs(exact.item())


def test_fused_second_backward_through_the_graph(fused_backend):
    # the first backward scales the gradient kept by the forward pass; a second one recomputes it
    pred, target, wl, wr, iou = _inputs(n=20)
    pred.requires_grad_(True)
    loss = fgl_loss(pred, target, wl, wr, iou, backend=fused_backend)
    first, = torch.autograd.grad(loss, pred, retain_graph=True)
    second, = torch.autograd.grad(loss * 2, pred)
    want, = torch.autograd.grad(fgl_loss_reference(pred, target, wl, wr, iou), pred)
    torch.testing.assert_close(first, want, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(second, 2 * want, rtol=2e-6, atol=4e-6)


def test_fused_gradient_of_a_plain_sum(fused_backend):
    # .backward() of a reduction="sum" loss sends an expanded 1 to every row: the C++ backward
    # then returns the fused gradient without scaling it (any other value is a scalar multiply)
    pred, target, wl, wr, iou = _inputs(n=40)
    grads = []
    for fn in (lambda p: fgl_loss(p, target, wl, wr, iou, reduction="sum", backend=fused_backend), lambda p: fgl_loss_reference(p, target, wl, wr, iou, reduction="sum")):
        p = pred.clone().requires_grad_(True)
        fn(p).backward()
        grads.append(p.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("n", [0, 1, 40])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_cpp_total_op_equals_rows_then_reduction(reduction, n):
    # reduction="sum"/"mean" with the C++ backend runs fgl_loss_total (the rows reduced inside the
    # op, one autograd node): the same bits as the per-row op followed by the Python reduction, for
    # the value, the gradients of pred and weight, and a second backward through the graph
    require_backend("cpp")
    pred, target, wl, wr, iou = _inputs(n=max(n, 4))
    pred, target, wl, wr, iou = pred[:n], target[:n], wl[:n], wr[:n], iou[:n]
    results = []
    for fused_total in (True, False):
        p, w = pred.clone().requires_grad_(True), iou.clone().requires_grad_(True)
        if fused_total:
            loss = fgl_loss(p, target, wl, wr, w, reduction=reduction, backend="cpp")
            assert "FglLossTotal" in loss.grad_fn.name()
        else:
            rows = fgl_loss(p, target, wl, wr, w, reduction="none", backend="cpp")
            loss = rows.sum() if reduction == "sum" else rows.sum() / max(n, 1)
        first = torch.autograd.grad(loss * 1.5, [p, w], retain_graph=True)
        second = torch.autograd.grad(loss, [p, w])
        results.append((loss.detach(), *first, *second))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(results[0][0], fgl_loss_reference(pred, target, wl, wr, iou, reduction=reduction),
                               rtol=2e-6, atol=2e-6)
    with torch.inference_mode():  # below autograd: the op's composite kernel
        total, grad = torch.ops.dfine.fgl_loss_total(pred, target, wl, wr, iou, True, reduction == "mean")
    assert torch.equal(total, results[0][0]) and grad.shape == pred.shape


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_cpp_call_without_python_checks_matches_the_checked_call(monkeypatch, reduction):
    # float32/64 calls on a backend already resolved to C++ go to the op before the Python checks
    # (golsd_losses._straight_to_cpp); with those checks they must give the same bits
    require_backend("cpp")
    from dfine.ops import golsd_losses

    pred, target, wl, wr, iou = _inputs(n=37)
    wl2d = wl[:, None]  # any shape with N elements: the op rejects it, the checked path flattens it
    results = []
    for straight in (True, False):
        if not straight:
            monkeypatch.setattr(golsd_losses, "_straight_to_cpp", lambda *args: False)
        for args in ((target, wl, wr, iou), (target, wl2d, wr, None)):
            p = pred.clone().requires_grad_(True)
            loss = fgl_loss(p, *args, reduction=reduction, backend="cpp")
            results.append((loss.detach(), *torch.autograd.grad(loss.sum(), p)))
    for got, want in zip(results[:2], results[2:]):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
