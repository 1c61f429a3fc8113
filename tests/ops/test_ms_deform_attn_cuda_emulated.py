"""The CUDA kernels of ms_deform_attn, run on the CPU over emulated warps.

``torch.ops.dfine_testing.ms_deform_attn_{forward,backward}_emulated`` (csrc/ms_deform_attn/cuda/
emulated_warps.cpp) run the warp bodies and the host sequence of csrc/ms_deform_attn/cuda/coalesced.h,
exactly what the CUDA op launches, with the 32 lanes of each warp emulated (shuffles read the other
lanes' values, atomics are plain additions). Without a GPU this is what checks the CUDA kernels'
lane math: against the grid_sample reference on the OpTester cases of test_ms_deform_attn.py, in
every dtype and lane layout (vector width, lanes per row, rounds over the channels), for the atomic
and the deterministic backward; plus the layout choice and the determinism of the two-pass backward
under any warp order (a stand-in for a GPU's scheduling). What only a GPU can check (real shuffles,
atomics, vector loads and their speed) is listed in docs/kernels.md.
"""

import pytest
import torch

from tests.conftest import require_backend
from tests.ops import test_ms_deform_attn as msda  # a module: an imported test class would be collected again
from tests.ops.op_tester import Call

HALF = (torch.float16, torch.bfloat16)


def emulated():
    require_backend("cpp")
    return torch.ops.dfine_testing


class _EmulatedCuda(torch.autograd.Function):
    """The emulated CUDA forward and backward as one differentiable op."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, sampling_locations, attention_weights, num_points_list, config):
        ctx.save_for_backward(value, spatial_shapes, sampling_locations, attention_weights)
        ctx.num_points_list, ctx.config = num_points_list, config
        return emulated().ms_deform_attn_forward_emulated(value, spatial_shapes, sampling_locations, attention_weights,
                                                          num_points_list, config["vec"], config["group"])

    @staticmethod
    def backward(ctx, grad_output):
        value, spatial_shapes, loc, attn = ctx.saved_tensors
        c = ctx.config
        grad_value, grad_loc, grad_attn = emulated().ms_deform_attn_backward_emulated(
            grad_output, value, spatial_shapes, loc, attn, ctx.num_points_list, c["deterministic"], c["vec"],
            c["group"], c["seed"])
        return grad_value, None, grad_loc, grad_attn, None, None


def emulated_tester(vec=0, group=0, deterministic=False, seed=-1):
    """TestMsDeformAttn's comparisons, with the emulated CUDA op as the fused op."""
    config = dict(vec=vec, group=group, deterministic=deterministic, seed=seed)
    t = msda.TestMsDeformAttn()
    t.fused_fn = lambda backend: lambda **kw: _EmulatedCuda.apply(
        kw["value"], kw["spatial_shapes"], kw["sampling_locations"], kw["attention_weights"], kw["num_points_list"],
        config)
    return t


# OpTester cases of ms_deform_attn (test_ms_deform_attn.py), each with the lane layouts it runs in:
# (vec, group), 0 = the layout the GPU would get. D of a case bounds the vector widths.
LAYOUTS_ANY_D = [(0, 0), (1, 1), (1, 2), (1, 32)]
CASES = {
    "random": LAYOUTS_ANY_D,  # D = 3: 4 lanes, one idle
    "random_3_levels": LAYOUTS_ANY_D + [(2, 2), (4, 1), (2, 8)],  # D = 8: two rounds with (2, 2)
    "random_6_6_points": LAYOUTS_ANY_D + [(2, 4)],
    "single": LAYOUTS_ANY_D,
    "off_pixel_3_6_3_points": LAYOUTS_ANY_D + [(4, 2), (2, 2)],
    "off_pixel_1x1_levels": LAYOUTS_ANY_D,
    "borders": LAYOUTS_ANY_D,
    "far_outside": LAYOUTS_ANY_D,
    "far_outside_huge": LAYOUTS_ANY_D,
    "infinite_and_nan_locations": LAYOUTS_ANY_D,
    "one_by_one_levels": LAYOUTS_ANY_D,
    "many_queries_on_the_same_pixel": LAYOUTS_ANY_D + [(4, 1)],
    "non_contiguous": LAYOUTS_ANY_D + [(2, 1)],
    "d13": LAYOUTS_ANY_D + [(1, 4)],  # D = 13: 16 lanes, or 4 lanes in 4 rounds
    "dfine_l": [(0, 0), (2, 4)],  # D = 32: float4 loads, 8 lanes per row
}
PARAMS = [pytest.param(name, vec, group, det, id=f"{name}-v{vec}-g{group}-{'det' if det else 'atomic'}")
          for name, layouts in CASES.items() for vec, group in layouts for det in (False, True)]


@pytest.mark.parametrize("case_name, vec, group, deterministic", PARAMS)
def test_emulated_cuda_kernels_match_the_reference(case_name, vec, group, deterministic):
    t = emulated_tester(vec, group, deterministic)
    t.check_against_reference(t.make_call(case_name, torch.float32, "cpu"), "cpp")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vec", [0, 1, 2])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
def test_emulated_cuda_kernels_in_every_dtype(dtype, vec, deterministic):
    """float64 (double atomics), fp16/bf16 (16-bit loads, float32 arithmetic and accumulation; 8 per
    vector by default for D = 8)."""
    t = emulated_tester(vec, 0, deterministic)
    name = "half" if dtype in HALF else "off_pixel_fp64"
    t.check_against_reference(t.make_call(name, dtype, "cpu"), "cpp")


def test_emulated_gradcheck():
    t = emulated_tester(1, 4)
    call = t.make_call("gradcheck", torch.float64, "cpu")
    fn = t.fused_fn("cpp")
    names = call.grad
    args = tuple(call.inputs[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(lambda *d: fn(**{**call.inputs, **dict(zip(names, d))}), args, **t.gradcheck_kwargs)


def test_emulated_empty_inputs():
    for name in ("empty", "empty_queries"):
        t = emulated_tester()
        call = t.make_call(name, torch.float32, "cpu")
        out, grads = t.check_against_reference(call, "cpp")
        assert out[0].numel() == 0 and all(torch.all(g == 0) for g in grads.values())


# ---- the layout choice ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "D, elem_size, max_vec, expected",
    [
        (32, 4, 4, [4, 8, 1]),  # D-FINE-L float32: float4 loads, 8 lanes per row, 4 rows per warp
        (32, 2, 8, [8, 4, 1]),  # bf16/fp16: 8 channels (16 bytes) per load, 4 lanes per row
        (16, 4, 4, [4, 4, 1]),  # D-FINE-N float32
        (32, 8, 2, [2, 16, 1]),  # float64: 2 per load
        (33, 4, 4, [1, 32, 2]),  # odd D: scalar loads, a full warp per row, two rounds
        (13, 4, 4, [1, 16, 1]),
        (256, 4, 4, [4, 32, 2]),
        (32, 4, 1, [1, 32, 1]),  # a pointer aligned to 4 bytes only: scalar loads
        (6, 2, 8, [2, 4, 1]),  # 6 = 2 * 3: pairs
        (1, 4, 4, [1, 1, 1]),
    ],
)
def test_layout_choice(D, elem_size, max_vec, expected):
    assert list(emulated().ms_deform_attn_cuda_layout(D, elem_size, max_vec)) == expected


def test_forced_layouts_are_checked():
    with pytest.raises(RuntimeError, match=r"vec=4 is not a valid vector width for D=6"):
        emulated().ms_deform_attn_cuda_layout(6, 4, 4, vec=4)
    with pytest.raises(RuntimeError, match=r"vec=8 is not a valid vector width"):
        emulated().ms_deform_attn_cuda_layout(32, 4, 4, vec=8)  # 32 bytes per load
    with pytest.raises(RuntimeError, match=r"group=3 must be a power of two <= 32"):
        emulated().ms_deform_attn_cuda_layout(32, 4, 4, group=3)
    assert list(emulated().ms_deform_attn_cuda_layout(32, 4, 4, vec=2, group=4)) == [2, 4, 4]


def _inputs(dtype=torch.float32, D=8, seed=5):
    value, shapes, loc, attn, points = msda.make_off_pixel_inputs(2, 7, 2, D, [(5, 6), (3, 4), (2, 2)], [3, 6, 3],
                                                                  dtype=dtype, seed=seed)
    # queries 0..2 of every head sample one pixel: many additions to the same grad_value rows
    loc[:, :3] = loc[:1, :1, :1, :, :]
    grad_out = torch.randn(2, 7, 2 * D, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return grad_out.to(dtype), value, shapes, loc, attn, points


def test_misaligned_value_gets_scalar_loads_and_the_same_result():
    """A contiguous value tensor 4 bytes off a 16-byte boundary cannot be read as float4: the host
    picks scalar loads (vec 1). The forward sums every channel in the same order for every layout,
    so the output is the same bits."""
    _, value, shapes, loc, attn, points = _inputs()
    buffer = torch.empty(value.numel() + 1)
    shifted = buffer[1:].view(value.shape)
    shifted.copy_(value)
    assert shifted.data_ptr() % 16 != 0
    ops = emulated()
    aligned = ops.ms_deform_attn_forward_emulated(value, shapes, loc, attn, points)
    assert torch.equal(ops.ms_deform_attn_forward_emulated(shifted, shapes, loc, attn, points), aligned)
    with pytest.raises(RuntimeError, match=r"vec=4 is not a valid vector width .* aligned to 1 elements"):
        ops.ms_deform_attn_forward_emulated(shifted, shapes, loc, attn, points, vec=4)
    for vec, group in ((1, 1), (2, 2), (4, 8), (1, 32)):
        assert torch.equal(ops.ms_deform_attn_forward_emulated(value, shapes, loc, attn, points, vec, group), aligned)


# ---- determinism -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_backward_is_the_same_bits_for_any_warp_order_and_layout(dtype):
    """The two-pass backward sums each grad_value element over its sorted entries: the same bits
    whatever order the warps run in and whatever the lane layout. grad_sampling_locations and
    grad_attention_weights (a butterfly over the group's lanes) are the same bits for any warp
    order; their summation tree, and so their last bits, depend on the group size."""
    grad_out, value, shapes, loc, attn, points = _inputs(dtype)
    ops = emulated()

    def backward(seed, vec=0, group=0):
        return ops.ms_deform_attn_backward_emulated(grad_out, value, shapes, loc, attn, points, True, vec, group, seed)

    first = backward(-1)
    for seed in (0, 1, 2):
        again = backward(seed)
        for a, b in zip(again, first):
            assert torch.equal(a, b)
    for vec, group in ((1, 1), (2, 2), (1, 32)):
        other = backward(3, vec, group)
        assert torch.equal(other[0], first[0])
        torch.testing.assert_close(other[1], first[1])
        torch.testing.assert_close(other[2], first[2])


def test_atomic_backward_depends_on_the_warp_order():
    """The witness that the test above can fail: the default (atomic) backward adds to grad_value in
    the order the warps run, and another order changes low bits (the values still agree)."""
    grad_out, value, shapes, loc, attn, points = _inputs(D=8, seed=9)
    ops = emulated()
    # one row per warp (group 32): 28 warp items to reorder
    in_order = ops.ms_deform_attn_backward_emulated(grad_out, value, shapes, loc, attn, points, False, 1, 32, -1)
    shuffled = [ops.ms_deform_attn_backward_emulated(grad_out, value, shapes, loc, attn, points, False, 1, 32, seed)
                for seed in range(4)]
    assert any(not torch.equal(s[0], in_order[0]) for s in shuffled)
    for s in shuffled:
        torch.testing.assert_close(s[0], in_order[0], rtol=1e-5, atol=1e-6)
        assert torch.equal(s[1], in_order[1]) and torch.equal(s[2], in_order[2])  # no atomics there


@pytest.fixture
def restore_deterministic_algorithms():
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.mark.parametrize("warn_only", [False, True])
def test_backward_follows_torch_use_deterministic_algorithms(restore_deterministic_algorithms, warn_only):
    """deterministic=None decides as the CUDA op does (coalesced.h's deterministic_backward()): the
    two-pass gather under torch.use_deterministic_algorithms(True), with or without warn_only
    (train.py --deterministic sets warn_only), the atomics otherwise."""
    grad_out, value, shapes, loc, attn, points = _inputs(D=8, seed=9)
    ops = emulated()

    def backward(deterministic, seed):
        return ops.ms_deform_attn_backward_emulated(grad_out, value, shapes, loc, attn, points, deterministic, 1, 32,
                                                    seed)

    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    two_pass = backward(True, -1)
    for seed in (-1, 0, 1, 2, 3):
        assert all(torch.equal(a, b) for a, b in zip(backward(None, seed), two_pass))
    torch.use_deterministic_algorithms(False)
    atomic = [backward(False, seed) for seed in range(4)]
    for seed in range(4):
        assert all(torch.equal(a, b) for a, b in zip(backward(None, seed), atomic[seed]))
    assert any(not torch.equal(a[0], two_pass[0]) for a in atomic)  # the two paths are told apart
