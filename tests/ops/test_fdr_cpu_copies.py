"""The C++ CPU kernels of fdr_decode, fgl_loss and ddf_loss are one width-generic source (fdr_math.h's
templates on vectors of float32 rows, csrc/fdr/cpu/) compiled into one copy per ISA: the baseline
x86-64 copy and the AVX2 (+ FMA) copy, picked at run time. DFINE_CPU_DISABLE_AVX2=1 forces the
baseline copy (what CPUs without AVX2 run); DFINE_CPU_DISABLE_AVX512=1 is accepted (there is no
AVX-512 copy). Each runs here in a subprocess: all copies must agree with each other and with the
references, on D-FINE's 33 bins (full and partial lane groups) and on another bin count."""

import os
import subprocess
import sys

import torch

from dfine.ops import ddf_loss_reference, fdr_decode_reference, fgl_loss_reference, weighting_function
from tests.conftest import require_backend

_SCRIPT = """
import sys, torch
from dfine.ops import ddf_loss, fdr_decode, fgl_loss
x = torch.load(sys.argv[1])
out = []
for suffix in ("", "_17"):
    corners = x["corners" + suffix].clone().requires_grad_()
    ref = x["ref"].clone().requires_grad_()
    boxes, stats = fdr_decode(corners, x["project" + suffix], ref, 4.0, backend="cpp")
    g_corners, g_ref = torch.autograd.grad([boxes, stats], [corners, ref], [x["grad_boxes"], x["grad_stats"]])
    pred = x["pred" + suffix].clone().requires_grad_()
    fgl = fgl_loss(pred, x["target" + suffix], x["wl" + suffix], x["wr" + suffix], x["weight"], reduction="none",
                   backend="cpp")
    g_fgl, = torch.autograd.grad(fgl, pred, x["upstream"])
    ddf = ddf_loss(pred, x["teacher" + suffix], x["weight"], backend="cpp")
    g_ddf, = torch.autograd.grad(ddf, pred, x["upstream"])
    out += [t.detach() for t in (boxes, stats, g_corners, g_ref, fgl, g_fgl, ddf, g_ddf)]
torch.save(out, sys.argv[2])
"""

_NAMES = ["boxes", "lqe_stats", "grad corners", "grad ref", "fgl", "grad fgl", "ddf", "grad ddf"]


def _inputs():
    gen = torch.Generator().manual_seed(7)
    boxes, rows = 13, 45  # 6 groups of 2 boxes + 1, 5 groups of 8 rows + 5
    x = dict(
        ref=torch.cat([torch.rand(boxes, 2, generator=gen) * 0.8 + 0.1,
                       torch.rand(boxes, 2, generator=gen) * 0.4 + 0.05], -1),
        grad_boxes=torch.randn(boxes, 4, generator=gen),
        grad_stats=torch.randn(boxes, 4, 5, generator=gen),
        weight=torch.rand(rows, generator=gen),
        upstream=torch.rand(rows, generator=gen) + 0.5,
    )
    for suffix, reg_max in (("", 32), ("_17", 16)):
        bins = reg_max + 1
        x["corners" + suffix] = torch.randn(boxes, 4 * bins, generator=gen) * 3
        x["project" + suffix] = weighting_function(reg_max, 0.5, 4.0)
        x["pred" + suffix] = torch.randn(rows, bins, generator=gen) * 3
        x["teacher" + suffix] = torch.randn(rows, bins, generator=gen) * 3
        target = torch.rand(rows, generator=gen) * (reg_max - 0.1)
        x["target" + suffix] = target
        x["wr" + suffix] = target - target.floor()
        x["wl" + suffix] = 1 - x["wr" + suffix]
    return x


def test_cpp_isa_copies_agree_with_each_other_and_the_references(tmp_path):
    require_backend("cpp")
    x = _inputs()
    torch.save(x, tmp_path / "inputs.pt")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    results = []
    for no_avx2, no_avx512 in (("0", "0"), ("0", "1"), ("1", "0")):
        out_file = tmp_path / f"out_{no_avx2}{no_avx512}.pt"
        env = dict(os.environ, DFINE_CPU_DISABLE_AVX2=no_avx2, DFINE_CPU_DISABLE_AVX512=no_avx512)
        subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path / "inputs.pt"), str(out_file)],
                       check=True, env=env, cwd=root, capture_output=True)
        results.append(torch.load(out_file))
    names = _NAMES + [n + " (17 bins)" for n in _NAMES]
    for other in results[1:]:
        for name, a, b in zip(names, results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6, msg=name)
    for suffix, offset in (("", 0), ("_17", 8)):
        corners = x["corners" + suffix].clone().requires_grad_()
        ref = x["ref"].clone().requires_grad_()
        boxes, stats = fdr_decode_reference(corners, x["project" + suffix], ref, 4.0)
        g_corners, g_ref = torch.autograd.grad([boxes, stats], [corners, ref], [x["grad_boxes"], x["grad_stats"]])
        pred = x["pred" + suffix].clone().requires_grad_()
        fgl = fgl_loss_reference(pred, x["target" + suffix], x["wl" + suffix], x["wr" + suffix], x["weight"],
                                 reduction="none")
        g_fgl, = torch.autograd.grad(fgl, pred, x["upstream"])
        ddf = ddf_loss_reference(pred, x["teacher" + suffix], x["weight"])
        g_ddf, = torch.autograd.grad(ddf, pred, x["upstream"])
        want = [boxes, stats, g_corners, g_ref, fgl, g_fgl, ddf, g_ddf]
        tolerances = [(1e-5, 2e-6)] * 4 + [(2e-6, 2e-6), (1e-5, 2e-6), (1e-5, 1e-5), (1e-5, 2e-6)]
        for copy in results:
            for i, (name, (rtol, atol)) in enumerate(zip(_NAMES, tolerances)):
                torch.testing.assert_close(copy[offset + i], want[i].detach(), rtol=rtol, atol=atol,
                                           msg=f"{name}{suffix}")
