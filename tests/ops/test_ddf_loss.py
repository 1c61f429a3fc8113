"""ddf_loss: reference vs the published KL-divergence formula written out, fused backends vs the
reference (values and gradients), teacher == student gives exactly 0, edge cases."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dfine.ops import ddf_loss, ddf_loss_reference
from tests.conftest import require_backend

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


def _values_and_grads(backend, pred, teacher, weight, reduction, temperature=5.0):
    pred = pred.detach().clone().requires_grad_(True)
    teacher = teacher.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    loss = ddf_loss(pred, teacher, weight, temperature=temperature, reduction=reduction, backend=backend)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    g_pred, g_teacher, g_weight = torch.autograd.grad(loss, [pred, teacher, weight], upstream, allow_unused=True)
    assert g_teacher is None or (g_teacher == 0).all()  # the teacher gets no gradient
    return loss, g_pred, g_weight


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_fused_matches_reference(fused_backend, reduction):
    args = _inputs(n=37 if fused_backend == "triton" else 301)
    got = _values_and_grads(fused_backend, *args, reduction)
    want = _values_and_grads("reference", *args, reduction)
    for name, g, w in zip(("loss", "grad pred", "grad weight"), got, want):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-6, msg=name)


def test_fused_float64_other_temperature_without_weight(fused_backend):
    pred, teacher, _ = _inputs(n=21, dtype=torch.float64)
    pred.requires_grad_(True)
    got = ddf_loss(pred, teacher, temperature=1.5, backend=fused_backend)
    want = ddf_loss_reference(pred, teacher, temperature=1.5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    g1, = torch.autograd.grad(got.sum(), pred)
    g2, = torch.autograd.grad(want.sum(), pred)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_teacher_equal_to_student_gives_exactly_zero(backend, dtype):
    require_backend(backend)
    pred, _, weight = _inputs(n=19, dtype=dtype, scale=10.0)
    pred[0] = torch.sign(pred[0]) * 1e4
    loss = ddf_loss(pred, pred.clone(), weight, backend=backend)
    assert (loss == 0).all()


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_zero_teacher_probability_contributes_zero(backend):
    # a teacher bin at -inf has probability 0: xlogy semantics make its term 0 instead of NaN
    require_backend(backend)
    # 21 rows: a group of 16 with AVX-512 (two of 8 with AVX2), 5 through the row kernel
    pred, teacher, weight = _inputs(n=21)
    teacher[:, :3] = float("-inf")
    teacher[::2, BINS - 1] = float("-inf")  # the last bin, which the AVX-512 kernel gathers apart
    pred = pred.requires_grad_(True)
    loss = ddf_loss(pred, teacher, weight, backend=backend)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(pred.grad).all()
    finite_teacher = teacher.clone()
    finite_teacher[torch.isinf(teacher)] = -1e30  # same probabilities (0) through the published formula
    torch.testing.assert_close(loss, _published(pred.detach(), finite_teacher, weight), rtol=1e-5, atol=1e-6)


def test_cpp_row_and_lane_kernels_agree():
    # float32 rows of 33 bins go through the CPU group kernels (16 rows with AVX-512, 8 with AVX2)
    # when they fill a group, the others through the row kernel: the same row must give the same
    # loss and gradient either way (19 rows = 16 + 3, or 2 x 8 + 3)
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


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])  # sum/mean: reduced inside the op
def test_cpp_gradcheck_float64(reduction):
    require_backend("cpp")
    pred, teacher, weight = _inputs(n=6, dtype=torch.float64, scale=1.0)
    pred.requires_grad_(True)
    weight.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p, w: ddf_loss(p, teacher, w, reduction=reduction, backend="cpp"),
                                    (pred, weight))


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_zero_rows(backend):
    require_backend(backend)
    pred = torch.zeros(0, BINS, requires_grad=True)
    loss = ddf_loss(pred, torch.zeros(0, BINS), torch.zeros(0), backend=backend)
    assert loss.shape == (0,)
    total = ddf_loss(pred, torch.zeros(0, BINS), reduction="sum", backend=backend)
    assert total.item() == 0.0
    total.backward()
    assert pred.grad.shape == (0, BINS)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_huge_logits_stay_finite(backend):
    require_backend(backend)
    pred, teacher, weight = _inputs(n=12)
    pred = (torch.sign(pred) * 1e4).requires_grad_(True)
    teacher = -torch.sign(teacher) * 1e4
    loss = ddf_loss(pred, teacher, weight, backend=backend)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(pred.grad).all()
    torch.testing.assert_close(loss, ddf_loss_reference(pred.detach(), teacher, weight), rtol=1e-5, atol=1e-3)


def test_fused_non_contiguous_inputs(fused_backend):
    pred, teacher, weight = _inputs(n=24)
    pred_nc, teacher_nc = pred.t().contiguous().t(), teacher.t().contiguous().t()
    weight_nc = torch.stack([weight, weight], 1)[:, 1]
    assert not pred_nc.is_contiguous() and not weight_nc.is_contiguous()
    got = ddf_loss(pred_nc, teacher_nc, weight_nc, backend=fused_backend)
    torch.testing.assert_close(got, ddf_loss_reference(pred, teacher, weight), rtol=1e-5, atol=2e-6)


def test_float32_sum_is_within_1e6_of_float64(fused_backend):
    n = 200 if fused_backend == "triton" else 8000
    pred, teacher, weight = _inputs(n=n)
    exact = ddf_loss_reference(pred.double(), teacher.double(), weight.double(), reduction="sum")
    got = ddf_loss(pred, teacher, weight, reduction="sum", backend=fused_backend)
    assert abs(got.double().item() - exact.item()) <= 1e-6 * abs(exact.item())


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(teacher_corners=torch.zeros(8, 32)), ValueError, "teacher_corners"),
        (dict(teacher_corners=torch.zeros(8, BINS, dtype=torch.int64)), TypeError, "teacher_corners"),
        (dict(weight=torch.zeros(7)), ValueError, "weight"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(reduction="max"), ValueError, "reduction"),
        (dict(pred_corners=torch.zeros(8, 2, BINS)), ValueError, "pred_corners"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(kwargs, exc, match):
    pred, teacher, weight = _inputs(n=8)
    ddf_loss(pred, teacher, weight)  # a valid call first: later ones try the C++ op before the checks
    args = dict(pred_corners=pred, teacher_corners=teacher, weight=weight)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ddf_loss(**args)


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
