"""ddf_loss: reference vs the published KL-divergence formula written out, fused backends vs the
reference (values and gradients), teacher == student gives exactly 0, edge cases.

``TestDdfLoss`` declares ddf_loss's cases for the shared ``OpTester`` (tests/ops/op_tester.py):
forward, gradients, gradcheck, non-contiguous, empty and bad-argument checks on every backend; the
tests after it are ddf_loss's own (reductions inside the op, second backward, compile, ...)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dfine.ops import ddf_loss, ddf_loss_reference
from tests.conftest import require_backend
from tests.ops.op_tester import BadArg, Call, OpTester, Tol, case

BINS = 33


def _inputs(n=40, dtype=torch.float32, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    pred = (torch.randn(n, BINS, generator=gen, dtype=torch.float64) * scale).to(dtype)
    teacher = (pred.double() + torch.randn(n, BINS, generator=gen, dtype=torch.float64) * scale).to(dtype)
    weight = torch.rand(n, generator=gen, dtype=torch.float64).to(dtype)
    return pred, teacher, weight


def _published(pred, teacher, weight, T=5.0):
    """The published per-(query, edge) DDF term, written out with nn.KLDivLoss."""
    kl = nn.KLDivLoss(reduction="none")(F.log_softmax(pred / T, dim=1), F.softmax(teacher.detach() / T, dim=1))
    return weight * (T ** 2) * kl.sum(-1)


def test_reference_matches_published_formula():
    pred, teacher, weight = _inputs(dtype=torch.float64)
    torch.testing.assert_close(ddf_loss_reference(pred, teacher, weight), _published(pred, teacher, weight),
                               rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ddf_loss_reference(pred, teacher, weight, temperature=2.0),
                               _published(pred, teacher, weight, T=2.0), rtol=1e-12, atol=1e-13)


def _call(pred, teacher, weight, device, temperature=5.0, reduction="none", **kwargs):
    inputs = dict(pred_corners=pred.to(device), teacher_corners=teacher.to(device),
                  weight=None if weight is None else weight.to(device))
    return Call({**inputs, "temperature": temperature, "reduction": reduction}, **kwargs)


def _finite_results(inputs, outputs, grads):
    assert all(torch.isfinite(o).all() for o in outputs)
    assert all(torch.isfinite(g).all() for g in grads.values())


class TestDdfLoss(OpTester):
    op = staticmethod(ddf_loss)
    reference = staticmethod(ddf_loss_reference)
    # the teacher is differentiable here so that the tests check it gets no gradient (zeros both sides)
    differentiable = ("pred_corners", "teacher_corners", "weight")
    tolerances = {
        torch.float32: {"forward": Tol(1e-5, 2e-6), "backward": Tol(1e-5, 2e-6)},
        torch.float64: {"forward": Tol(1e-12, 1e-13), "backward": Tol(1e-12, 1e-13)},
        # 16-bit inputs: float32 arithmetic, one rounding per output (vs float64 on the same values)
        torch.float16: {"forward": Tol(2e-3, 1e-3, scaled=True), "backward": Tol(2e-3, 1e-3, scaled=True)},
        torch.bfloat16: {"forward": Tol(1e-2, 8e-3, scaled=True), "backward": Tol(1e-2, 8e-3, scaled=True)},
    }
    # the first backward scales the gradient kept by the forward pass, a repeated one recomputes it:
    # the two differ by rounding in float64, which gradcheck's reentrancy check would flag
    gradcheck_kwargs = dict(eps=1e-6, atol=1e-5, rtol=1e-3, nondet_tol=1e-12)

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
    def case_other_temperature_without_weight(self, dtype, device):
        pred, teacher, _ = _inputs(n=21, dtype=dtype)
        return _call(pred, teacher, None, device, temperature=1.5)

    def case_single(self, dtype, device):
        return _call(*_inputs(n=1, dtype=dtype, seed=1), device)

    @case(dtypes=(torch.float16, torch.bfloat16))
    def case_half(self, dtype, device):
        """Every input fp16/bf16: the kernels load 16-bit values and compute in float32."""
        return _call(*_inputs(n=37, dtype=dtype, seed=5), device)

    @case(dtypes=(torch.float16, torch.bfloat16))
    def case_half_sum(self, dtype, device):
        return _call(*_inputs(n=37, dtype=dtype, seed=6), device, reduction="sum")

    @case(dtypes=(torch.float32, torch.float64))
    def case_teacher_equal_to_student(self, dtype, device):
        """teacher == student gives exactly 0 (a row of +-1e4 logits included)."""
        pred, _, weight = _inputs(n=19, dtype=dtype, scale=10.0)
        pred[0] = torch.sign(pred[0]) * 1e4

        def expect(inputs, outputs, grads):
            assert (outputs[0] == 0).all()

        return _call(pred, pred.clone(), weight, device, expect=expect)

    def case_zero_teacher_probability(self, dtype, device):
        """Teacher bins at -inf have probability 0: xlogy semantics make their terms 0, not NaN. 21
        rows: two 8-row vector groups of the AVX2 copy and 5 rows through the scalar template."""
        pred, teacher, weight = _inputs(n=21, dtype=dtype)
        teacher[:, :3] = float("-inf")
        teacher[::2, BINS - 1] = float("-inf")

        def expect(inputs, outputs, grads):
            _finite_results(inputs, outputs, grads)
            finite_teacher = inputs["teacher_corners"].clone()
            finite_teacher[torch.isinf(finite_teacher)] = -1e30  # same probabilities (0), published formula
            torch.testing.assert_close(outputs[0], _published(inputs["pred_corners"], finite_teacher,
                                                              inputs["weight"]), rtol=1e-5, atol=1e-6)

        return _call(pred, teacher, weight, device, expect=expect)

    def case_saturated_logits(self, dtype, device):
        """+-1e4 logits, the teacher's of the opposite sign: huge but finite losses."""
        pred, teacher, weight = _inputs(n=12, dtype=dtype)
        tol = {"forward": Tol(1e-5, 1e-3), "backward": Tol(1e-5, 1e-3)}
        return _call(torch.sign(pred) * 1e4, -torch.sign(teacher) * 1e4, weight, device, tol=tol,
                     expect=_finite_results)

    def case_non_contiguous(self, dtype, device):
        """Transposed logits, every other element of a [N, 2] buffer as weights."""
        pred, teacher, weight = (t.to(device) for t in _inputs(n=24, dtype=dtype))
        return _call(pred.t().contiguous().t(), teacher.t().contiguous().t(),
                     torch.stack([weight, weight], 1)[:, 1], device)

    def case_empty(self, dtype, device):
        return _call(torch.zeros(0, BINS, dtype=dtype), torch.zeros(0, BINS, dtype=dtype), torch.zeros(0, dtype=dtype),
                     device)

    def case_empty_sum(self, dtype, device):
        return _call(torch.zeros(0, BINS, dtype=dtype), torch.zeros(0, BINS, dtype=dtype), None, device,
                     reduction="sum")

    @case(dtypes=(torch.float64,))
    def case_gradcheck(self, dtype, device):
        pred, teacher, weight = _inputs(n=6, dtype=dtype, scale=1.0)
        return _call(pred, teacher, weight, device, grad=("pred_corners", "weight"))

    @case(dtypes=(torch.float64,))
    def case_gradcheck_sum(self, dtype, device):  # sum/mean: reduced inside the C++ op
        pred, teacher, weight = _inputs(n=6, dtype=dtype, scale=1.0)
        return _call(pred, teacher, weight, device, reduction="sum", grad=("pred_corners", "weight"))

    @case(dtypes=(torch.float64,))
    def case_gradcheck_mean(self, dtype, device):
        pred, teacher, weight = _inputs(n=6, dtype=dtype, scale=1.0)
        return _call(pred, teacher, weight, device, reduction="mean", grad=("pred_corners", "weight"))

    bad_arguments = [
        BadArg("teacher_bins", lambda a: {**a, "teacher_corners": torch.zeros(8, 32)}, ValueError, "teacher_corners"),
        BadArg("teacher_int", lambda a: {**a, "teacher_corners": torch.zeros(8, BINS, dtype=torch.int64)}, TypeError,
               "teacher_corners"),
        BadArg("weight_length", lambda a: {**a, "weight": torch.zeros(7)}, ValueError, "weight"),
        BadArg("temperature", lambda a: {**a, "temperature": 0.0}, ValueError, "temperature"),
        BadArg("reduction", lambda a: {**a, "reduction": "max"}, ValueError, "reduction"),
        BadArg("pred_rank", lambda a: {**a, "pred_corners": torch.zeros(8, 2, BINS)}, ValueError, "pred_corners"),
    ]

    def bad_argument_inputs(self, device):
        return _call(*_inputs(n=8), device).inputs


# ---------------------------------------------------------------------------------------------
# ddf_loss's own tests


def test_cpp_row_and_lane_kernels_agree():
    # float32 rows of 33 bins go through the AVX2 copy's 8-row vector groups when they fill a group,
    # the others through the scalar template row by row: the same row must give the same loss and
    # gradient either way (19 rows = 2 x 8 + 3)
    require_backend("cpp")
    pred, teacher, weight = _inputs(n=19)
    pred[2] = torch.sign(pred[2]) * 1e4
    teacher[3] = -torch.sign(teacher[3]) * 1e4
    teacher[4, :5] = float("-inf")
    teacher[5, 30:] = float("-inf")
    pred[6, 28:] = float("-inf")  # student probability 0 where the teacher's is not: an infinite loss
    teacher[9] = pred[9]

    def rows_and_grads(p, t, w):
        p = p.detach().clone().requires_grad_(True)
        loss = ddf_loss(p, t, w, temperature=3.0, backend="cpp")
        return loss.detach(), torch.autograd.grad(loss, p, torch.linspace(0.5, 1.5, loss.numel()))[0]

    # upstream gradients 0.5 ... 1.5 over the rows: 0.5 for a row alone
    together = rows_and_grads(pred, teacher, weight)
    alone = [rows_and_grads(pred[i:i + 1], teacher[i:i + 1], weight[i:i + 1]) for i in range(19)]
    upstream = torch.linspace(0.5, 1.5, 19)
    assert together[0][9] == 0
    torch.testing.assert_close(together[0], torch.cat([a[0] for a in alone]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[1], torch.cat([a[1] / 0.5 * u for a, u in zip(alone, upstream)]), rtol=1e-5, atol=1e-6)


def test_float32_sum_is_within_1e6_of_float64(fused_backend):
    n = 200 if fused_backend == "triton" else 8000
    pred, teacher, weight = _inputs(n=n)
    exact = ddf_loss_reference(pred.double(), teacher.double(), weight.double(), reduction="sum")
    got = ddf_loss(pred, teacher, weight, reduction="sum", backend=fused_backend)
    assert abs(got.double().item() - exact.item()) <= 1e-6 * abs(exact.item())


def test_fused_second_backward_through_the_graph(fused_backend):
    # the first backward scales the gradient kept by the forward pass; a second one recomputes it
    pred, teacher, weight = _inputs(n=20)
    pred.requires_grad_(True)
    loss = ddf_loss(pred, teacher, weight, reduction="mean", backend=fused_backend)
    first, = torch.autograd.grad(loss, pred, retain_graph=True)
    second, = torch.autograd.grad(loss * 2, pred)
    want, = torch.autograd.grad(ddf_loss_reference(pred, teacher, weight, reduction="mean"), pred)
    torch.testing.assert_close(first, want, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(second, 2 * want, rtol=1e-5, atol=4e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_torch_compile_fullgraph_cpp(reduction):
    require_backend("cpp")
    pred, teacher, weight = _inputs(n=16)

    def step(p):
        return ddf_loss(p, teacher, weight, reduction=reduction, backend="cpp").sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    p1, p2 = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    loss_compiled = compiled(p1)
    loss_compiled.backward()
    loss_eager = step(p2)
    loss_eager.backward()
    torch.testing.assert_close(loss_compiled, loss_eager)
    torch.testing.assert_close(p1.grad, p2.grad)


def test_fused_gradient_of_a_plain_sum(fused_backend):
    # .backward() of a reduction="sum" loss sends an expanded 1 to every row: the C++ backward
    # then returns the fused gradient without scaling it (any other value is a scalar multiply)
    pred, teacher, weight = _inputs(n=40)
    grads = []
    for fn in (lambda p: ddf_loss(p, teacher, weight, reduction="sum", backend=fused_backend), lambda p: ddf_loss_reference(p, teacher, weight, reduction="sum")):
        p = pred.clone().requires_grad_(True)
        fn(p).backward()
        grads.append(p.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("n", [0, 1, 40])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_cpp_total_op_equals_rows_then_reduction(reduction, n):
    # reduction="sum"/"mean" with the C++ backend runs ddf_loss_total (the rows reduced inside the
    # op, one autograd node): the same bits as the per-row op followed by the Python reduction, for
    # the value, the gradients of pred and weight, and a second backward through the graph
    require_backend("cpp")
    pred, teacher, weight = _inputs(n=max(n, 1))
    pred, teacher, weight = pred[:n], teacher[:n], weight[:n]
    results = []
    for fused_total in (True, False):
        p, w = pred.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if fused_total:
            loss = ddf_loss(p, teacher, w, reduction=reduction, backend="cpp")
            assert "DdfLossTotal" in loss.grad_fn.name()
        else:
            rows = ddf_loss(p, teacher, w, reduction="none", backend="cpp")
            loss = rows.sum() if reduction == "sum" else rows.sum() / max(n, 1)
        first = torch.autograd.grad(loss * 1.5, [p, w], retain_graph=True)
        second = torch.autograd.grad(loss, [p, w])
        results.append((loss.detach(), *first, *second))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(results[0][0], ddf_loss_reference(pred, teacher, weight, reduction=reduction),
                               rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # below autograd: the op's composite kernel
        total, grad = torch.ops.dfine.ddf_loss_total(pred, teacher, weight, 5.0, True, reduction == "mean")
    assert torch.equal(total, results[0][0]) and grad.shape == pred.shape


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_cpp_call_without_python_checks_matches_the_checked_call(monkeypatch, reduction):
    # float32/64 calls on a backend already resolved to C++ go to the op before the Python checks
    # (golsd_losses._straight_to_cpp); with those checks they must give the same bits
    require_backend("cpp")
    from dfine.ops import golsd_losses

    pred, teacher, weight = _inputs(n=37)
    results = []
    for straight in (True, False):
        if not straight:
            monkeypatch.setattr(golsd_losses, "_straight_to_cpp", lambda *args: False)
        for args in ((teacher, weight, 5.0), (teacher, weight[:, None], 2.5), (teacher.double(), None, 5.0)):
            p = pred.clone().requires_grad_(True)
            loss = ddf_loss(p, *args, reduction=reduction, backend="cpp")
            results.append((loss.detach(), *torch.autograd.grad(loss.sum(), p)))
    for got, want in zip(results[:3], results[3:]):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
