"""ms_deform_attn: fused backends against the grid_sample reference, plus the op's contract.

Backend-generic tests take the ``fused_backend`` fixture ("cpp", "triton"); their shapes stay small
because Triton runs under its interpreter here. Tests that need the compiled kernel specifically
(large D-FINE shapes, gradcheck, determinism, compile/export, C++ error messages) are cpp only.
"""

import math
import random

import pytest
import torch

from dfine.ops import _backend
from dfine.ops.ms_deform_attn import ms_deform_attn, ms_deform_attn_reference
from tests.conftest import require_backend

FWD_ATOL = 1e-5
GRAD_RTOL = 1e-4


def make_inputs(B, Q, M, D, shapes, num_points, dtype=torch.float32, seed=0, loc_low=-0.1, loc_high=1.1):
    gen = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    P = sum(num_points)
    value = torch.randn(B, S, M, D, generator=gen, dtype=dtype)
    loc = torch.rand(B, Q, M, P, 2, generator=gen, dtype=dtype) * (loc_high - loc_low) + loc_low
    attn = torch.rand(B, Q, M, P, generator=gen, dtype=dtype)
    return value, torch.tensor(shapes, dtype=torch.int64), loc, attn, list(num_points)


def run_with_grads(fn, value, shapes, loc, attn, num_points, grad_out=None, grads=("value", "loc", "attn")):
    """Output and the gradients named in ``grads`` of sum(out * grad_out)."""
    leaves = {
        "value": value.detach().clone().requires_grad_("value" in grads),
        "loc": loc.detach().clone().requires_grad_("loc" in grads),
        "attn": attn.detach().clone().requires_grad_("attn" in grads),
    }
    out = fn(leaves["value"], shapes, leaves["loc"], leaves["attn"], num_points)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(123), dtype=out.dtype)
    wanted = [leaves[name] for name in grads]
    got = torch.autograd.grad(out, wanted, grad_out) if wanted and out.numel() else [torch.zeros_like(w) for w in wanted]
    return out.detach(), dict(zip(grads, got))


def fused(backend):
    return lambda *args: ms_deform_attn(*args, backend=backend)


def assert_close_rel(actual, expected, rtol, name):
    """Max error relative to the magnitude of the expected tensor (gradients can be near zero elementwise)."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * max(scale, 1.0), f"{name}: max abs err {err:.3e} vs scale {scale:.3e}"


def check_against_reference(backend, inputs, grads=("value", "loc", "attn"), fwd_atol=FWD_ATOL, grad_rtol=GRAD_RTOL):
    out, got = run_with_grads(fused(backend), *inputs, grads=grads)
    ref_out, ref = run_with_grads(ms_deform_attn_reference, *inputs, grads=grads)
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    assert (out - ref_out).abs().max().item() <= fwd_atol if out.numel() else True
    for name in grads:
        assert got[name].shape == ref[name].shape, name
        assert_close_rel(got[name], ref[name], grad_rtol, f"grad_{name}")
    return out, got


SMALL_CASES = [
    # B, Q, M, D, level shapes, points per level
    (1, 1, 1, 1, [(1, 1)], [1]),
    (2, 5, 2, 3, [(4, 5), (2, 3)], [2, 3]),
    (1, 8, 2, 8, [(6, 4), (3, 2), (1, 1)], [3, 6, 3]),
    (2, 3, 1, 5, [(5, 7)], [4]),
    (2, 4, 2, 8, [(4, 4), (2, 2)], [6, 6]),
]


@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: f"B{c[0]}Q{c[1]}M{c[2]}D{c[3]}L{len(c[4])}")
def test_forward_and_grads_match_reference(fused_backend, case):
    B, Q, M, D, shapes, points = case
    check_against_reference(fused_backend, make_inputs(B, Q, M, D, shapes, points, seed=sum(map(len, shapes)) + D))


def test_cpp_random_shape_sweep():
    """Seeded random shapes, including D off the vector width (1, 3, 13, 33) and many levels."""
    require_backend("cpp")
    rng = random.Random(2024)
    for trial in range(25):
        L = rng.randint(1, 4)
        shapes = [(rng.randint(1, 9), rng.randint(1, 9)) for _ in range(L)]
        points = [rng.randint(1, 4) for _ in range(L)]
        B, Q, M = rng.randint(1, 3), rng.randint(1, 12), rng.randint(1, 4)
        D = rng.choice([1, 3, 4, 8, 13, 16, 33])
        inputs = make_inputs(B, Q, M, D, shapes, points, seed=trial, loc_low=-0.3, loc_high=1.3)
        check_against_reference("cpp", inputs)


def test_cpp_float64_matches_reference_tightly():
    require_backend("cpp")
    inputs = make_inputs(2, 6, 2, 13, [(5, 6), (3, 3), (1, 2)], [3, 2, 2], dtype=torch.float64, seed=7)
    check_against_reference("cpp", inputs, fwd_atol=1e-12, grad_rtol=1e-12)


def test_points_on_pixel_centres_and_borders(fused_backend):
    """Locations exactly on pixel centres, on the map border (0 and 1) and on half-pixel edges.

    Bilinear sampling is continuous there, so outputs, grad_value and grad_attn must match; the
    location gradient has a kink at integer pixel coordinates and is not compared.
    """
    shapes, points = [(4, 4), (2, 8)], [4, 4]
    value, ss, loc, attn, points = make_inputs(2, 6, 2, 5, shapes, points, seed=3)
    special = torch.tensor([0.0, 1.0, 0.125, 0.5, 0.875, 0.25, 0.75, 1.0 / 16, 15.0 / 16])
    gen = torch.Generator().manual_seed(11)
    loc = special[torch.randint(len(special), loc.shape, generator=gen)]
    check_against_reference(fused_backend, (value, ss, loc, attn, points), grads=("value", "attn"))


def test_far_outside_locations(fused_backend):
    """Points far outside [0, 1] (up to +-1e6) contribute nothing; the rest still matches."""
    value, ss, loc, attn, points = make_inputs(2, 6, 2, 4, [(3, 4), (2, 2)], [3, 3], seed=5)
    far = torch.tensor([-1e6, 1e6, -3.0, 2.5, -1e3, 1e3])
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(loc.shape, generator=gen) < 0.4
    loc = torch.where(mask, far[torch.randint(len(far), loc.shape, generator=gen)], loc)
    _, got = check_against_reference(fused_backend, (value, ss, loc, attn, points))
    outside = mask.any(-1)
    assert torch.all(got["attn"][outside] == 0)
    assert torch.all(got["loc"][outside] == 0)


def test_cpp_huge_infinite_and_nan_locations_are_dropped():
    """+-1e10, +-inf and NaN locations must not overflow the float->int conversion: they sample zero."""
    require_backend("cpp")
    value, ss, loc, attn, points = make_inputs(1, 4, 2, 3, [(3, 3), (2, 2)], [2, 2], seed=9, loc_low=0.1, loc_high=0.9)
    bad = loc.clone()
    bad[0, 0, 0, 0] = torch.tensor([1e10, 0.5])
    bad[0, 1, 1, 2] = torch.tensor([0.5, -1e10])
    bad[0, 2, 0, 3] = torch.tensor([float("inf"), 0.5])
    bad[0, 3, 1, 1] = torch.tensor([float("nan"), float("-inf")])
    safe = loc.clone()
    dropped = torch.isnan(bad).any(-1) | (bad.abs() > 10).any(-1)
    safe[dropped] = -5.0  # fully outside: the reference also samples zero there
    out, got = run_with_grads(fused("cpp"), value, ss, bad, attn, points)
    ref_out, ref = run_with_grads(ms_deform_attn_reference, value, ss, safe, attn, points)
    assert torch.isfinite(out).all()
    assert (out - ref_out).abs().max().item() <= FWD_ATOL
    for name in ("value", "loc", "attn"):
        assert torch.isfinite(got[name]).all(), name
        assert_close_rel(got[name], ref[name], GRAD_RTOL, name)
    assert torch.all(got["loc"][dropped] == 0) and torch.all(got["attn"][dropped] == 0)


def test_one_by_one_levels(fused_backend):
    inputs = make_inputs(2, 5, 2, 3, [(1, 1), (1, 1), (1, 3)], [2, 1, 2], seed=4, loc_low=-0.6, loc_high=1.6)
    check_against_reference(fused_backend, inputs)


def test_one_query_batch_one(fused_backend):
    check_against_reference(fused_backend, make_inputs(1, 1, 2, 8, [(4, 3), (2, 2)], [2, 2], seed=8))


@pytest.mark.parametrize("D", [3, 13])
def test_d_not_a_multiple_of_the_vector_width(D):
    require_backend("cpp")
    check_against_reference("cpp", make_inputs(2, 7, 3, D, [(6, 5), (3, 3)], [3, 2], seed=D))


def test_non_contiguous_inputs(fused_backend):
    """Transposed and sliced views give the same result as their contiguous copies."""
    B, Q, M, D, shapes, points = 2, 4, 2, 6, [(3, 4), (2, 2)], [2, 3]
    S, P = sum(h * w for h, w in shapes), sum(points)
    gen = torch.Generator().manual_seed(12)
    value = torch.randn(B, M, S, 2 * D, generator=gen).transpose(1, 2)[..., ::2]  # [B, S, M, D], strided
    loc = torch.rand(B, Q, M, 2, P, generator=gen).transpose(-1, -2)  # [B, Q, M, P, 2]
    attn = torch.rand(B, Q, M, P + 3, generator=gen)[..., 1 : P + 1]
    ss = torch.tensor(shapes + [(9, 9)], dtype=torch.int64)[:-1]
    assert not (value.is_contiguous() or loc.is_contiguous() or attn.is_contiguous())
    out, got = check_against_reference(fused_backend, (value, ss, loc, attn, points))
    out_c, got_c = run_with_grads(fused(fused_backend), value.contiguous(), ss, loc.contiguous(), attn.contiguous(), points)
    assert torch.allclose(out, out_c, atol=1e-6)
    for name in got:
        assert torch.allclose(got[name], got_c[name], atol=1e-5), name


@pytest.mark.parametrize(
    "case",
    [
        # D-FINE-N: 2 levels, [6, 6] points, hidden 128 = 8 heads x 16
        (2, 30, 8, 16, [(40, 40), (20, 20)], [6, 6]),
        # D-FINE-L: 3 levels, [3, 6, 3] points, hidden 256 = 8 heads x 32
        (1, 20, 8, 32, [(80, 80), (40, 40), (20, 20)], [3, 6, 3]),
        # D-FINE-L at inference (300 queries): the C++ kernel gathers the 40x40 and 20x20 levels
        # from a contiguous copy (many samples per pixel) and the 80x80 one in place
        (1, 300, 8, 32, [(80, 80), (40, 40), (20, 20)], [3, 6, 3]),
    ],
    ids=["dfine_n", "dfine_l", "dfine_l_300_queries"],
)
def test_cpp_real_dfine_shapes(case):
    require_backend("cpp")
    B, Q, M, D, shapes, points = case
    value, ss, loc, attn, points = make_inputs(B, Q, M, D, shapes, points, seed=21)
    # As in the model: every head's weights are a softmax over its points. (Unnormalised weights
    # up to 1 on 12 points make outputs up to ~6, whose fp32 rounding, ~2e-5 for the reference
    # too on an 80x80 map, would exceed the 1e-5 absolute tolerance.)
    check_against_reference("cpp", (value, ss, loc, attn.softmax(-1), points))


def snap_away_from_pixel_edges(loc, shapes, points):
    """Move every location so its pixel coordinate x = loc*W - 0.5 has fractional part in [0.1, 0.9].

    Bilinear sampling has kinks where x or y is an integer (the corner set changes); gradcheck's
    finite differences (eps ~1e-6) straddling a kink would disagree with the analytic gradient, so
    points are kept at least 0.1 pixel away from every integer coordinate of their own level.
    """
    loc = loc.clone()
    start = 0
    for (h, w), n in zip(shapes, points):
        for axis, size in ((0, w), (1, h)):
            pix = loc[..., start : start + n, axis] * size - 0.5
            frac = pix - pix.floor()
            pix = pix.floor() + 0.1 + 0.8 * frac
            loc[..., start : start + n, axis] = (pix + 0.5) / size
        start += n
    return loc


def test_cpp_gradcheck_float64():
    require_backend("cpp")
    shapes, points = [(3, 4), (2, 2), (1, 1)], [2, 1, 2]
    value, ss, loc, attn, points = make_inputs(2, 3, 2, 3, shapes, points, dtype=torch.float64, seed=31,
                                               loc_low=-0.2, loc_high=1.2)
    loc = snap_away_from_pixel_edges(loc, shapes, points)
    fn = lambda v, l, a: ms_deform_attn(v, ss, l, a, points, backend="cpp")  # noqa: E731
    args = (value.requires_grad_(), loc.requires_grad_(), attn.requires_grad_())
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_cpp_backward_is_bit_identical_across_runs():
    require_backend("cpp")
    inputs = make_inputs(2, 40, 4, 13, [(10, 12), (5, 6), (3, 3)], [3, 6, 3], seed=41)
    first_out, first = run_with_grads(fused("cpp"), *inputs)
    for _ in range(3):
        out, again = run_with_grads(fused("cpp"), *inputs)
        assert torch.equal(out, first_out)
        for name in first:
            assert torch.equal(again[name], first[name]), name
    # Thread count does not change the summation order either.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, single = run_with_grads(fused("cpp"), *inputs)
    finally:
        torch.set_num_threads(threads)
    for name in first:
        assert torch.equal(single[name], first[name]), name


def test_cpp_torch_compile_fullgraph_matches_eager():
    require_backend("cpp")
    value, ss, loc, attn, points = make_inputs(1, 6, 2, 4, [(4, 4), (2, 2)], [2, 2], seed=51)

    def step(v, s, l, a):
        return (ms_deform_attn(v, s, l, a, points, backend="cpp") * 2.0).sum(-1)

    compiled = torch.compile(step, fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out = compiled(leaves[0], ss, leaves[1], leaves[2])
    grads = torch.autograd.grad(out.sum(), leaves)
    eager_leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    eager = step(eager_leaves[0], ss, eager_leaves[1], eager_leaves[2])
    eager_grads = torch.autograd.grad(eager.sum(), eager_leaves)
    assert torch.allclose(out, eager, atol=1e-6)
    for g, e in zip(grads, eager_grads):
        assert torch.allclose(g, e, atol=1e-6)


def test_cpp_torch_export():
    require_backend("cpp")
    value, ss, loc, attn, points = make_inputs(1, 5, 2, 4, [(4, 4), (2, 2)], [2, 2], seed=61)

    class Attn(torch.nn.Module):
        def forward(self, v, s, l, a):
            return ms_deform_attn(v, s, l, a, points, backend="cpp")

    exported = torch.export.export(Attn(), (value, ss, loc, attn))
    assert any("ms_deform_attn_forward" in str(node.target) for node in exported.graph.nodes)
    out = exported.module()(value, ss, loc, attn)
    assert torch.allclose(out, ms_deform_attn_reference(value, ss, loc, attn, points), atol=FWD_ATOL)


# ------------------------------------------------------------------------------------------------
# Errors: every message names the offending argument.

def _good_inputs():
    return make_inputs(1, 3, 2, 4, [(3, 3), (2, 2)], [2, 1], seed=0)


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda v, s, l, a, n: (v[0], s, l, a, n), r"value must have shape \[B, S, M, D\]"),
        (lambda v, s, l, a, n: (v, s, l[..., 0], a, n), r"sampling_locations must have shape \[B, Q, M, P, 2\]"),
        (lambda v, s, l, a, n: (v, s, l, a[..., :2], n), r"attention_weights must have shape \[B, Q, M, P\]"),
        (lambda v, s, l, a, n: (v, s, l, a, [1, 1]), r"sum\(num_points_list\)=2 must equal P=3"),
        (lambda v, s, l, a, n: (v, torch.tensor([[3, 3], [2, 3]]), l, a, n), r"spatial_shapes .*sum.* S=13"),
        (lambda v, s, l, a, n: (v, s.int(), l, a, n), r"spatial_shapes must be an int64 tensor"),
        (lambda v, s, l, a, n: (v, s, l.double(), a, n), r"sampling_locations has dtype torch.float64"),
        (lambda v, s, l, a, n: (v, s, l, a.double(), n), r"attention_weights has dtype torch.float64"),
        (lambda v, s, l, a, n: (v.long(), s, l, a, n), r"value must be a floating-point tensor"),
        (lambda v, s, l, a, n: (v, s, l.to(torch.int32), a, n), r"sampling_locations must be a floating-point"),
        (lambda v, s, l, a, n: (v, s, l.to("meta"), a, n), r"sampling_locations is on meta"),
        (lambda v, s, l, a, n: (v, s, l, a.to("meta"), n), r"attention_weights is on meta"),
        (lambda v, s, l, a, n: (v, s.to("meta"), l, a, n), r"spatial_shapes is on meta"),
    ],
    ids=["rank", "loc_rank", "attn_shape", "num_points_sum", "shapes_sum", "shapes_int32", "loc_dtype",
         "attn_dtype", "value_int", "loc_int", "loc_meta", "attn_meta", "shapes_meta"],
)
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_bad_inputs_name_the_argument(backend, mutate, pattern):
    if backend == "cpp":
        require_backend("cpp")
    args = mutate(*_good_inputs())
    with pytest.raises((TypeError, ValueError), match=pattern):
        ms_deform_attn(*args, backend=backend)


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda v, s, l, a, n: (v[0], s, l, a, n), r"value must have shape \[B, S, M, D\] \(4 dims\)"),
        (lambda v, s, l, a, n: (v, s, l[..., 0], a, n), r"sampling_locations must have shape \[B, Q, M, P, 2\]"),
        (lambda v, s, l, a, n: (v, s, l, a[..., :2], n), r"attention_weights must have shape \[B, Q, M, P\]"),
        (lambda v, s, l, a, n: (v, s, l, a, [1, 1]), r"sum\(num_points_list\)=2 must equal P=3"),
        (lambda v, s, l, a, n: (v, torch.tensor([[3, 3], [2, 3]]), l, a, n), r"spatial_shapes sum to sum\(H\*W\)=15"),
        (lambda v, s, l, a, n: (v, s.int(), l, a, n), r"spatial_shapes must be an int64 tensor"),
        (lambda v, s, l, a, n: (v, s, l.double(), a, n), r"sampling_locations has dtype Double"),
        (lambda v, s, l, a, n: (v, s, l, a.double(), n), r"attention_weights has dtype Double"),
        (lambda v, s, l, a, n: (v.long(), s, l.long(), a.long(), n), r"value must be a floating-point tensor"),
        (lambda v, s, l, a, n: (v.half(), s, l.half(), a.half(), n), r"CPU kernel supports float32 and float64"),
        (lambda v, s, l, a, n: (v, s[:1], l, a, n), r"num_points_list has 2 entries but spatial_shapes"),
    ],
    ids=["rank", "loc_rank", "attn_shape", "num_points_sum", "shapes_sum", "shapes_int32", "loc_dtype",
         "attn_dtype", "int_tensors", "half_on_cpu", "levels"],
)
def test_cpp_op_checks_its_inputs(mutate, pattern):
    """The C++ op validates on its own too (it is callable as torch.ops.dfine.* without the wrapper)."""
    require_backend("cpp")
    args = mutate(*_good_inputs())
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.dfine.ms_deform_attn_forward(*args)


def test_cpp_backward_op_checks_grad_output():
    require_backend("cpp")
    v, s, l, a, n = _good_inputs()
    with pytest.raises(RuntimeError, match=r"grad_output must have shape \[B, Q, M\*D\]=\[1, 3, 8\]"):
        torch.ops.dfine.ms_deform_attn_backward(torch.zeros(1, 3, 7), v, s, l, a, n)


@pytest.mark.parametrize("empty", ["batch", "queries"])
def test_empty_inputs_return_empty_results(fused_backend, empty):
    B, Q = (0, 4) if empty == "batch" else (2, 0)
    value, ss, loc, attn, points = make_inputs(B, Q, 2, 4, [(3, 3), (2, 2)], [2, 1], seed=0)
    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(leaves[0], ss, leaves[1], leaves[2], points, backend=fused_backend)
    assert out.shape == (B, Q, 8)
    out.sum().backward()
    for leaf in leaves:
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape
        assert torch.all(leaf.grad == 0)


def test_auto_backend_picks_cpp_on_cpu():
    require_backend("cpp")
    inputs = make_inputs(1, 4, 2, 4, [(3, 3), (2, 2)], [2, 1], seed=70)
    assert _backend.resolve_backend("auto", torch.device("cpu"), "ms_deform_attn") == "cpp"
    auto = ms_deform_attn(*inputs)
    assert torch.equal(auto, ms_deform_attn(*inputs, backend="cpp"))
    value, ss, loc, attn, points = inputs
    out = ms_deform_attn(value.requires_grad_(), ss, loc, attn, points)
    assert "dfine_ms_deform_attn_forward" in out.grad_fn.name()  # the C++ op's autograd node


def test_explicit_cpp_without_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_backend, "_ext", None)
    monkeypatch.setattr(_backend, "_ext_tried", True)
    monkeypatch.setattr(_backend, "_ext_error", ImportError("No module named 'dfine._C'"))
    inputs = make_inputs(1, 2, 1, 2, [(2, 2)], [1], seed=0)
    with pytest.raises(RuntimeError, match=r"setup\.py build_ext --inplace"):
        ms_deform_attn(*inputs, backend="cpp")
    with pytest.warns(RuntimeWarning, match="falls back"):
        monkeypatch.setattr(_backend, "_warned_fallback", False)
        out = ms_deform_attn(*inputs, backend="auto")
    assert torch.allclose(out, ms_deform_attn_reference(*inputs))


def test_reference_matches_a_direct_bilinear_formula():
    """Sanity of the truth itself: one point, sampled by hand with align_corners=False pixel maths."""
    H, W, D = 3, 4, 2
    value = torch.arange(H * W * D, dtype=torch.float64).reshape(1, H * W, 1, D)
    x_n, y_n = 0.4, 0.7
    loc = torch.tensor([x_n, y_n], dtype=torch.float64).reshape(1, 1, 1, 1, 2)
    attn = torch.full((1, 1, 1, 1), 0.5, dtype=torch.float64)
    out = ms_deform_attn_reference(value, torch.tensor([[H, W]]), loc, attn, [1])
    x, y = x_n * W - 0.5, y_n * H - 0.5
    x0, y0 = math.floor(x), math.floor(y)
    grid = value.reshape(H, W, D)
    expected = torch.zeros(D, dtype=torch.float64)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < H and 0 <= xx < W:
                expected += wy * wx * grid[yy, xx]
    assert torch.allclose(out.reshape(D), 0.5 * expected)


_BASELINE_SCRIPT = """
import sys, torch
from dfine.ops.ms_deform_attn import ms_deform_attn
value, ss, loc, attn, points = torch.load(sys.argv[1])
leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
out = ms_deform_attn(leaves[0], ss, leaves[1], leaves[2], points, backend="cpp")
grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
torch.save([out.detach(), *grads], sys.argv[2])
"""


def test_cpp_baseline_and_avx2_copies_agree_bitwise(tmp_path):
    """The CPU kernel has a baseline-x86-64 and an AVX2 copy picked at run time; the baseline copy
    (what CPUs without AVX2 run) is forced with DFINE_CPU_DISABLE_AVX2=1 in a subprocess."""
    import os
    import subprocess
    import sys

    require_backend("cpp")
    inputs = make_inputs(2, 9, 3, 13, [(6, 5), (3, 3)], [3, 2], seed=81)
    torch.save(list(inputs), tmp_path / "inputs.pt")
    results = []
    for disable in ("0", "1"):
        out_file = tmp_path / f"out_{disable}.pt"
        env = dict(os.environ, DFINE_CPU_DISABLE_AVX2=disable)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        subprocess.run([sys.executable, "-c", _BASELINE_SCRIPT, str(tmp_path / "inputs.pt"), str(out_file)],
                       check=True, env=env, cwd=root, capture_output=True)
        results.append(torch.load(out_file))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    ref = ms_deform_attn_reference(*inputs)
    assert (results[1][0] - ref).abs().max().item() <= FWD_ATOL


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_autocast_bf16_runs_in_float32(backend):
    """Under CPU autocast, bf16 activations meet fp32 sampling locations: the op runs in fp32."""
    if backend == "cpp":
        require_backend("cpp")
    g = torch.Generator().manual_seed(0)
    levels, points = [(6, 5), (3, 3)], [2, 3]
    value = torch.randn(2, 39, 2, 8, generator=g)
    loc = torch.rand(2, 4, 2, 5, 2, generator=g)
    w = torch.rand(2, 4, 2, 5, generator=g).softmax(-1)
    expected = ms_deform_attn_reference(value.bfloat16().float(), levels, loc, w.bfloat16().float(), points)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn(value.bfloat16(), levels, loc, w.bfloat16(), points, backend=backend)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
