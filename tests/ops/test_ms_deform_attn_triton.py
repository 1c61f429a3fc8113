"""Triton-specific tests of ms_deform_attn (CPU tensors under TRITON_INTERPRET=1).

The comparisons with the reference (random shapes, fp64, fp16/bf16, pixel centres and edges, far
outside and huge locations, many queries on one pixel, non-contiguous inputs, empty inputs) are
cases of ``TestMsDeformAttn`` in test_ms_deform_attn.py, run there on every backend. Here: the
custom op's registration, the kernels' lowering for CUDA, a launch configuration that the
small test shapes do not reach, and the deterministic backward. Every test calls
require_backend("triton") first so that a missing Triton fails in CI instead of skipping.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import require_backend
from tests.ops.op_tester import Call
from tests.ops import test_ms_deform_attn as msda  # a module: an imported test class would be collected again


def test_custom_op_registration():
    """Schema, fake (meta) kernel and autograd registration of the Triton custom op."""
    require_backend("triton")
    value, spatial_shapes, loc, attn, npl = msda.make_off_pixel_inputs(1, 2, 1, 3, [(3, 4), (1, 2)], [2, 1], seed=23)
    args = (value.requires_grad_(), spatial_shapes, loc.requires_grad_(), attn.requires_grad_(), npl)
    torch.library.opcheck(torch.ops.dfine.ms_deform_attn_triton.default, args)


def test_kernels_lower_to_cuda_without_a_gpu(tmp_path):
    """The kernels cannot run on CUDA here, but they must compile for it: lower the forward, the two
    backwards (atomic; deterministic pass 1) and the gather kernel (fp32; fp64 with fp64 atomics;
    bf16 with fp32 accumulation) to PTX and cubin for sm_80 in a fresh process with the interpreter
    off and an empty Triton cache."""
    require_backend("triton")
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    code = (
        "from dfine.kernels.ms_deform_attn import compile_kernels_for_cuda\n"
        "import torch\n"
        "sizes = compile_kernels_for_cuda(dtypes=(torch.float32, torch.float64, torch.bfloat16))\n"
        "assert len(sizes) == 12 and min(sizes.values()) > 0, sizes\n"
        "print(sorted(sizes))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "_ms_deform_attn_bwd_kernel[deterministic]" in done.stdout and "_ms_deform_attn_gather_kernel" in done.stdout


def test_several_query_blocks_with_a_partial_last_block(monkeypatch):
    """Small tiles force BLOCK_Q = 2, so Q = 5 spans three programs per (b, m), the last one
    half masked; the small test shapes elsewhere fit in one query block."""
    require_backend("triton")
    import dfine.kernels.ms_deform_attn as triton_kernels

    monkeypatch.setattr(triton_kernels, "_MAX_TILE", 16)
    assert triton_kernels._default_block_q(5, 8) == 2
    inputs = msda.as_inputs(msda.make_off_pixel_inputs(2, 5, 2, 8, [(4, 5), (2, 3)], [3, 6], seed=29), "cpu")
    call = Call(inputs, grad=msda.ALL_GRADS, compare_grad=msda.ALL_GRADS, dtype=torch.float32)
    msda.TestMsDeformAttn().check_against_reference(call, "triton")


# ---- deterministic backward ----------------------------------------------------------------------


@pytest.fixture
def deterministic_algorithms():
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.fixture
def gather_launches(monkeypatch):
    """The grids the deterministic gather kernel is launched with (empty: the atomic backward ran)."""
    import dfine.kernels.ms_deform_attn as triton_kernels

    grids = []
    kernel = triton_kernels._ms_deform_attn_gather_kernel

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(triton_kernels, "_ms_deform_attn_gather_kernel", Recorder())
    return grids


def _same_bits(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_backward(deterministic_algorithms, gather_launches, monkeypatch, dtype):
    """Under torch.use_deterministic_algorithms(True) the backward takes the two-pass gather: it
    matches the reference, gives the same bits when run again, and the same bits with another split
    of the queries over programs (BLOCK_Q 2 instead of 4: on a GPU, another scheduling). Tiny
    shapes: the interpreter runs the gather's per-row loops one program at a time."""
    require_backend("triton")
    import dfine.kernels.ms_deform_attn as triton_kernels

    value, shapes, loc, attn, points = msda.make_off_pixel_inputs(1, 3, 2, 4, [(3, 4), (2, 2)], [2, 2], dtype=dtype,
                                                                  seed=37)
    loc[:, :2] = loc[:1, :1, :1]  # queries 0 and 1 of every head sample the same pixels
    call = Call(msda.as_inputs((value, shapes, loc, attn, points), "cpu"), grad=msda.ALL_GRADS,
                compare_grad=msda.ALL_GRADS, dtype=dtype)
    tester = msda.TestMsDeformAttn()
    first = tester.check_against_reference(call, "triton")
    assert gather_launches == [(1 * (12 + 4) * 2,)]  # one program per value row (b, s, m)
    again = tester.run(tester.fused_fn("triton"), call.inputs, call.grad, dtype)
    assert _same_bits(first[0], again[0]) and _same_bits(first[1].values(), again[1].values())
    assert triton_kernels._default_block_q(3, 4) == 4
    monkeypatch.setattr(triton_kernels, "_MAX_TILE", 8)
    assert triton_kernels._default_block_q(3, 4) == 2
    other_split = tester.run(tester.fused_fn("triton"), call.inputs, call.grad, dtype)
    assert _same_bits(first[0], other_split[0]) and _same_bits(first[1].values(), other_split[1].values())


def test_default_backward_uses_the_atomics(gather_launches):
    """Without deterministic mode the backward stays the one-pass atomic kernel (no gather)."""
    require_backend("triton")
    assert not torch.are_deterministic_algorithms_enabled()
    inputs = msda.as_inputs(msda.make_off_pixel_inputs(1, 2, 2, 4, [(3, 4), (2, 2)], [1, 1], seed=41), "cpu")
    call = Call(inputs, grad=msda.ALL_GRADS, compare_grad=msda.ALL_GRADS, dtype=torch.float32)
    msda.TestMsDeformAttn().check_against_reference(call, "triton")
    assert gather_launches == []
