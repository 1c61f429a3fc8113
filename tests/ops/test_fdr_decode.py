"""fdr_decode, fdr_targets and weighting_function: published values, reference vs an independent
write-up of the published formulas, fused backends (cpp, triton) vs the reference, edge cases.

``TestFdrDecode`` declares fdr_decode's cases for the shared ``OpTester`` (tests/ops/op_tester.py):
forward, gradients, gradcheck, non-contiguous, empty and bad-argument checks on every backend."""

import pytest
import torch
import torch.nn.functional as F

from dfine.ops import fdr_decode, fdr_decode_reference, fdr_targets, weighting_function
from tests.conftest import require_backend
from tests.ops.op_tester import BadArg, Call, OpTester, Tol, case

K = 32
BINS = K + 1


def _inputs(lead=(3, 7), dtype=torch.float32, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    corners = (torch.randn(*lead, 4 * BINS, generator=gen, dtype=torch.float64) * scale).to(dtype)
    centre = torch.rand(*lead, 2, generator=gen, dtype=torch.float64) * 0.8 + 0.1
    size = torch.rand(*lead, 2, generator=gen, dtype=torch.float64) * 0.4 + 0.05
    ref = torch.cat([centre, size], -1).to(dtype)
    return corners, weighting_function(K, 0.5, 4.0, dtype=dtype), ref


# ---------------------------------------------------------------------------------------------
# weighting_function and fdr_targets


# Values listed in the published-facts sheet (4 decimals), left half; the right half mirrors it.
W_RS4_LEFT = [-4, -2, -1.7881, -1.5912, -1.4082, -1.2381, -1.0801, -0.9332, -0.7967, -0.6698, -0.5518,
              -0.4422, -0.3404, -0.2457, -0.1578, -0.0760, 0]
W_RS8_LEFT = [-8, -4, -3.4913, -3.0344, -2.6239, -2.2552, -1.924, -1.6265, -1.3593, -1.1193, -0.9037,
              -0.71, -0.536, -0.3797, -0.2394, -0.1133, 0]


@pytest.mark.parametrize("reg_scale,left", [(4.0, W_RS4_LEFT), (8.0, W_RS8_LEFT)])
def test_weighting_function_published_values(reg_scale, left):
    expected = torch.tensor(left + [-v for v in reversed(left[:-1])], dtype=torch.float64)
    got = weighting_function(K, 0.5, reg_scale, dtype=torch.float64)
    assert got.shape == (BINS,)
    torch.testing.assert_close(got, expected, atol=6e-5, rtol=0)


def test_weighting_function_accepts_parameter_tensors():
    # the model keeps up (float) and reg_scale (one-element tensor) as parameters
    from_numbers = weighting_function(K, 0.5, 4)
    from_tensors = weighting_function(K, torch.tensor([0.5]), torch.tensor([4], dtype=torch.int64))
    assert from_tensors.dtype == torch.float32
    assert torch.equal(from_numbers, from_tensors)


def test_fdr_targets_published_worked_example():
    project = weighting_function(K, 0.5, 4.0)
    ref = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    gt = torch.tensor([[0.35, 0.42, 0.66, 0.61]])
    target, weight_left, weight_right = fdr_targets(ref, gt, project, 4.0, K)
    assert target.shape == (1, 4)
    assert target.floor().long().tolist() == [[25, 11, 26, 18]]
    torch.testing.assert_close(weight_right, torch.tensor([[0.4549, 0.4148, 0.7587, 0.4802]]), atol=1e-4, rtol=0)
    torch.testing.assert_close(weight_left, 1 - weight_right)
    torch.testing.assert_close(target, target.floor() + weight_right)


def _published_targets(ref, gt, project, rs, reg_max):
    """bbox2distance + translate_gt written out element by element in python floats."""
    W = [float(v) for v in project]
    out = []
    for (cx, cy, w, h), (x1, y1, x2, y2) in zip(ref.tolist(), gt.tolist()):
        dists = [(cx - x1) / (w / rs + 1e-16) - 0.5 * rs, (cy - y1) / (h / rs + 1e-16) - 0.5 * rs,
                 (x2 - cx) / (w / rs + 1e-16) - 0.5 * rs, (y2 - cy) / (h / rs + 1e-16) - 0.5 * rs]
        for d in dists:
            left = sum(1 for v in W if v <= d) - 1
            if left < 0:
                idx, wr = 0.0, 0.0
            elif left >= reg_max:
                idx, wr = reg_max - 0.1, 1.0
            else:
                wr = abs(d - W[left]) / (abs(d - W[left]) + abs(W[left + 1] - d))
                idx = left + wr
            out.append((min(max(idx, 0.0), reg_max - 0.1), 1.0 - wr, wr))
    return torch.tensor(out, dtype=torch.float64)


def test_fdr_targets_match_written_out_formula():
    gen = torch.Generator().manual_seed(1)
    n = 64
    ref = torch.cat([torch.rand(n, 2, generator=gen) * 0.6 + 0.2, torch.rand(n, 2, generator=gen) * 0.3 + 0.02], -1)
    # gt boxes around the reference, some far outside it (beyond the outermost bin) and some inside out
    half = ref[:, 2:] / 2 * (torch.rand(n, 2, generator=gen) * 3 + 0.1)
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.3
    gt = torch.cat([ref[:, :2] - half + shift, ref[:, :2] + half + shift], -1)
    ref[:4] = torch.tensor([[0.5, 0.5, 0.05, 0.05]])
    gt[:4] = torch.tensor([[0.0, 0.0, 1.0, 1.0]])  # far outside a small box: edges beyond W[32]
    ref, gt = ref.double(), gt.double()
    project = weighting_function(K, 0.5, 4.0, dtype=torch.float64)
    target, weight_left, weight_right = fdr_targets(ref, gt, project, 4.0, K)
    expected = _published_targets(ref, gt, project, 4.0, K)
    torch.testing.assert_close(target.reshape(-1), expected[:, 0])
    torch.testing.assert_close(weight_left.reshape(-1), expected[:, 1])
    torch.testing.assert_close(weight_right.reshape(-1), expected[:, 2])
    assert (target >= 0).all() and (target <= K - 0.1 + 1e-9).all()
    assert (target[:4] == K - 0.1).all() and (weight_right[:4] == 1).all()


def test_fdr_targets_at_the_ends_of_the_bins():
    project = weighting_function(K, 0.5, 4.0)
    ref = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    # gt edges exactly on the reference centre: distance -rs/2 = -2 = W[1]; gt far inside out: below W[0]
    gt_centre = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    target, weight_left, weight_right = fdr_targets(ref, gt_centre, project, 4.0, K)
    torch.testing.assert_close(target, torch.ones(1, 4))
    gt_inside_out = torch.tensor([[0.9, 0.9, 0.1, 0.1]])
    target, weight_left, weight_right = fdr_targets(ref, gt_inside_out, project, 4.0, K)
    assert (target == 0).all() and (weight_left == 1).all() and (weight_right == 0).all()


def test_fdr_targets_zero_size_reference_is_finite():
    project = weighting_function(K, 0.5, 4.0)
    ref = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.3, 0.3, 0.0, 0.0], [0.4, 0.4, -1e-20, 0.0]])
    gt = torch.tensor([[0.4, 0.4, 0.6, 0.6], [0.2, 0.4, 0.2, 0.2], [0.4, 0.4, 0.4, 0.4]])
    target, weight_left, weight_right = fdr_targets(ref, gt, project, 4.0, K)
    for t in (target, weight_left, weight_right):
        assert torch.isfinite(t).all()
    # an edge on the far side of the centre is beyond W[32]; on the near side below W[0]; exactly on
    # the centre the distance is 0 - rs/2 = W[1]
    expected = torch.tensor([[K - 0.1] * 4, [K - 0.1, 0.0, 0.0, 0.0], [1.0] * 4])
    torch.testing.assert_close(target, expected)
    torch.testing.assert_close(weight_left + weight_right, torch.ones_like(target))


def test_fdr_targets_bad_inputs():
    project = weighting_function(K, 0.5, 4.0)
    with pytest.raises(ValueError, match="gt_boxes_xyxy"):
        fdr_targets(torch.rand(3, 4), torch.rand(2, 4), project, 4.0, K)
    with pytest.raises(ValueError, match="project"):
        fdr_targets(torch.rand(3, 4), torch.rand(3, 4), project[:-1], 4.0, K)
    with pytest.raises(TypeError, match="ref_boxes"):
        fdr_targets(torch.rand(3, 4).long(), torch.rand(3, 4), project, 4.0, K)


# ---------------------------------------------------------------------------------------------
# fdr_decode: the reference


def test_reference_matches_written_out_published_formula():
    corners, project, ref = _inputs(dtype=torch.float64)
    rs = 4.0
    boxes, stats = fdr_decode_reference(corners, project, ref, rs)
    # Integral: softmax over rows of 33, F.linear with W, reshape to [..., 4]
    p = F.softmax(corners.reshape(-1, BINS), dim=1)
    d = F.linear(p, project).reshape(*corners.shape[:-1], 4)
    x1 = ref[..., 0] - (0.5 * rs + d[..., 0]) * (ref[..., 2] / rs)
    y1 = ref[..., 1] - (0.5 * rs + d[..., 1]) * (ref[..., 3] / rs)
    x2 = ref[..., 0] + (0.5 * rs + d[..., 2]) * (ref[..., 2] / rs)
    y2 = ref[..., 1] + (0.5 * rs + d[..., 3]) * (ref[..., 3] / rs)
    expected_boxes = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)
    prob = F.softmax(corners.reshape(*corners.shape[:-1], 4, BINS), dim=-1)
    top = prob.topk(4, dim=-1).values
    expected_stats = torch.cat([top, top.mean(dim=-1, keepdim=True)], dim=-1)
    torch.testing.assert_close(boxes, expected_boxes, rtol=0, atol=1e-14)
    torch.testing.assert_close(stats, expected_stats, rtol=0, atol=1e-15)


def test_zero_logits_reproduce_the_reference_box():
    # uniform distribution over symmetric W -> d = 0 -> box == reference box
    _, project, ref = _inputs(dtype=torch.float64)
    corners = torch.zeros(*ref.shape[:-1], 4 * BINS, dtype=torch.float64)
    boxes, stats = fdr_decode_reference(corners, project, ref, 4.0)
    torch.testing.assert_close(boxes, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(stats, torch.full_like(stats, 1 / BINS))


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_reg_scale_as_a_tensor(backend):
    require_backend(backend)
    corners, project, ref = _inputs(lead=(5,))
    by_float = fdr_decode(corners, project, ref, 4.0, backend=backend)
    by_tensor = fdr_decode(corners, project, ref, torch.tensor([4], dtype=torch.int64), backend=backend)
    by_negative = fdr_decode(corners, project, ref, torch.tensor([-4.0]), backend=backend)
    for a, b, c in zip(by_float, by_tensor, by_negative):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


# ---------------------------------------------------------------------------------------------
# fdr_decode: fused backends vs the reference (the shared OpTester cases)


def _call(corners, project, ref, device, lqe_topk=4, **kwargs):
    inputs = dict(pred_corners=corners.to(device), project=project.to(device), ref_boxes=ref.to(device),
                  reg_scale=4.0, lqe_topk=lqe_topk)
    return Call(inputs, **kwargs)


def _finite_results(inputs, outputs, grads):
    assert all(torch.isfinite(o).all() for o in outputs)
    assert all(torch.isfinite(g).all() for g in grads.values())


class TestFdrDecode(OpTester):
    op = staticmethod(fdr_decode)
    reference = staticmethod(fdr_decode_reference)
    differentiable = ("pred_corners", "ref_boxes")
    tolerances = {
        torch.float32: {"forward": Tol(1e-5, 2e-6), "backward": Tol(1e-5, 2e-6)},
        torch.float64: {"forward": Tol(1e-12, 1e-13), "backward": Tol(1e-12, 1e-13)},
        # 16-bit inputs: float32 arithmetic, one rounding per output (vs float64 on the same values)
        torch.float16: {"forward": Tol(2e-3, 1e-3, scaled=True), "backward": Tol(2e-3, 1e-3, scaled=True)},
        torch.bfloat16: {"forward": Tol(1e-2, 8e-3, scaled=True), "backward": Tol(1e-2, 8e-3, scaled=True)},
    }
    gradcheck_kwargs = dict(eps=1e-6, atol=1e-7)

    def case_random(self, dtype, device):
        return _call(*_inputs(lead=(2, 9), dtype=dtype), device)

    def case_random_top1(self, dtype, device):
        return _call(*_inputs(lead=(2, 9), dtype=dtype), device, lqe_topk=1)

    @case(heavy=True)
    def case_random_large(self, dtype, device):
        """148 boxes: the C++ lane kernels in pairs of boxes, and many groups."""
        return _call(*_inputs(lead=(4, 37), dtype=dtype), device)

    @case(heavy=True)
    def case_random_large_top1(self, dtype, device):
        return _call(*_inputs(lead=(4, 37), dtype=dtype), device, lqe_topk=1)

    @case(dtypes=(torch.float64,))
    def case_random_fp64(self, dtype, device):
        return _call(*_inputs(lead=(11,), dtype=dtype), device)

    def case_single(self, dtype, device):
        return _call(*_inputs(lead=(1,), dtype=dtype, seed=2), device)

    @case(dtypes=(torch.float16, torch.bfloat16))
    def case_half(self, dtype, device):
        """fp16/bf16 logits, W and boxes: the kernels load 16-bit values and compute in float32. The
        logits of every edge are distinct multiples of 1/4 (exact in both dtypes), so no top-k tie
        makes the fused and the reference gradients pick different bins."""
        gen = torch.Generator().manual_seed(8)
        _, project, ref = _inputs(lead=(2, 5), dtype=dtype, seed=8)
        ranks = torch.argsort(torch.rand(2, 5, 4, BINS, generator=gen), dim=-1)
        corners = ((ranks - BINS // 2) * 0.25).reshape(2, 5, 4 * BINS).to(dtype)
        return _call(corners, project, ref, device)

    def case_other_bin_count(self, dtype, device):
        """reg_max = 8 (9 bins) and the most top-k bins, 8: another padding of the bins."""
        corners = torch.randn(5, 4 * 9, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 3
        _, _, ref = _inputs(lead=(5,), dtype=dtype, seed=4)
        return _call(corners.to(dtype), weighting_function(8, 0.5, 4.0, dtype=dtype), ref, device, lqe_topk=8)

    def case_huge_logits(self, dtype, device):
        """+-1e4 logits: one-hot-like softmax with ties. Outputs are compared; the gradients (top-k
        at ties picks either bin) must be finite."""
        corners, project, ref = _inputs(lead=(4,), dtype=dtype)
        return _call(torch.sign(corners) * 1e4, project, ref, device, compare_grad=(), expect=_finite_results)

    def case_non_contiguous(self, dtype, device):
        """Transposed corner logits and every other element of a [..., 4, 2] buffer as boxes."""
        corners, project, ref = (t.to(device) for t in _inputs(lead=(8, 3), dtype=dtype))
        corners_nc = corners.transpose(0, 1).contiguous().transpose(0, 1)
        ref_nc = torch.stack([ref, ref], -1)[..., 0]
        return _call(corners_nc, project, ref_nc, device)

    def case_empty(self, dtype, device):
        corners = torch.zeros(2, 0, 4 * BINS, dtype=dtype)
        return _call(corners, weighting_function(K, 0.5, 4.0, dtype=dtype), torch.zeros(2, 0, 4, dtype=dtype), device)

    @case(dtypes=(torch.float64,))
    def case_gradcheck(self, dtype, device):
        """reg_max = 4 (5 bins): small enough for gradcheck under the Triton interpreter."""
        gen = torch.Generator().manual_seed(6)
        corners = torch.randn(2, 4 * 5, generator=gen, dtype=dtype)
        _, _, ref = _inputs(lead=(2,), dtype=dtype, seed=6)
        return _call(corners, weighting_function(4, 0.5, 4.0, dtype=dtype), ref, device)

    @case(dtypes=(torch.float64,), heavy=True)
    def case_gradcheck_33_bins(self, dtype, device):
        return _call(*_inputs(lead=(3,), dtype=dtype, scale=1.0), device)

    bad_arguments = [
        BadArg("corners_bins", lambda a: {**a, "pred_corners": a["pred_corners"][..., :-1]}, ValueError,
               "pred_corners"),
        BadArg("ref_boxes_shape", lambda a: {**a, "ref_boxes": a["ref_boxes"][..., :3]}, ValueError, "ref_boxes"),
        BadArg("project_length", lambda a: {**a, "project": a["project"][:-1]}, ValueError, "pred_corners"),
        BadArg("corners_int", lambda a: {**a, "pred_corners": a["pred_corners"].long()}, TypeError, "pred_corners"),
        BadArg("ref_boxes_dtype", lambda a: {**a, "ref_boxes": a["ref_boxes"].double()}, TypeError, "ref_boxes"),
        BadArg("project_rank", lambda a: {**a, "project": a["project"].reshape(1, -1)}, ValueError, "project"),
        BadArg("lqe_topk_0", lambda a: {**a, "lqe_topk": 0}, ValueError, "lqe_topk"),
        BadArg("lqe_topk_9", lambda a: {**a, "lqe_topk": 9}, ValueError, "lqe_topk"),
    ]

    def bad_argument_inputs(self, device):
        return _call(*_inputs(lead=(3,)), device).inputs


def test_fused_gradient_through_boxes_only(fused_backend):
    corners, project, ref = _inputs(lead=(6,))
    grads = []
    for backend in (fused_backend, "reference"):
        c = corners.clone().requires_grad_(True)
        boxes, _ = fdr_decode(c, project, ref, 4.0, backend=backend)
        grads.append(torch.autograd.grad(boxes[..., 2].sum(), c)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def _values_and_grads(backend, corners, project, ref, lqe_topk=4, seed=5):
    corners = corners.detach().clone().requires_grad_(True)
    ref = ref.detach().clone().requires_grad_(True)
    boxes, stats = fdr_decode(corners, project, ref, 4.0, lqe_topk=lqe_topk, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    grad_boxes = torch.randn(boxes.shape, generator=gen, dtype=torch.float64).to(boxes.dtype)
    grad_stats = torch.randn(stats.shape, generator=gen, dtype=torch.float64).to(stats.dtype)
    g_corners, g_ref = torch.autograd.grad([boxes, stats], [corners, ref], [grad_boxes, grad_stats])
    return boxes, stats, g_corners, g_ref


@pytest.mark.parametrize("lqe_topk", [1, 3, 4, 8])
def test_cpp_row_and_lane_kernels_agree(lqe_topk):
    # float32 boxes with 33 bins go through the CPU lane kernel in pairs (8 edge rows per SIMD lane
    # group), a last odd box through the row kernel: a box must decode to the same values, top-k
    # bins and gradients either way. 7 boxes = 3 pairs + 1; ties: an all-zero edge (equal
    # probabilities: the lowest bins first) and +-1e4 logits.
    require_backend("cpp")
    corners, project, ref = _inputs(lead=(7,))
    corners[1, :BINS] = 0.0
    corners[2] = torch.sign(corners[2]) * 1e4
    corners[3, 2 * BINS:3 * BINS] = corners[3, 3 * BINS:]  # two identical edges
    gen = torch.Generator().manual_seed(1)
    grad_boxes, grad_stats = torch.randn(7, 4, generator=gen), torch.randn(7, 4, lqe_topk + 1, generator=gen)
    op_forward, op_backward = torch.ops.dfine.fdr_decode_forward, torch.ops.dfine.fdr_decode_backward

    def decode(i, j):
        outputs = op_forward(corners[i:j], project, ref[i:j], 4.0, lqe_topk)
        grads = op_backward(grad_boxes[i:j], grad_stats[i:j], corners[i:j], project, ref[i:j], outputs[2], 4.0, lqe_topk)
        return list(outputs) + list(grads)

    together = decode(0, 7)
    alone = [decode(i, i + 1) for i in range(7)]
    names = ["boxes", "lqe_stats", "topk_index", "grad pred_corners", "grad ref_boxes"]
    for k, name in enumerate(names):
        torch.testing.assert_close(together[k], torch.cat([a[k] for a in alone]), rtol=1e-6, atol=1e-6, msg=name)
    assert torch.equal(together[2][1, 0], torch.arange(lqe_topk, dtype=torch.uint8))  # ties: lowest bins first
    want = _values_and_grads("reference", corners[4:], project, ref[4:], lqe_topk)  # no ties in these
    got = _values_and_grads("cpp", corners[4:], project, ref[4:], lqe_topk)
    for name, g, w in zip(("boxes", "lqe_stats", "grad pred_corners", "grad ref_boxes"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-6, msg=name)


def test_reference_backend_huge_logits_stay_finite():
    corners, project, ref = _inputs(lead=(4,))
    corners = (torch.sign(corners) * 1e4).requires_grad_(True)
    boxes, stats = fdr_decode(corners, project, ref, 4.0, backend="reference")
    (boxes.sum() + stats.sum()).backward()
    assert torch.isfinite(boxes).all() and torch.isfinite(stats).all() and torch.isfinite(corners.grad).all()


def test_torch_compile_fullgraph_cpp():
    require_backend("cpp")
    corners, project, ref = _inputs(lead=(2, 5))

    def step(c, r):
        boxes, stats = fdr_decode(c, project, r, 4.0, backend="cpp")
        return boxes.sum() + stats.square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    c1, r1 = corners.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    c2, r2 = corners.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    loss_compiled = compiled(c1, r1)
    loss_compiled.backward()
    loss_eager = step(c2, r2)
    loss_eager.backward()
    torch.testing.assert_close(loss_compiled, loss_eager)
    torch.testing.assert_close(c1.grad, c2.grad)
    torch.testing.assert_close(r1.grad, r2.grad)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_autocast_bf16_corners_with_fp32_reference_boxes(backend):
    """Under CPU autocast, bf16 corner logits meet fp32 reference boxes: decoded in float32."""
    if backend == "cpp":
        require_backend("cpp")
    g = torch.Generator().manual_seed(0)
    project = weighting_function(32, 0.5, 4.0)
    corners = torch.randn(3, 5, 4 * 33, generator=g).bfloat16()
    ref = torch.rand(3, 5, 4, generator=g) * 0.5 + 0.1
    expected = fdr_decode_reference(corners.float(), project, ref, 4.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        boxes, stats = fdr_decode(corners, project, ref, 4.0, backend=backend)
    assert boxes.dtype == torch.float32 and stats.dtype == torch.float32
    torch.testing.assert_close(boxes, expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats, expected[1], rtol=1e-5, atol=1e-6)
