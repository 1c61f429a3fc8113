"""The launch configurations that the Triton kernels autotune over on a GPU (kernels/_triton.py's
``autotuned``): every candidate must give the reference's results, and must lower for CUDA.

Under the interpreter (CI, this CPU) the kernels launch with their default tile, so the candidates
are run here by forcing each in turn (``FixedLaunch.forced``) on shapes whose row or query count is
not a multiple of the tile. In a fresh process with the interpreter off, the decorator must build
``triton.autotune`` wrappers keyed as documented, and every candidate must compile to PTX and cubin
for sm_80 (no GPU needed). Timing the candidates needs a GPU: scripts/gpu_check.sh.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dfine.kernels import _triton
from dfine.kernels import fdr_decode as fdr_kernels
from dfine.kernels import golsd_losses as loss_kernels
from dfine.kernels import ms_deform_attn as msda_kernels
from dfine.ops import ddf_loss, ddf_loss_reference, fdr_decode, fdr_decode_reference, fgl_loss, fgl_loss_reference
from dfine.ops import ms_deform_attn, ms_deform_attn_reference, weighting_function
from tests.conftest import require_backend
from tests.ops import test_ms_deform_attn as msda

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _triton_interpreted():
    require_backend("triton")
    if not _triton.INTERPRETED:
        pytest.skip("these cases force configurations of the interpreted kernels (TRITON_INTERPRET=1)")


@contextlib.contextmanager
def forced(kernels, config):
    with contextlib.ExitStack() as stack:
        for kernel in kernels:
            assert isinstance(kernel, _triton.FixedLaunch), type(kernel)
            stack.enter_context(kernel.forced(config))
        yield


def _values_and_grads(fn, inputs, seed=3):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    gen = torch.Generator().manual_seed(seed)
    floating = [o for o in outputs if o.is_floating_point()]
    upstream = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in floating]
    grads = torch.autograd.grad(floating, leaves, upstream, allow_unused=True)
    return [o.detach() for o in outputs] + [g for g in grads if g is not None]


def _assert_all_close(actual, expected, tol):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        if not e.is_floating_point():
            assert torch.equal(a, e), f"output {i}"
            continue
        torch.testing.assert_close(a.double(), e.double(), rtol=tol, atol=tol, msg=lambda m: f"tensor {i}: {m}")


ROW_CONFIGS = [pytest.param(c, id=f"BLOCK{c.kwargs['BLOCK']}-w{c.num_warps}") for c in _triton.ROW_TILE_CONFIGS]


def test_row_tile_default_is_a_candidate():
    assert any(c.kwargs == _triton.ROW_TILE_DEFAULT for c in _triton.ROW_TILE_CONFIGS)
    assert len({(tuple(c.kwargs.items()), c.num_warps) for c in _triton.ROW_TILE_CONFIGS}) == len(
        _triton.ROW_TILE_CONFIGS)


@pytest.mark.parametrize("config", ROW_CONFIGS)
def test_fdr_decode_every_row_tile(config):
    rows = 2 * config.kwargs["BLOCK"] + 3  # two full tiles and a partial one
    gen = torch.Generator().manual_seed(1)
    corners = torch.randn(rows, 4 * 33, generator=gen, dtype=torch.float64) * 3
    ref = torch.rand(rows, 4, generator=gen, dtype=torch.float64) * 0.5 + 0.25
    project = weighting_function(32, 0.5, 4.0, dtype=torch.float64)
    expected = _values_and_grads(lambda z, r: fdr_decode_reference(z, project, r, 4.0), (corners, ref))
    with forced((fdr_kernels._fdr_decode_forward_kernel, fdr_kernels._fdr_decode_backward_kernel), config):
        actual = _values_and_grads(lambda z, r: fdr_decode(z, project, r, 4.0, backend="triton"), (corners, ref))
    _assert_all_close(actual, expected, 1e-9)


@pytest.mark.parametrize("config", ROW_CONFIGS)
def test_fgl_and_ddf_every_row_tile(config):
    rows = config.kwargs["BLOCK"] + 5
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(rows, 33, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(rows, 33, generator=gen, dtype=torch.float64) * 2
    target = torch.rand(rows, generator=gen, dtype=torch.float64) * 31.5
    wl, wr = torch.rand(rows, generator=gen, dtype=torch.float64), torch.rand(rows, generator=gen, dtype=torch.float64)
    weight = torch.rand(rows, generator=gen, dtype=torch.float64)
    fgl_expected = _values_and_grads(lambda p: fgl_loss_reference(p, target, wl, wr, weight, reduction="none"), (z,))
    ddf_expected = _values_and_grads(lambda p: ddf_loss_reference(p, teacher, weight, 5.0), (z,))
    kernels = (loss_kernels._fgl_forward_kernel, loss_kernels._fgl_backward_kernel, loss_kernels._ddf_forward_kernel,
               loss_kernels._ddf_backward_kernel)
    with forced(kernels, config):
        fgl_actual = _values_and_grads(lambda p: fgl_loss(p, target, wl, wr, weight, reduction="none",
                                                          backend="triton"), (z,))
        ddf_actual = _values_and_grads(lambda p: ddf_loss(p, teacher, weight, 5.0, backend="triton"), (z,))
    _assert_all_close(fgl_actual, fgl_expected, 1e-9)
    _assert_all_close(ddf_actual, ddf_expected, 1e-9)


Q_CONFIGS = [pytest.param(c, id=f"BLOCK_Q{c.kwargs['BLOCK_Q']}-w{c.num_warps}") for c in msda_kernels._Q_TILE_CONFIGS]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("config", Q_CONFIGS)
def test_ms_deform_attn_every_query_tile(config, deterministic):
    queries = config.kwargs["BLOCK_Q"] + 3  # a full query block and a partial one per (b, m)
    value, shapes, loc, attn, points = msda.make_off_pixel_inputs(2, queries, 2, 5, [(4, 5), (2, 3)], [2, 1],
                                                                  dtype=torch.float64, seed=7)
    expected = _values_and_grads(lambda v, l, a: ms_deform_attn_reference(v, shapes, l, a, points), (value, loc, attn))
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        with forced((msda_kernels._ms_deform_attn_fwd_kernel, msda_kernels._ms_deform_attn_bwd_kernel), config):
            actual = _values_and_grads(lambda v, l, a: ms_deform_attn(v, shapes, l, a, points, backend="triton"),
                                       (value, loc, attn))
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    _assert_all_close(actual, expected, 1e-9)


def test_query_tiles_are_pruned_to_the_call():
    """Candidates whose tile is too large for D, or far taller than Q, are not timed; one always remains."""
    configs = msda_kernels._Q_TILE_CONFIGS
    fit = msda_kernels._fitting_q_tiles(configs, {"BLOCK_D": 32, "Q": 300})
    assert fit and all(c.kwargs["BLOCK_Q"] * 32 <= msda_kernels._MAX_TUNED_TILE for c in fit)
    assert {c.kwargs["BLOCK_Q"] for c in fit} == {8, 16, 32, 64}
    few_queries = msda_kernels._fitting_q_tiles(configs, {"BLOCK_D": 32, "Q": 3})
    assert {c.kwargs["BLOCK_Q"] for c in few_queries} == {8}
    wide = msda_kernels._fitting_q_tiles(configs, {"BLOCK_D": 1024, "Q": 300})
    assert [c.kwargs["BLOCK_Q"] for c in wide] == [8]  # none fits 4096 elements: the smallest is kept


def test_forced_configuration_is_the_one_launched(monkeypatch):
    """FixedLaunch passes the forced block size (not the default) and sizes the grid from it."""
    kernel = fdr_kernels._fdr_decode_forward_kernel
    launched = []

    class Recorder:
        arg_names = kernel.fn.arg_names

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((grid, kwargs["BLOCK"]))

    monkeypatch.setattr(kernel, "fn", Recorder())
    corners = torch.zeros(100, 4 * 33)
    project = weighting_function(32, 0.5, 4.0)
    fdr_kernels.fdr_decode_forward_triton(corners, project, torch.full((100, 4), 0.5), 4.0, 4)
    with kernel.forced(_triton.launch_config({"BLOCK": 16}, 2)):
        fdr_kernels.fdr_decode_forward_triton(corners, project, torch.full((100, 4), 0.5), 4.0, 4)
    assert launched == [((4,), 32), ((7,), 16)]


_COMPILED_CHECK = """
import torch
from triton.runtime.autotuner import Autotuner
from dfine.kernels import _triton, fdr_decode, golsd_losses, ms_deform_attn

assert not _triton.INTERPRETED
kernels = {
    fdr_decode._fdr_decode_forward_kernel: ["NB", "K"], fdr_decode._fdr_decode_backward_kernel: ["NB", "K"],
    golsd_losses._fgl_forward_kernel: ["NB", "HAS_WEIGHT"], golsd_losses._ddf_backward_kernel: ["NB", "HAS_WEIGHT"],
    ms_deform_attn._ms_deform_attn_fwd_kernel: ["D", "P"],
    ms_deform_attn._ms_deform_attn_bwd_kernel: ["D", "P", "DETERMINISTIC"],
}
for kernel, key in kernels.items():
    assert isinstance(kernel, Autotuner), type(kernel)
    assert kernel.keys == key, (kernel.keys, key)
    assert len(kernel.configs) >= 3
assert ms_deform_attn._ms_deform_attn_bwd_kernel.reset_to_zero == ["grad_value_ptr"]
sizes = {}
sizes.update(fdr_decode.compile_kernels_for_cuda(dtypes=(torch.float32,)))
sizes.update(golsd_losses.compile_kernels_for_cuda(dtypes=(torch.float32,)))
sizes.update(ms_deform_attn.compile_kernels_for_cuda(dtypes=(torch.float32,), tuned_configs=True))
assert min(sizes.values()) > 0, sizes
print(len(sizes))
"""


def test_every_candidate_lowers_to_cuda_without_a_gpu(tmp_path):
    """With the interpreter off the kernels are triton.autotune wrappers with the documented keys, and
    every candidate configuration compiles for sm_80 (fp32): 2 decode and 4 loss kernels x 3 row
    tiles, the forward and the two backwards x the query tiles that fit D = 32, and the gather kernel."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _COMPILED_CHECK], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    fitting = len(msda_kernels._fitting_q_tiles(msda_kernels._Q_TILE_CONFIGS, {"BLOCK_D": 32, "Q": 300}))
    assert int(done.stdout.split()[-1]) == 6 * len(_triton.ROW_TILE_CONFIGS) + 3 * fitting + 1
