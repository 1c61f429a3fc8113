"""ms_deform_attn: fused backends (cpp, triton) against the grid_sample reference, plus the op's contract.

``TestMsDeformAttn`` declares the op's cases for the shared ``OpTester`` (tests/ops/op_tester.py),
which runs forward, gradients, gradcheck, non-contiguous, empty and bad-argument checks on every
backend and device. Shapes stay small because Triton runs under its interpreter here; ``heavy``
cases (D-FINE's real shapes, the vector-width sweep) run on compiled kernels only. The tests below
the class need the compiled kernel specifically (determinism, compile/export, the C++ op's own
checks, the baseline/AVX2 copies) or test the reference and the dispatch.
"""

import math
import random

import pytest
import torch

from dfine.ops import _backend
from dfine.ops.ms_deform_attn import ms_deform_attn, ms_deform_attn_reference
from tests.conftest import require_backend
from tests.ops.op_tester import BadArg, Call, OpTester, Tol, case

FWD_ATOL = 1e-5
GRAD_RTOL = 1e-4
ALL_GRADS = ("value", "sampling_locations", "attention_weights")


def make_inputs(B, Q, M, D, shapes, num_points, dtype=torch.float32, seed=0, loc_low=-0.1, loc_high=1.1):
    """(value, spatial_shapes, sampling_locations, attention_weights, num_points_list), uniform locations."""
    gen = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    P = sum(num_points)
    value = torch.randn(B, S, M, D, generator=gen, dtype=dtype)
    loc = torch.rand(B, Q, M, P, 2, generator=gen, dtype=dtype) * (loc_high - loc_low) + loc_low
    attn = torch.rand(B, Q, M, P, generator=gen, dtype=dtype)
    return value, torch.tensor(shapes, dtype=torch.int64), loc, attn, list(num_points)


def locations_off_pixel_boundaries(B, Q, M, shapes, num_points, dtype, gen):
    """Sampling locations whose pixel coordinates (x = loc * W - 0.5) have a fractional part in
    [0.1, 0.9]: bilinear sampling is not differentiable where a coordinate crosses an integer, so
    random points there would make the location gradient depend on which side rounding lands.
    The integer part runs from -1 to W - 1 so some corners fall outside the map (zero padding)."""
    per_level = []
    for (h, w), n in zip(shapes, num_points):
        size = torch.tensor([w, h], dtype=torch.float64)
        whole = torch.floor(torch.rand(B, Q, M, n, 2, generator=gen, dtype=torch.float64) * (size + 1)) - 1
        frac = 0.1 + 0.8 * torch.rand(B, Q, M, n, 2, generator=gen, dtype=torch.float64)
        per_level.append((whole + frac + 0.5) / size)
    return torch.cat(per_level, dim=3).to(dtype)


def make_off_pixel_inputs(B, Q, M, D, shapes, num_points, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    P = sum(num_points)
    value = torch.randn(B, S, M, D, generator=gen, dtype=torch.float64).to(dtype)
    loc = locations_off_pixel_boundaries(B, Q, M, shapes, num_points, dtype, gen)
    attn = torch.rand(B, Q, M, P, generator=gen, dtype=torch.float64).to(dtype)
    return value, torch.tensor(shapes, dtype=torch.int64), loc, attn, list(num_points)


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


def as_inputs(args, device):
    value, ss, loc, attn, points = args
    return dict(value=value.to(device), spatial_shapes=ss.to(device), sampling_locations=loc.to(device),
                attention_weights=attn.to(device), num_points_list=points)


def nonzero_results(inputs, outputs, grads):
    """The case's inputs are not degenerate: some output and every gradient is non-zero."""
    assert outputs[0].abs().max() > 0
    assert all(g.abs().max() > 0 for g in grads.values())  # (no gradients in forward-only tests)


def _tol(fwd_atol, grad, scaled=True):
    return {"forward": Tol(0.0, fwd_atol), "backward": Tol(grad, grad, scaled=scaled)}


class TestMsDeformAttn(OpTester):
    op = staticmethod(ms_deform_attn)
    reference = staticmethod(ms_deform_attn_reference)
    differentiable = ALL_GRADS
    tolerances = {
        torch.float32: _tol(FWD_ATOL, GRAD_RTOL),
        torch.float64: _tol(1e-12, 1e-11),
        ("cpp", torch.float64): _tol(1e-12, 1e-12),
        torch.float16: {"forward": Tol(2e-3, 2e-3, scaled=True), "backward": Tol(2e-3, 2e-3, scaled=True)},
        torch.bfloat16: {"forward": Tol(2e-2, 2e-2, scaled=True), "backward": Tol(2e-2, 2e-2, scaled=True)},
    }
    gradcheck_kwargs = dict(eps=1e-6, atol=1e-7, rtol=1e-5)
    # the forward kernel is the same with and without autograd: under the interpreter, the other cases'
    # outputs are compared by test_backward only
    interpreter_forward_cases = ("random", "single", "half")

    def bad_argument_inputs(self, device):
        return as_inputs(make_inputs(1, 3, 2, 4, [(3, 3), (2, 2)], [2, 1], seed=0), device)

    # ---- random shapes (uniform locations in [-0.1, 1.1]) --------------------------------------

    def case_random(self, dtype, device):
        return as_inputs(make_inputs(2, 5, 2, 3, [(4, 5), (2, 3)], [2, 3], dtype, seed=7), device)

    def case_random_3_levels(self, dtype, device):
        return as_inputs(make_inputs(1, 8, 2, 8, [(6, 4), (3, 2), (1, 1)], [3, 6, 3], dtype, seed=14), device)

    def case_random_one_level(self, dtype, device):
        return as_inputs(make_inputs(2, 3, 1, 5, [(5, 7)], [4], dtype, seed=7), device)

    def case_random_6_6_points(self, dtype, device):
        return as_inputs(make_inputs(2, 4, 2, 8, [(4, 4), (2, 2)], [6, 6], dtype, seed=12), device)

    def case_single(self, dtype, device):
        """One query, one head, one channel, one point on a 1x1 map."""
        return as_inputs(make_inputs(1, 1, 1, 1, [(1, 1)], [1], dtype, seed=3), device)

    def case_single_query(self, dtype, device):
        return as_inputs(make_inputs(1, 1, 2, 8, [(4, 3), (2, 2)], [2, 2], dtype, seed=8), device)

    @case(dtypes=(torch.float64,))
    def case_random_fp64(self, dtype, device):
        return as_inputs(make_inputs(2, 6, 2, 13, [(5, 6), (3, 3), (1, 2)], [3, 2, 2], dtype, seed=7), device)

    @case(heavy=True)
    def case_d3(self, dtype, device):
        """D off the C++ kernel's vector width."""
        return as_inputs(make_inputs(2, 7, 3, 3, [(6, 5), (3, 3)], [3, 2], dtype, seed=3), device)

    @case(heavy=True)
    def case_d13(self, dtype, device):
        return as_inputs(make_inputs(2, 7, 3, 13, [(6, 5), (3, 3)], [3, 2], dtype, seed=13), device)

    # ---- random shapes, locations away from pixel boundaries (nothing degenerate) -------------

    def _off_pixel(self, dtype, device, *shape, seed):
        return Call(as_inputs(make_off_pixel_inputs(*shape, dtype=dtype, seed=seed), device), expect=nonzero_results)

    def case_off_pixel_3_6_3_points(self, dtype, device):
        return self._off_pixel(dtype, device, 2, 6, 2, 8, [(5, 7), (3, 4), (2, 2)], [3, 6, 3], seed=11)

    def case_off_pixel_6_6_points(self, dtype, device):
        return self._off_pixel(dtype, device, 1, 5, 2, 5, [(4, 6), (2, 3)], [6, 6], seed=7)

    def case_off_pixel_1x1_levels(self, dtype, device):
        return self._off_pixel(dtype, device, 2, 3, 1, 3, [(3, 5), (1, 1), (2, 1)], [1, 2, 4], seed=6)

    def case_off_pixel_one_1x1_level(self, dtype, device):
        return self._off_pixel(dtype, device, 1, 4, 2, 7, [(1, 1)], [3], seed=8)

    @case(dtypes=(torch.float64,))
    def case_off_pixel_fp64(self, dtype, device):
        return self._off_pixel(dtype, device, 2, 4, 2, 6, [(5, 7), (3, 4), (1, 2)], [3, 6, 3], seed=7)

    @case(dtypes=(torch.float16, torch.bfloat16))
    def case_half(self, dtype, device):
        """fp16/bf16 inputs (fp32 arithmetic inside), compared with the float64 reference on the same values."""
        return self._off_pixel(dtype, device, 1, 4, 2, 4, [(4, 5), (2, 3)], [3, 3], seed=19)

    # ---- edge cases of the sampling --------------------------------------------------------------

    def case_borders(self, dtype, device):
        """Locations exactly on pixel centres, on the map border (0 and 1) and on half-pixel edges.

        Bilinear sampling is continuous there, so outputs, grad_value and grad_attn must match; the
        location gradient has a kink at integer pixel coordinates and is only checked to be finite.
        """
        value, ss, loc, attn, points = make_inputs(2, 6, 2, 5, [(4, 4), (2, 8)], [4, 4], dtype, seed=3)
        special = torch.tensor([0.0, 1.0, 0.125, 0.5, 0.875, 0.25, 0.75, 1.0 / 16, 15.0 / 16], dtype=dtype)
        loc = special[torch.randint(len(special), loc.shape, generator=torch.Generator().manual_seed(11))]
        return Call(as_inputs((value, ss, loc, attn, points), device), compare_grad=("value", "attention_weights"))

    def case_pixel_centres_and_edges(self, dtype, device):
        """Every pixel centre and pixel edge of each level (edges include the borders 0 and 1)."""
        shapes, npl = [(4, 5), (2, 3)], [4, 4]
        B, Q, M = 1, 6, 2
        value, ss, _, attn, _ = make_off_pixel_inputs(B, Q, M, 4, shapes, npl, dtype, seed=3)
        gen = torch.Generator().manual_seed(5)
        per_level = []
        for (h, w), n in zip(shapes, npl):
            xs, ys = ([(i + 0.5) / size for i in range(size)] + [i / size for i in range(size + 1)] for size in (w, h))
            xs, ys = torch.tensor(xs, dtype=dtype), torch.tensor(ys, dtype=dtype)
            ix = torch.randint(len(xs), (B, Q, M, n), generator=gen)
            iy = torch.randint(len(ys), (B, Q, M, n), generator=gen)
            per_level.append(torch.stack([xs[ix], ys[iy]], dim=-1))
        loc = torch.cat(per_level, dim=3)
        loc[0, 0, 0, 0] = torch.tensor([0.0, 0.0])
        loc[0, 0, 0, 1] = torch.tensor([1.0, 1.0])
        return Call(as_inputs((value, ss, loc, attn, npl), device), compare_grad=("value", "attention_weights"))

    def case_far_outside(self, dtype, device):
        """Points far outside [0, 1] (up to +-1e6) contribute nothing and get zero gradients."""
        value, ss, loc, attn, points = make_inputs(2, 6, 2, 4, [(3, 4), (2, 2)], [3, 3], dtype, seed=5)
        far = torch.tensor([-1e6, 1e6, -3.0, 2.5, -1e3, 1e3], dtype=dtype)
        gen = torch.Generator().manual_seed(1)
        mask = torch.rand(loc.shape, generator=gen) < 0.4
        loc = torch.where(mask, far[torch.randint(len(far), loc.shape, generator=gen)], loc)
        outside = mask.any(-1).to(device)

        def expect(inputs, outputs, grads):
            if grads:
                assert torch.all(grads["attention_weights"][outside] == 0)
                assert torch.all(grads["sampling_locations"][outside] == 0)

        return Call(as_inputs((value, ss, loc, attn, points), device), expect=expect)

    def case_far_outside_huge(self, dtype, device):
        """Every point of query 0 far away (up to +-1e30, which would overflow an int conversion),
        only x far away in query 1: zero output and zero gradients there; the other queries (points
        just outside included) still touch the map."""
        value, ss, loc, attn, points = make_off_pixel_inputs(1, 4, 2, 3, [(3, 4), (2, 2)], [2, 3], dtype, seed=11)
        far = torch.tensor([1e6, -1e6, 1e30, -1e30, 5.0, -3.0], dtype=dtype)
        loc[0, 0] = far[torch.arange(2 * 5 * 2) % 6].reshape(2, 5, 2)
        loc[0, 1, :, :, 0] = -1e6

        def expect(inputs, outputs, grads):
            assert torch.all(outputs[0][0, :2] == 0) and outputs[0][0, 2:].abs().max() > 0
            if grads:
                assert torch.all(grads["sampling_locations"][0, :2] == 0)
                assert torch.all(grads["attention_weights"][0, :2] == 0)

        return Call(as_inputs((value, ss, loc, attn, points), device), expect=expect)

    def case_infinite_and_nan_locations(self, dtype, device):
        """+-1e10, +-inf and NaN locations must not overflow the float->int conversion. The far finite
        points sample zero (zero gradients); the non-finite ones sample NaN, as the reference's
        grid_sample does: their output rows are NaN, nothing else is."""
        value, ss, loc, attn, points = make_inputs(1, 4, 2, 3, [(3, 3), (2, 2)], [2, 2], dtype, seed=9,
                                                   loc_low=0.1, loc_high=0.9)
        bad = loc.clone()
        bad[0, 0, 0, 0] = torch.tensor([1e10, 0.5])
        bad[0, 1, 1, 2] = torch.tensor([0.5, -1e10])
        bad[0, 2, 0, 3] = torch.tensor([float("inf"), 0.5])
        bad[0, 3, 1, 1] = torch.tensor([float("nan"), float("-inf")])
        far = ((bad.abs() > 10) & torch.isfinite(bad)).any(-1).to(device)
        nan_rows = torch.zeros(1, 4, 2, dtype=torch.bool, device=device)  # (b, q, m) rows with a non-finite point
        nan_rows[0, 2, 0] = nan_rows[0, 3, 1] = True

        def expect(inputs, outputs, grads):
            out = outputs[0].reshape(1, 4, 2, 3)
            assert out[nan_rows].isnan().all() and torch.isfinite(out[~nan_rows]).all()
            if grads:
                assert torch.all(grads["sampling_locations"][far] == 0)
                assert torch.all(grads["attention_weights"][far] == 0)
                assert grads["attention_weights"][0, 2, 0, 3].isnan() and grads["attention_weights"][0, 3, 1, 1].isnan()
                assert torch.isfinite(grads["value"]).all()

        return Call(as_inputs((value, ss, bad, attn, points), device), expect=expect, equal_nan=True)

    def case_one_by_one_levels(self, dtype, device):
        return as_inputs(make_inputs(2, 5, 2, 3, [(1, 1), (1, 1), (1, 3)], [2, 1, 2], dtype, seed=4,
                                     loc_low=-0.6, loc_high=1.6), device)

    def case_many_queries_on_the_same_pixel(self, dtype, device):
        """All queries and heads sample the same point: the scatter of grad_value adds many
        contributions to the same addresses."""
        value, ss, _, attn, points = make_off_pixel_inputs(2, 6, 2, 4, [(3, 3), (2, 2)], [2, 2], dtype, seed=13)
        loc = torch.full((2, 6, 2, 4, 2), 0.43, dtype=dtype)
        return as_inputs((value, ss, loc, attn, points), device)

    # ---- layouts and sizes -----------------------------------------------------------------------

    def case_non_contiguous(self, dtype, device):
        """Transposed and sliced views (value, locations, weights, and the spatial shapes)."""
        B, Q, M, D, shapes, points = 2, 4, 2, 6, [(3, 4), (2, 2)], [2, 3]
        S, P = sum(h * w for h, w in shapes), sum(points)
        gen = torch.Generator().manual_seed(12)
        value = torch.randn(B, M, S, 2 * D, generator=gen, dtype=dtype).to(device).transpose(1, 2)[..., ::2]
        loc = torch.rand(B, Q, M, 2, P, generator=gen, dtype=dtype).to(device).transpose(-1, -2)
        attn = torch.rand(B, Q, M, P + 3, generator=gen, dtype=dtype).to(device)[..., 1 : P + 1]
        ss = torch.tensor(shapes + [(9, 9)], dtype=torch.int64, device=device)[:-1]
        return dict(value=value, spatial_shapes=ss, sampling_locations=loc, attention_weights=attn,
                    num_points_list=points)

    def case_non_contiguous_permuted(self, dtype, device):
        """Same values, other memory orders: transposed storage of value and weights, every other
        element of the locations."""
        inputs = as_inputs(make_off_pixel_inputs(2, 3, 2, 5, [(4, 5), (2, 3)], [3, 3], dtype, seed=17), device)
        value, loc, attn = inputs["value"], inputs["sampling_locations"], inputs["attention_weights"]
        inputs["value"] = value.transpose(1, 3).contiguous().transpose(1, 3)
        inputs["sampling_locations"] = torch.stack([loc, torch.zeros_like(loc)], dim=-1)[..., 0]
        inputs["attention_weights"] = attn.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
        return inputs

    def case_empty(self, dtype, device):
        """No batch (B = 0)."""
        return as_inputs(make_inputs(0, 4, 2, 4, [(3, 3), (2, 2)], [2, 1], dtype), device)

    def case_empty_queries(self, dtype, device):
        return as_inputs(make_inputs(2, 0, 2, 4, [(3, 3), (2, 2)], [2, 1], dtype), device)

    def _dfine(self, dtype, device, *shape):
        # As in the model: every head's weights are a softmax over its points. (Unnormalised weights
        # up to 1 on 12 points make outputs up to ~6, whose fp32 rounding, ~2e-5 for the reference
        # too on an 80x80 map, would exceed the 1e-5 absolute tolerance.)
        value, ss, loc, attn, points = make_inputs(*shape, dtype=dtype, seed=21)
        return as_inputs((value, ss, loc, attn.softmax(-1), points), device)

    @case(heavy=True)
    def case_dfine_n(self, dtype, device):
        """D-FINE-N: 2 levels, [6, 6] points, hidden 128 = 8 heads x 16."""
        return self._dfine(dtype, device, 2, 30, 8, 16, [(40, 40), (20, 20)], [6, 6])

    @case(heavy=True)
    def case_dfine_l(self, dtype, device):
        """D-FINE-L: 3 levels, [3, 6, 3] points, hidden 256 = 8 heads x 32."""
        return self._dfine(dtype, device, 1, 20, 8, 32, [(80, 80), (40, 40), (20, 20)], [3, 6, 3])

    @case(heavy=True)
    def case_dfine_l_300_queries(self, dtype, device):
        """D-FINE-L at inference (300 queries): the C++ kernel gathers the 40x40 and 20x20 levels from
        a contiguous copy (many samples per pixel) and the 80x80 one in place."""
        return self._dfine(dtype, device, 1, 300, 8, 32, [(80, 80), (40, 40), (20, 20)], [3, 6, 3])

    @case(dtypes=(torch.float64,))
    def case_gradcheck(self, dtype, device):
        shapes, points = [(2, 3), (1, 2)], [1, 1]
        value, ss, loc, attn, points = make_inputs(1, 2, 1, 2, shapes, points, dtype, seed=31,
                                                   loc_low=-0.2, loc_high=1.2)
        return as_inputs((value, ss, snap_away_from_pixel_edges(loc, shapes, points), attn, points), device)

    @case(dtypes=(torch.float64,), heavy=True)
    def case_gradcheck_3_levels(self, dtype, device):
        shapes, points = [(3, 4), (2, 2), (1, 1)], [2, 1, 2]
        value, ss, loc, attn, points = make_inputs(2, 3, 2, 3, shapes, points, dtype, seed=31,
                                                   loc_low=-0.2, loc_high=1.2)
        return as_inputs((value, ss, snap_away_from_pixel_edges(loc, shapes, points), attn, points), device)

    # ---- errors: every message names the offending argument ---------------------------------

    bad_arguments = [
        BadArg("rank", lambda a: {**a, "value": a["value"][0]}, ValueError, r"value must have shape \[B, S, M, D\]"),
        BadArg("loc_rank", lambda a: {**a, "sampling_locations": a["sampling_locations"][..., 0]}, ValueError,
               r"sampling_locations must have shape \[B, Q, M, P, 2\]"),
        BadArg("attn_shape", lambda a: {**a, "attention_weights": a["attention_weights"][..., :2]}, ValueError,
               r"attention_weights must have shape \[B, Q, M, P\]"),
        BadArg("num_points_sum", lambda a: {**a, "num_points_list": [1, 1]}, ValueError,
               r"sum\(num_points_list\)=2 must equal P=3"),
        BadArg("shapes_sum",
               lambda a: {**a, "spatial_shapes": torch.tensor([[3, 3], [2, 3]], device=a["value"].device)},
               ValueError, r"spatial_shapes .*sum.* S=13"),
        BadArg("shapes_int32", lambda a: {**a, "spatial_shapes": a["spatial_shapes"].int()}, TypeError,
               r"spatial_shapes must be an int64 tensor"),
        BadArg("loc_dtype", lambda a: {**a, "sampling_locations": a["sampling_locations"].double()}, TypeError,
               r"sampling_locations has dtype torch.float64"),
        BadArg("attn_dtype", lambda a: {**a, "attention_weights": a["attention_weights"].double()}, TypeError,
               r"attention_weights has dtype torch.float64"),
        BadArg("value_int", lambda a: {**a, "value": a["value"].long()}, TypeError,
               r"value must be a floating-point tensor"),
        BadArg("loc_int", lambda a: {**a, "sampling_locations": a["sampling_locations"].to(torch.int32)}, TypeError,
               r"sampling_locations must be a floating-point"),
        BadArg("loc_meta", lambda a: {**a, "sampling_locations": a["sampling_locations"].to("meta")}, ValueError,
               r"sampling_locations is on meta"),
        BadArg("attn_meta", lambda a: {**a, "attention_weights": a["attention_weights"].to("meta")}, ValueError,
               r"attention_weights is on meta"),
        BadArg("shapes_meta", lambda a: {**a, "spatial_shapes": a["spatial_shapes"].to("meta")}, ValueError,
               r"spatial_shapes is on meta"),
    ]

    # ---- op-specific tests (compiled kernel) -------------------------------------------------------

    def test_cpp_random_shape_sweep(self):
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
            call = Call(as_inputs(inputs, "cpu"), grad=ALL_GRADS, compare_grad=ALL_GRADS, dtype=torch.float32)
            self.check_against_reference(call, "cpp")


# ------------------------------------------------------------------------------------------------
# The compiled kernel's own contract.


def run_with_grads(fn, value, shapes, loc, attn, num_points):
    """Output and the gradients of value, loc and attn for a fixed upstream gradient."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
    out = fn(leaves[0], shapes, leaves[1], leaves[2], num_points)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(123), dtype=out.dtype)
    return out.detach(), torch.autograd.grad(out, leaves, grad_out)


def cpp(*args):
    return ms_deform_attn(*args, backend="cpp")


def test_cpp_backward_is_bit_identical_across_runs():
    require_backend("cpp")
    inputs = make_inputs(2, 40, 4, 13, [(10, 12), (5, 6), (3, 3)], [3, 6, 3], seed=41)
    first_out, first = run_with_grads(cpp, *inputs)
    for _ in range(3):
        out, again = run_with_grads(cpp, *inputs)
        assert torch.equal(out, first_out)
        for a, b in zip(again, first):
            assert torch.equal(a, b)
    # Thread count does not change the summation order either.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, single = run_with_grads(cpp, *inputs)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, first):
        assert torch.equal(a, b)


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


def _good_inputs():
    return make_inputs(1, 3, 2, 4, [(3, 3), (2, 2)], [2, 1], seed=0)


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
        (lambda v, s, l, a, n: (v, s[:1], l, a, n), r"num_points_list has 2 entries but spatial_shapes"),
    ],
    ids=["rank", "loc_rank", "attn_shape", "num_points_sum", "shapes_sum", "shapes_int32", "loc_dtype",
         "attn_dtype", "int_tensors", "levels"],
)
def test_cpp_op_checks_its_inputs(mutate, pattern):
    """The C++ op validates on its own too (it is callable as torch.ops.dfine.* without the wrapper)."""
    require_backend("cpp")
    args = mutate(*_good_inputs())
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.dfine.ms_deform_attn_forward(*args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpp_cpu_op_takes_16_bit_tensors_as_float32(dtype):
    """The C++ CPU op computes fp16/bf16 calls in float32 (on float32 copies) and rounds the results
    once: exactly the float32 results rounded to the input dtype."""
    require_backend("cpp")
    v, s, l, a, n = make_off_pixel_inputs(1, 4, 2, 8, [(4, 5), (2, 3)], [3, 3], seed=3)
    v, l, a = (t.to(dtype) for t in (v, l, a))
    out = torch.ops.dfine.ms_deform_attn_forward(v, s, l, a, n)
    assert out.dtype == dtype
    assert torch.equal(out, torch.ops.dfine.ms_deform_attn_forward(v.float(), s, l.float(), a.float(), n).to(dtype))
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    grads = torch.ops.dfine.ms_deform_attn_backward(grad_out, v, s, l, a, n)
    want = torch.ops.dfine.ms_deform_attn_backward(grad_out.float(), v.float(), s, l.float(), a.float(), n)
    for g, w in zip(grads, want):
        assert g.dtype == dtype and torch.equal(g, w.to(dtype))


def test_cpp_backward_op_checks_grad_output():
    require_backend("cpp")
    v, s, l, a, n = _good_inputs()
    with pytest.raises(RuntimeError, match=r"grad_output must have shape \[B, Q, M\*D\]=\[1, 3, 8\]"):
        torch.ops.dfine.ms_deform_attn_backward(torch.zeros(1, 3, 7), v, s, l, a, n)


def test_auto_backend_picks_cpp_on_cpu():
    require_backend("cpp")
    inputs = make_inputs(1, 4, 2, 4, [(3, 3), (2, 2)], [2, 1], seed=70)
    assert _backend.resolve_backend("auto", torch.device("cpu"), "ms_deform_attn") == "cpp"
    auto = ms_deform_attn(*inputs)
    assert torch.equal(auto, ms_deform_attn(*inputs, backend="cpp"))
    value, ss, loc, attn, points = inputs
    out = ms_deform_attn(value.requires_grad_(), ss, loc, attn, points)
    assert "MsDeformAttnFunction" in out.grad_fn.name()  # the C++ op's autograd node (csrc/ms_deform_attn/autograd/)


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
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for disable in ("0", "1"):
        out_file = tmp_path / f"out_{disable}.pt"
        env = dict(os.environ, DFINE_CPU_DISABLE_AVX2=disable)
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
