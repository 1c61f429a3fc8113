"""NaN and infinities through the fused ops, per op and per backend (the C++ CPU kernels; the Triton
kernels under the interpreter): outputs and gradients are NaN exactly where the reference's are,
infinite where its are, and equal to it elsewhere. Nothing non-finite is hidden (a NaN turned into
0 or -1 would let a diverged run look healthy), and nothing finite turns NaN.

Cases that failed before issue 19's fixes: ms_deform_attn with NaN / inf sampling locations, with a
non-finite attention weight or upstream gradient at a point outside the map (cpp); fdr_decode's
LQE statistics of a NaN softmax row (cpp, triton); ddf_loss with logits near 1e10 or T = 1e-30
(cpp, whose compiler fused the scaling into the max subtraction); ddf_loss with a NaN teacher row
(the reference gave 0).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from dfine.ops import ddf_loss, ddf_loss_reference, fdr_decode, fdr_decode_reference, fgl_loss, fgl_loss_reference
from dfine.ops import ms_deform_attn, ms_deform_attn_reference, weighting_function
from tests.conftest import require_backend
from tests.ops.test_ms_deform_attn_cuda_emulated import _EmulatedCuda

NAN, INF = float("nan"), float("inf")
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-7}


# Cases whose infinite inputs reach sums of infinities: whether a result is inf or NaN (inf - inf) then
# depends on the order of the operations, which differs between formulations of the same math. These
# need a non-finite value wherever the reference has one (NaN or inf), and the reference's values elsewhere.
ORDER_DEPENDENT = {"grad_inf_point_outside", "weight_inf"}


def assert_same_values(actual: torch.Tensor, expected: torch.Tensor, what: str, exact_nan: bool = True):
    """NaN where expected is NaN (only there), the same infinities, close finite values. Without
    exact_nan: non-finite exactly where expected is non-finite, close finite values."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.detach().double(), expected.detach().double()
    if exact_nan:
        nan_a, nan_e = actual.isnan(), expected.isnan()
        assert torch.equal(nan_a, nan_e), (f"{what}: NaN at {nan_a.nonzero().tolist()}, the reference at "
                                           f"{nan_e.nonzero().tolist()}\n{actual}\n{expected}")
        inf_a, inf_e = actual.isinf(), expected.isinf()
        assert torch.equal(inf_a, inf_e) and torch.equal(actual[inf_a], expected[inf_e]), f"{what}: infinities differ"
    finite = expected.isfinite()
    assert torch.equal(actual.isfinite(), finite), (f"{what}: non-finite at {(~actual.isfinite()).nonzero().tolist()}, "
                                                    f"the reference at {(~finite).nonzero().tolist()}")
    tol = TOLERANCE[torch.float32]
    assert torch.allclose(actual[finite], expected[finite], rtol=tol, atol=tol), (
        f"{what}: finite values differ\n{actual}\n{expected}")


def _quiet(fn):
    """Runs fn with warnings off: the Triton interpreter runs the kernels in numpy, which warns about
    inf * 0 (the very NaN these tests expect)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def _outputs_and_grads(fn, inputs, upstream):
    """fn(*inputs) and the gradients of sum(output_i * upstream_i) w.r.t. every input."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grads = torch.autograd.grad(outputs, leaves, upstream)
    return [o.detach() for o in outputs] + list(grads)


# --------------------------------------------------------------------------------------------
# ms_deform_attn: two levels (3 x 4 and 2 x 2), point 1 (of 3) is on level 1.

_SHAPES, _POINTS = [(3, 4), (2, 2)], [1, 2]


def _outside(loc, attn):
    loc[0, 0, 0, 1] = 5.0  # every corner of point 1 outside the map


MSDA_CASES = {
    "loc_x_nan": lambda v, loc, a, go: loc[0, 0, 0, 1].__setitem__(0, NAN),
    "loc_x_inf": lambda v, loc, a, go: loc[0, 0, 0, 1].__setitem__(0, INF),
    "loc_y_minus_inf": lambda v, loc, a, go: loc[0, 0, 0, 1].__setitem__(1, -INF),
    "loc_both_nan": lambda v, loc, a, go: loc[0, 0, 0, 1].fill_(NAN),
    "loc_x_inf_y_far": lambda v, loc, a, go: loc[0, 0, 0, 1].copy_(torch.tensor([INF, 50.0])),
    "loc_huge": lambda v, loc, a, go: loc[0, 0, 0, 1].copy_(torch.tensor([1e30, -1e30])),
    "attn_nan_outside": lambda v, loc, a, go: (_outside(loc, a), a[0, 0, 0].__setitem__(1, NAN)),
    "attn_inf_outside": lambda v, loc, a, go: (_outside(loc, a), a[0, 0, 0].__setitem__(1, INF)),
    "attn_nan_inside": lambda v, loc, a, go: a[0, 0, 0].__setitem__(1, NAN),
    "value_nan": lambda v, loc, a, go: v[0, 12].fill_(NAN),
    "value_inf": lambda v, loc, a, go: v[0, 12].fill_(INF),
    "grad_nan": lambda v, loc, a, go: go[0, 0].__setitem__(1, NAN),
    "grad_nan_point_outside": lambda v, loc, a, go: (_outside(loc, a), go[0, 0].__setitem__(1, NAN)),
    "grad_inf_point_outside": lambda v, loc, a, go: (_outside(loc, a), go[0, 0].__setitem__(1, -INF)),
}


@pytest.mark.parametrize("case", list(MSDA_CASES))
def test_ms_deform_attn_non_finite(case, fused_backend):
    gen = torch.Generator().manual_seed(0)
    B, S, M, D, Q, P = 1, 16, 1, 3, 2, 3
    value = torch.randn(B, S, M, D, generator=gen, dtype=torch.float64)
    loc = torch.rand(B, Q, M, P, 2, generator=gen, dtype=torch.float64) * 0.8 + 0.1
    attn = torch.rand(B, Q, M, P, generator=gen, dtype=torch.float64)
    upstream = torch.randn(B, Q, M * D, generator=gen, dtype=torch.float64)
    MSDA_CASES[case](value, loc, attn, upstream)
    expected = _outputs_and_grads(lambda v, l, a: ms_deform_attn_reference(v, _SHAPES, l, a, _POINTS),
                                  (value, loc, attn), upstream)
    actual = _quiet(lambda: _outputs_and_grads(
        lambda v, l, a: ms_deform_attn(v, _SHAPES, l, a, _POINTS, backend=fused_backend), (value, loc, attn),
        upstream))
    for name, a, e in zip(("output", "grad value", "grad sampling_locations", "grad attention_weights"), actual,
                          expected):
        assert_same_values(a, e, f"{case} {name}", case not in ORDER_DEPENDENT)
    assert expected[0].isnan().any() or case in ("loc_huge", "value_inf", "grad_nan", "grad_nan_point_outside",
                                                 "grad_inf_point_outside"), "the case must poison the output"


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("case", list(MSDA_CASES))
def test_ms_deform_attn_non_finite_emulated_cuda(case, deterministic):
    """The same cases through the CUDA kernels' warp bodies, run over emulated warps on the CPU."""
    config = dict(vec=0, group=0, deterministic=deterministic, seed=-1)
    gen = torch.Generator().manual_seed(0)
    B, S, M, D, Q, P = 1, 16, 1, 3, 2, 3
    value = torch.randn(B, S, M, D, generator=gen, dtype=torch.float64)
    loc = torch.rand(B, Q, M, P, 2, generator=gen, dtype=torch.float64) * 0.8 + 0.1
    attn = torch.rand(B, Q, M, P, generator=gen, dtype=torch.float64)
    upstream = torch.randn(B, Q, M * D, generator=gen, dtype=torch.float64)
    MSDA_CASES[case](value, loc, attn, upstream)
    expected = _outputs_and_grads(lambda v, l, a: ms_deform_attn_reference(v, _SHAPES, l, a, _POINTS),
                                  (value, loc, attn), upstream)
    shapes = torch.tensor(_SHAPES, dtype=torch.long)
    actual = _outputs_and_grads(lambda v, l, a: _EmulatedCuda.apply(v, shapes, l, a, _POINTS, config),
                                (value, loc, attn), upstream)
    for name, a, e in zip(("output", "grad value", "grad sampling_locations", "grad attention_weights"), actual,
                          expected):
        assert_same_values(a, e, f"{case} {name}", case not in ORDER_DEPENDENT)


# --------------------------------------------------------------------------------------------
# fdr_decode: 3 boxes (the float32 C++ kernel runs 2 boxes per vector group: a full and a partial group).


def _edge(z, bins, value, box=0, edge=1, bin_=3):
    z[box, edge * bins + bin_] = value


FDR_CASES = {
    "logit_nan": lambda z, W, ref, bins: _edge(z, bins, NAN),
    "logit_inf": lambda z, W, ref, bins: _edge(z, bins, INF),
    "logit_minus_inf": lambda z, W, ref, bins: _edge(z, bins, -INF),
    "edge_all_minus_inf": lambda z, W, ref, bins: z[2, 3 * bins:4 * bins].fill_(-INF),
    "logit_huge": lambda z, W, ref, bins: _edge(z, bins, 1e30),
    "ref_nan": lambda z, W, ref, bins: ref[1].__setitem__(2, NAN),
    "project_inf": lambda z, W, ref, bins: W.__setitem__(0, -INF),
}


# C++: the float32 vector groups and the scalar rows (float64), the compile-time 33-bin loops and the
# generic ones. Triton (one kernel for every size and dtype; slow under the interpreter): one variant.
FDR_VARIANTS = [("cpp", torch.float32, 9), ("cpp", torch.float32, 33), ("cpp", torch.float64, 9),
                ("cpp", torch.float64, 33), ("triton", torch.float32, 33)]


@pytest.mark.parametrize("fused_backend, dtype, bins", FDR_VARIANTS,
                         ids=[f"{b}-{str(d)[6:]}-{n}" for b, d, n in FDR_VARIANTS])
@pytest.mark.parametrize("case", list(FDR_CASES))
def test_fdr_decode_non_finite(case, fused_backend, dtype, bins):
    require_backend(fused_backend)
    gen = torch.Generator().manual_seed(1)
    rows, k = 3, 4
    z = (torch.randn(rows, 4 * bins, generator=gen, dtype=torch.float64) * 3).to(dtype)
    W = weighting_function(bins - 1, 0.5, 4.0).to(dtype)
    ref = (torch.rand(rows, 4, generator=gen, dtype=torch.float64) * 0.5 + 0.2).to(dtype)
    upstream = (torch.randn(rows, 4, generator=gen, dtype=torch.float64).to(dtype),
                torch.randn(rows, 4, k + 1, generator=gen, dtype=torch.float64).to(dtype))
    FDR_CASES[case](z, W, ref, bins)
    expected = _outputs_and_grads(lambda a, b: fdr_decode_reference(a.double(), W.double(), b.double(), 4.0, k),
                                  (z, ref), tuple(u.double() for u in upstream))
    actual = _quiet(lambda: _outputs_and_grads(lambda a, b: fdr_decode(a, W, b, 4.0, k, backend=fused_backend),
                                               (z, ref), upstream))
    for name, a, e in zip(("boxes", "lqe_stats", "grad pred_corners", "grad ref_boxes"), actual, expected):
        assert_same_values(a, e, f"{case} {name}")


# --------------------------------------------------------------------------------------------
# fgl_loss and ddf_loss: 11 rows of 33 bins (a full and a partial float32 vector group in C++).

LOSS_CASES = {
    "logit_nan": lambda d: d["pred"][0].__setitem__(3, NAN),
    "logit_inf": lambda d: d["pred"][0].__setitem__(3, INF),
    "logit_minus_inf": lambda d: d["pred"][9].__setitem__(3, -INF),
    "weight_nan": lambda d: d["weight"].__setitem__(2, NAN),
    "weight_inf": lambda d: d["weight"].__setitem__(2, INF),
}
FGL_CASES = dict(LOSS_CASES, target_nan=lambda d: d["target"].__setitem__(4, NAN),
                 target_huge=lambda d: d["target"].__setitem__(4, 1e30),
                 weight_left_nan=lambda d: d["weight_left"].__setitem__(5, NAN))
DDF_CASES = dict(
    LOSS_CASES,
    teacher_nan=lambda d: d["teacher"][1].__setitem__(2, NAN),
    teacher_inf=lambda d: d["teacher"][1].__setitem__(2, INF),
    teacher_minus_inf=lambda d: d["teacher"][1].__setitem__(2, -INF),
    logits_near_1e10=lambda d: (d["pred"].mul_(1e10), d["teacher"].mul_(1e10)),
    student_near_1e10=lambda d: d["pred"][:4].mul_(1e10),
    temperature_1e_30=lambda d: d.__setitem__("temperature", 1e-30),
    temperature_1e_3=lambda d: d.__setitem__("temperature", 1e-3),
)


def _loss_inputs(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    rows, bins = 11, 33

    def rand(*shape, scale=1.0):
        return (torch.rand(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    pred = (torch.randn(rows, bins, generator=gen, dtype=torch.float64) * 3).to(dtype)
    teacher = (torch.randn(rows, bins, generator=gen, dtype=torch.float64) * 3).to(dtype)
    target = rand(rows, scale=bins - 1.1)
    weight_right = target - target.floor()
    return {"pred": pred, "teacher": teacher, "target": target, "weight_left": 1 - weight_right,
            "weight_right": weight_right, "weight": rand(rows), "temperature": 5.0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(FGL_CASES))
def test_fgl_loss_non_finite(case, dtype, fused_backend):
    d = _loss_inputs(dtype, 2)
    FGL_CASES[case](d)
    rest = (d["target"], d["weight_left"], d["weight_right"], d["weight"])
    upstream = torch.linspace(-1, 1, d["pred"].shape[0], dtype=dtype)
    expected = _outputs_and_grads(
        lambda p: fgl_loss_reference(p.double(), *(t.double() for t in rest), reduction="none"), (d["pred"],),
        upstream.double())
    actual = _quiet(lambda: _outputs_and_grads(
        lambda p: fgl_loss(p, *rest, reduction="none", backend=fused_backend), (d["pred"],), upstream))
    for name, a, e in zip(("rows", "grad pred_corners"), actual, expected):
        assert_same_values(a, e, f"{case} {name}", case not in ORDER_DEPENDENT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(DDF_CASES))
def test_ddf_loss_non_finite(case, dtype, fused_backend):
    d = _loss_inputs(dtype, 3)
    DDF_CASES[case](d)
    T = d["temperature"]
    upstream = torch.linspace(-1, 1, d["pred"].shape[0], dtype=dtype)
    expected = _outputs_and_grads(
        lambda p: ddf_loss_reference(p.double(), d["teacher"].double(), d["weight"].double(), T, reduction="none"),
        (d["pred"],), upstream.double())
    actual = _quiet(lambda: _outputs_and_grads(
        lambda p: ddf_loss(p, d["teacher"], d["weight"], T, reduction="none", backend=fused_backend), (d["pred"],),
        upstream))
    for name, a, e in zip(("rows", "grad pred_corners"), actual, expected):
        assert_same_values(a, e, f"{case} {name}", case not in ORDER_DEPENDENT)


def test_ddf_reference_keeps_a_nan_teacher_row():
    """The reference skips only terms whose teacher probability is 0: a NaN teacher row (whose
    probabilities are NaN, not 0) gives a NaN loss instead of a silent 0."""
    pred = torch.zeros(2, 5)
    teacher = torch.zeros(2, 5)
    teacher[0, 1] = NAN
    teacher[1, 0] = -INF  # probability 0: a 0 term
    rows = ddf_loss_reference(pred, teacher, temperature=2.0, reduction="none")
    assert rows[0].isnan() and torch.isfinite(rows[1])
