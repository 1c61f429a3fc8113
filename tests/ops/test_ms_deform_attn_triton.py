"""Triton kernels of ms_deform_attn (run on CPU tensors under TRITON_INTERPRET=1) against the
plain-PyTorch reference: forward output and the gradients of value, sampling_locations and
attention_weights.

The interpreter is slow, so shapes are tiny; every test calls require_backend("triton") first so
that a missing Triton fails in CI instead of skipping.
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from dfine.ops import ms_deform_attn
from tests.conftest import require_backend

FP32_FORWARD_ATOL = 1e-5
FP32_GRAD_RTOL = 1e-4


def _locations_off_pixel_boundaries(B, Q, M, shapes, num_points_list, dtype, gen):
    """Sampling locations whose pixel coordinates (x = loc * W - 0.5) have a fractional part in
    [0.1, 0.9]: bilinear sampling is not differentiable where a coordinate crosses an integer, so
    random points there would make the location gradient depend on which side rounding lands.
    The integer part runs from -1 to W - 1 so some corners fall outside the map (zero padding)."""
    per_level = []
    for (h, w), n in zip(shapes, num_points_list):
        size = torch.tensor([w, h], dtype=torch.float64)
        whole = torch.floor(torch.rand(B, Q, M, n, 2, generator=gen, dtype=torch.float64) * (size + 1)) - 1
        frac = 0.1 + 0.8 * torch.rand(B, Q, M, n, 2, generator=gen, dtype=torch.float64)
        per_level.append((whole + frac + 0.5) / size)
    return torch.cat(per_level, dim=3).to(dtype)


def _make_inputs(B, Q, M, D, shapes, num_points_list, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    P = sum(num_points_list)
    value = torch.randn(B, S, M, D, generator=gen, dtype=torch.float64).to(dtype)
    loc = _locations_off_pixel_boundaries(B, Q, M, shapes, num_points_list, dtype, gen)
    attn = torch.rand(B, Q, M, P, generator=gen, dtype=torch.float64).to(dtype)
    grad_out = torch.randn(B, Q, M * D, generator=gen, dtype=torch.float64).to(dtype)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    return value, spatial_shapes, loc, attn, grad_out


def _run(backend, value, spatial_shapes, loc, attn, num_points_list, grad_out):
    """Forward output and the three input gradients for ``grad_out``."""
    inputs = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
    out = ms_deform_attn(inputs[0], spatial_shapes, inputs[1], inputs[2], num_points_list, backend=backend)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out.detach(), grads


def _assert_matches_reference(value, spatial_shapes, loc, attn, num_points_list, grad_out,
                              fwd_atol=FP32_FORWARD_ATOL, grad_rtol=FP32_GRAD_RTOL, check_loc_grad=True):
    out_t, grads_t = _run("triton", value, spatial_shapes, loc, attn, num_points_list, grad_out)
    out_r, grads_r = _run("reference", value, spatial_shapes, loc, attn, num_points_list, grad_out)
    assert out_t.shape == out_r.shape and out_t.dtype == out_r.dtype
    torch.testing.assert_close(out_t, out_r, atol=fwd_atol, rtol=0)
    names = ["grad_value", "grad_sampling_locations", "grad_attention_weights"]
    for name, g_t, g_r in zip(names, grads_t, grads_r):
        if name == "grad_sampling_locations" and not check_loc_grad:
            continue
        assert g_t.shape == g_r.shape and g_t.dtype == g_r.dtype, name
        # Relative to the gradient's own scale, so tiny entries do not need a tiny relative error.
        scale = max(g_r.abs().max().item(), 1.0)
        torch.testing.assert_close(g_t, g_r, rtol=grad_rtol, atol=grad_rtol * scale, msg=lambda m: f"{name}: {m}")
    return out_t, grads_t


# (B, Q, M, D, shapes, num_points_list): D-FINE's point splits, D not a power of two, 1x1 levels.
RANDOM_CASES = [
    (2, 6, 2, 8, [(5, 7), (3, 4), (2, 2)], [3, 6, 3]),
    (1, 5, 2, 5, [(4, 6), (2, 3)], [6, 6]),
    (2, 3, 1, 3, [(3, 5), (1, 1), (2, 1)], [1, 2, 4]),
    (1, 4, 2, 7, [(1, 1)], [3]),
]


@pytest.mark.parametrize("case", RANDOM_CASES, ids=lambda c: f"B{c[0]}Q{c[1]}M{c[2]}D{c[3]}P" + "-".join(map(str, c[5])))
def test_random_fp32_matches_reference(case):
    require_backend("triton")
    B, Q, M, D, shapes, npl = case
    value, spatial_shapes, loc, attn, grad_out = _make_inputs(B, Q, M, D, shapes, npl, seed=len(shapes) + D)
    out, grads = _assert_matches_reference(value, spatial_shapes, loc, attn, npl, grad_out)
    assert out.shape == (B, Q, M * D)
    assert out.abs().max() > 0 and all(g.abs().max() > 0 for g in grads)


def test_fp64_tight_tolerance():
    require_backend("triton")
    npl = [3, 6, 3]
    value, spatial_shapes, loc, attn, grad_out = _make_inputs(2, 4, 2, 6, [(5, 7), (3, 4), (1, 2)], npl,
                                                              dtype=torch.float64, seed=7)
    _assert_matches_reference(value, spatial_shapes, loc, attn, npl, grad_out, fwd_atol=1e-12, grad_rtol=1e-11)


def test_points_on_pixel_centres_borders_and_edges():
    """Locations exactly on pixel centres (integer pixel coordinates), on pixel edges, and on the
    map border 0 / 1. The location gradient has a kink there, so only the output and the value and
    weight gradients (continuous in the location) are compared."""
    require_backend("triton")
    shapes, npl = [(4, 5), (2, 3)], [4, 4]
    B, Q, M, D = 1, 6, 2, 4
    value, spatial_shapes, _, attn, grad_out = _make_inputs(B, Q, M, D, shapes, npl, seed=3)
    special = []
    for h, w in shapes:
        for size in (w, h):
            centres = [(i + 0.5) / size for i in range(size)]
            edges = [i / size for i in range(size + 1)]  # includes the border values 0 and 1
            special.append(torch.tensor(centres + edges, dtype=torch.float32))
    gen = torch.Generator().manual_seed(5)
    per_level = []
    for lvl, n in enumerate(npl):
        xs, ys = special[2 * lvl], special[2 * lvl + 1]
        ix = torch.randint(len(xs), (B, Q, M, n), generator=gen)
        iy = torch.randint(len(ys), (B, Q, M, n), generator=gen)
        per_level.append(torch.stack([xs[ix], ys[iy]], dim=-1))
    loc = torch.cat(per_level, dim=3)
    loc[0, 0, 0, 0] = torch.tensor([0.0, 0.0])
    loc[0, 0, 0, 1] = torch.tensor([1.0, 1.0])
    _assert_matches_reference(value, spatial_shapes, loc, attn, npl, grad_out, check_loc_grad=False)


def test_far_outside_locations_give_zero():
    """Points far outside [0, 1] (including huge values that would overflow an int conversion)
    contribute nothing and get zero gradients; points just outside still touch the border pixels."""
    require_backend("triton")
    shapes, npl = [(3, 4), (2, 2)], [2, 3]
    value, spatial_shapes, loc, attn, grad_out = _make_inputs(1, 4, 2, 3, shapes, npl, seed=11)
    far = torch.tensor([1e6, -1e6, 1e30, -1e30, 5.0, -3.0])
    loc[0, 0] = far[torch.arange(2 * 5 * 2) % 6].reshape(2, 5, 2)  # every point of query 0 far away
    loc[0, 1, :, :, 0] = -1e6  # query 1: only x is far away
    # Under the interpreter an unguarded float -> int conversion of a huge coordinate shows up as
    # numpy's "invalid value encountered in cast" RuntimeWarning (on a GPU it is undefined
    # behaviour), so the kernels must not emit it.
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _run("triton", value, spatial_shapes, loc, attn, npl, grad_out)
    out, (g_value, g_loc, g_attn) = _assert_matches_reference(value, spatial_shapes, loc, attn, npl, grad_out)
    assert torch.all(out[0, :2] == 0)
    assert torch.all(g_loc[0, :2] == 0) and torch.all(g_attn[0, :2] == 0)
    assert out[0, 2:].abs().max() > 0


def test_many_queries_on_the_same_pixel():
    """All queries and heads sample the same point: the scatter of grad_value adds many
    contributions to the same addresses within one atomic add."""
    require_backend("triton")
    shapes, npl = [(3, 3), (2, 2)], [2, 2]
    value, spatial_shapes, _, attn, grad_out = _make_inputs(2, 6, 2, 4, shapes, npl, seed=13)
    loc = torch.full((2, 6, 2, 4, 2), 0.43)
    _assert_matches_reference(value, spatial_shapes, loc, attn, npl, grad_out)


def test_non_contiguous_inputs():
    require_backend("triton")
    shapes, npl = [(4, 5), (2, 3)], [3, 3]
    B, Q, M, D = 2, 3, 2, 5
    value, spatial_shapes, loc, attn, grad_out = _make_inputs(B, Q, M, D, shapes, npl, seed=17)
    # Same values, strided memory: transposed storage for value/attn, every other element for loc.
    value_nc = value.transpose(1, 3).contiguous().transpose(1, 3)
    loc_nc = torch.stack([loc, torch.zeros_like(loc)], dim=-1)[..., 0]
    attn_nc = attn.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    grad_out_nc = grad_out.transpose(1, 2).contiguous().transpose(1, 2)
    assert not any(t.is_contiguous() for t in (value_nc, loc_nc, attn_nc, grad_out_nc))
    out_nc, grads_nc = _assert_matches_reference(value_nc, spatial_shapes, loc_nc, attn_nc, npl, grad_out_nc)
    out_c, grads_c = _run("triton", value, spatial_shapes, loc, attn, npl, grad_out)
    torch.testing.assert_close(out_nc, out_c, atol=0, rtol=0)
    for g_nc, g_c in zip(grads_nc, grads_c):
        torch.testing.assert_close(g_nc, g_c, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("B,Q", [(0, 4), (2, 0)])
def test_empty_batch_or_no_queries(B, Q):
    require_backend("triton")
    shapes, npl = [(3, 4), (2, 2)], [2, 1]
    value, spatial_shapes, loc, attn, grad_out = _make_inputs(B, Q, 2, 4, shapes, npl)
    value = value.requires_grad_()
    loc = loc.requires_grad_()
    attn = attn.requires_grad_()
    out = ms_deform_attn(value, spatial_shapes, loc, attn, npl, backend="triton")
    assert out.shape == (B, Q, 8)
    g_value, g_loc, g_attn = torch.autograd.grad(out, (value, loc, attn), grad_out)
    assert g_value.shape == value.shape and g_loc.shape == loc.shape and g_attn.shape == attn.shape
    assert torch.all(g_value == 0)


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_against_fp64_reference(dtype, rtol):
    """fp16/bf16 inputs (fp32 arithmetic inside) against the fp64 reference on the same values."""
    require_backend("triton")
    shapes, npl = [(4, 5), (2, 3)], [3, 3]
    value, spatial_shapes, loc, attn, grad_out = _make_inputs(1, 4, 2, 4, shapes, npl, dtype=dtype, seed=19)
    out_t, grads_t = _run("triton", value, spatial_shapes, loc, attn, npl, grad_out)
    assert out_t.dtype == dtype and all(g.dtype == dtype for g in grads_t)
    as64 = [t.double() for t in (value, loc, attn, grad_out)]
    out_r, grads_r = _run("reference", as64[0], spatial_shapes, as64[1], as64[2], npl, as64[3])
    for got, want in zip((out_t,) + tuple(grads_t), (out_r,) + tuple(grads_r)):
        scale = max(want.abs().max().item(), 1.0)
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * scale)


def test_custom_op_registration():
    """Schema, fake (meta) kernel and autograd registration of the Triton custom op."""
    require_backend("triton")
    shapes, npl = [(3, 4), (1, 2)], [2, 1]
    value, spatial_shapes, loc, attn, _ = _make_inputs(1, 2, 1, 3, shapes, npl, seed=23)
    args = (value.requires_grad_(), spatial_shapes, loc.requires_grad_(), attn.requires_grad_(), npl)
    torch.library.opcheck(torch.ops.dfine.ms_deform_attn_triton.default, args)


def test_kernels_lower_to_cuda_without_a_gpu(tmp_path):
    """The kernels cannot run on CUDA here, but they must compile for it: lower both kernels (fp32
    and fp64, the latter with fp64 atomics) to PTX and cubin for sm_80 in a fresh process with the
    interpreter off and an empty Triton cache."""
    require_backend("triton")
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    code = (
        "from kernels.ms_deform_attn import compile_kernels_for_cuda\n"
        "sizes = compile_kernels_for_cuda()\n"
        "assert len(sizes) == 4 and min(sizes.values()) > 0, sizes\n"
        "print(sorted(sizes))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "_ms_deform_attn_bwd_kernel" in done.stdout


def test_several_query_blocks_with_a_partial_last_block(monkeypatch):
    """Small tiles force BLOCK_Q = 2, so Q = 5 spans three programs per (b, m), the last one
    half masked; the small test shapes elsewhere fit in one query block."""
    require_backend("triton")
    import kernels.ms_deform_attn as triton_kernels

    monkeypatch.setattr(triton_kernels, "_MAX_TILE", 16)
    assert triton_kernels._launch_config(5, 8, 2, 2)[0] == 2
    shapes, npl = [(4, 5), (2, 3)], [3, 6]
    value, spatial_shapes, loc, attn, grad_out = _make_inputs(2, 5, 2, 8, shapes, npl, seed=29)
    _assert_matches_reference(value, spatial_shapes, loc, attn, npl, grad_out)
