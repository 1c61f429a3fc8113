"""The C++ CPU kernels of fdr_decode, fgl_loss and ddf_loss have a baseline-x86-64 copy (row kernels)
and an AVX2 copy (lane kernels for float32 rows of 33 bins, row kernels for the rest; fgl_loss and
ddf_loss also have 16-row AVX-512 kernels), picked at run time. DFINE_CPU_DISABLE_AVX2=1 forces the baseline
copy (what CPUs without AVX2 run) and DFINE_CPU_DISABLE_AVX512=1 the AVX2 one, here in subprocesses:
all must agree with each other and with the references."""

import os
import subprocess
import sys

import torch

from dfine.ops import (ddf_loss_reference, fdr_decode_reference, fgl_loss_reference, weighting_function)
from tests.conftest import require_backend

_SCRIPT = """
import sys, torch
from dfine.ops import ddf_loss, fdr_decode, fgl_loss
x = torch.load(sys.argv[1])
corners = x["corners"].clone().requires_grad_()
ref = x["ref"].clone().requires_grad_()
boxes, stats = fdr_decode(corners, x["project"], ref, 4.0, backend="cpp")
g_corners, g_ref = torch.autograd.grad([boxes, stats], [corners, ref], [x["grad_boxes"], x["grad_stats"]])
pred = x["pred"].clone().requires_grad_()
fgl = fgl_loss(pred, x["target"], x["wl"], x["wr"], x["weight"], reduction="none", backend="cpp")
g_fgl, = torch.autograd.grad(fgl, pred, x["upstream"])
ddf = ddf_loss(pred, x["teacher"], x["weight"], backend="cpp")
g_ddf, = torch.autograd.grad(ddf, pred, x["upstream"])
torch.save([t.detach() for t in (boxes, stats, g_corners, g_ref, fgl, g_fgl, ddf, g_ddf)], sys.argv[2])
"""


def test_cpp_baseline_and_avx2_copies_agree(tmp_path):
    require_backend("cpp")
    gen = torch.Generator().manual_seed(7)
    boxes, rows = 13, 45  # lane groups plus a remainder in both ops (45 rows = 2 x 16 + 8 + 5)
    x = dict(
        corners=torch.randn(boxes, 4 * 33, generator=gen) * 3,
        ref=torch.cat([torch.rand(boxes, 2, generator=gen) * 0.8 + 0.1, torch.rand(boxes, 2, generator=gen) * 0.4 + 0.05], -1),
        project=weighting_function(32, 0.5, 4.0),
        grad_boxes=torch.randn(boxes, 4, generator=gen),
        grad_stats=torch.randn(boxes, 4, 5, generator=gen),
        pred=torch.randn(rows, 33, generator=gen) * 3,
        teacher=torch.randn(rows, 33, generator=gen) * 3,
        target=torch.rand(rows, generator=gen) * 31.9,
        weight=torch.rand(rows, generator=gen),
        upstream=torch.rand(rows, generator=gen) + 0.5,
    )
    x["wr"] = x["target"] - x["target"].floor()
    x["wl"] = 1 - x["wr"]
    torch.save(x, tmp_path / "inputs.pt")
    results = []
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for no_avx2, no_avx512 in (("0", "0"), ("0", "1"), ("1", "1")):
        out_file = tmp_path / f"out_{no_avx2}{no_avx512}.pt"
        env = dict(os.environ, DFINE_CPU_DISABLE_AVX2=no_avx2, DFINE_CPU_DISABLE_AVX512=no_avx512)
        subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path / "inputs.pt"), str(out_file)],
                       check=True, env=env, cwd=root, capture_output=True)
        results.append(torch.load(out_file))
    names = ["boxes", "lqe_stats", "grad corners", "grad ref", "fgl", "grad fgl", "ddf", "grad ddf"]
    for other in results[1:]:
        for name, a, b in zip(names, results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6, msg=name)
    want_boxes, want_stats = fdr_decode_reference(x["corners"], x["project"], x["ref"], 4.0)
    want_fgl = fgl_loss_reference(x["pred"], x["target"], x["wl"], x["wr"], x["weight"], reduction="none")
    want_ddf = ddf_loss_reference(x["pred"], x["teacher"], x["weight"])
    for copy in results:
        torch.testing.assert_close(copy[0], want_boxes, rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(copy[1], want_stats, rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(copy[4], want_fgl, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(copy[6], want_ddf, rtol=1e-5, atol=1e-5)
