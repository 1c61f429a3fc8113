"""Calls of the raw ``torch.ops.dfine.*`` C++ entry points, described as JSON-able dicts ("specs"), for
tests/ops/test_raw_entry_points.py.

A spec names the op and the sizes, values and deliberate faults of its arguments; :func:`build`
turns it into the call's arguments (deterministically: the parent process rebuilds the same tensors
to check a result). Run as a module, this file is the child process that makes the calls:

    python -m tests.ops.raw_cases LIBRARY RESULTS < specs.json

It loads the compiled extension by path (``torch.ops.load_library``: no ``import dfine``, so a child
starts in about the time of ``import torch``), prints ``start I`` before and ``done I`` after case I,
and saves every case's outputs, or the exception it raised, to RESULTS. A child killed by a signal
therefore names the case that killed it.
"""

from __future__ import annotations

import json
import sys
import traceback

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "int64": torch.int64,
          "uint8": torch.uint8, "int32": torch.int32}


def _generator(spec):
    return torch.Generator().manual_seed(int(spec.get("seed", 0)))


def _floats(shape, dtype, gen, low=0.0, high=1.0):
    t = torch.rand(*shape, generator=gen, dtype=torch.float64) * (high - low) + low
    return t.to(dtype) if dtype.is_floating_point else (t * 10).to(dtype)


def _spoil(t: torch.Tensor, values: str, gen) -> torch.Tensor:
    """Puts hostile values into a float tensor: "tame" leaves it, "nonfinite" writes NaN, inf and -inf at
    a few places, "huge" scales it by 1e30 (float64) or 1e30 clamped to the dtype's range."""
    if values == "tame" or t.numel() == 0 or not t.dtype.is_floating_point:
        return t
    if values == "huge":
        return (t.double() * 1e30).clamp(-torch.finfo(t.dtype).max, torch.finfo(t.dtype).max).to(t.dtype)
    flat = t.reshape(-1).clone()
    picks = torch.randint(0, flat.numel(), (3,), generator=gen)
    for value, i in zip((float("nan"), float("inf"), float("-inf")), picks.tolist()):
        flat[i] = value
    return flat.reshape(t.shape)


def _noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a strided (non-contiguous) layout."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype) if t.dim() else t
    if t.dim() == 0 or t.shape[-1] == 0:
        return t
    wide[..., ::2] = t
    return wide[..., ::2]


# --------------------------------------------------------------------------------------------
# ms_deform_attn_forward / ms_deform_attn_backward


def build_msda(spec):
    gen = _generator(spec)
    dtype = DTYPES[spec.get("dtype", "float32")]
    B, Q, M, D, S, P = (spec[k] for k in ("B", "Q", "M", "D", "S", "P"))
    fault = spec.get("fault")
    value = torch.randn(B, S, M, D, generator=gen, dtype=torch.float64).to(dtype)
    loc = _spoil(_floats((B, Q, M, P, 2), dtype, gen, -0.2, 1.2), spec.get("values", "tame"), gen)
    attn = _floats((B, Q, M, P), dtype, gen)
    shapes = torch.tensor(spec["shapes"], dtype=torch.int64).reshape(-1, 2)
    npl = list(spec["npl"])
    if fault == "attn_Q":
        attn = _floats((B, Q + 1, M, P), dtype, gen)
    elif fault == "loc_M":
        loc = _floats((B, Q, M + 1, P, 2), dtype, gen)
    elif fault == "loc_coords3":
        loc = _floats((B, Q, M, P, 3), dtype, gen)
    elif fault == "shapes_int32":
        shapes = shapes.to(torch.int32)
    elif fault == "shapes_3cols":
        shapes = torch.cat([shapes, shapes[:, :1]], 1)
    elif fault == "attn_dtype":
        attn = attn.to(torch.float64 if dtype != torch.float64 else torch.float32)
    elif fault == "value_3d":
        value = value.reshape(B, S, M * D)
    elif fault == "noncontiguous":
        value, loc, attn, shapes = (_noncontiguous(t) for t in (value, loc, attn, shapes))
    args = (value, shapes, loc, attn, npl)
    if spec["op"] == "msda_backward":
        grad_shape = (B, Q + (1 if fault == "grad_shape" else 0), M * D)
        grad = torch.randn(*grad_shape, generator=gen, dtype=torch.float64).to(dtype)
        args = (grad,) + args
    return args


def call_msda(spec, args):
    if spec["op"] == "msda_forward":
        return (torch.ops.dfine.ms_deform_attn_forward(*args),)
    return tuple(torch.ops.dfine.ms_deform_attn_backward(*args))


# --------------------------------------------------------------------------------------------
# fdr_decode_forward / fdr_decode_backward


def build_fdr(spec):
    gen = _generator(spec)
    dtype = DTYPES[spec.get("dtype", "float32")]
    R, bins, cols, topk = spec["R"], spec["bins"], spec.get("cols"), spec["topk"]
    cols = 4 * bins if cols is None else cols
    fault = spec.get("fault")
    pred = _spoil(torch.randn(R, cols, generator=gen, dtype=torch.float64).to(dtype) * 3, spec.get("values", "tame"),
                  gen)
    project = torch.linspace(-4, 4, max(bins, 0), dtype=torch.float64).to(dtype)
    ref = _floats((R + (1 if fault == "ref_rows" else 0), 4), dtype, gen, 0.1, 0.9)
    if fault == "project_dtype":
        project = project.to(torch.float64 if dtype != torch.float64 else torch.float32)
    rs = float(spec.get("reg_scale", 4.0))
    if spec["op"] == "fdr_forward":
        return (pred, project, ref, rs, topk)
    k = min(max(topk, 1), 16)  # the saved bins and their gradients of a hostile lqe_topk stay small
    index_kind = spec.get("index", "random")
    index = torch.randint(0, spec.get("index_high", max(bins, 1)), (R, 4, k), generator=gen, dtype=torch.int64)
    index = index.to(torch.int64 if index_kind == "int64" else torch.uint8)
    if index_kind == "shape":
        index = index[:, :3]
    grad_boxes = torch.randn(R, 4 + (1 if fault == "grad_boxes_shape" else 0), generator=gen, dtype=torch.float64)
    grad_stats = torch.randn(R, 4, k + (2 if fault == "grad_stats_shape" else 1), generator=gen, dtype=torch.float64)
    grad_dtype = torch.int64 if fault == "grad_int" else dtype
    return (grad_boxes.to(grad_dtype), grad_stats.to(dtype), pred, project, ref, index, rs, topk)


def call_fdr(spec, args):
    if spec["op"] == "fdr_forward":
        return tuple(torch.ops.dfine.fdr_decode_forward(*args))
    return tuple(torch.ops.dfine.fdr_decode_backward(*args))


# --------------------------------------------------------------------------------------------
# fgl_loss_* / ddf_loss_*


def build_loss(spec):
    gen = _generator(spec)
    dtype = DTYPES[spec.get("dtype", "float32")]
    N, cols = spec["N"], spec["cols"]
    pred = _spoil(torch.randn(N, cols, generator=gen, dtype=torch.float64).to(dtype) * 3, spec.get("values", "tame"),
                  gen)
    lengths = spec.get("lengths", {})

    def rows(name, low, high, present=True):
        if not present:
            return None
        n = lengths.get(name, N)
        t_dtype = DTYPES[spec.get("row_dtype", spec.get("dtype", "float32"))]
        return _floats((n,), t_dtype, gen, low, high)

    weight = rows("weight", 0.0, 1.0, spec.get("weight", False))
    if spec["op"].startswith("fgl"):
        target = rows("target", 0.0, max(cols - 1.1, 0.0))
        if spec.get("target_values") == "hostile" and target is not None and target.numel():
            floating = target.dtype.is_floating_point
            target[0] = float("nan") if floating else -(2**62)
            target[-1] = 1e30 if floating else 2**62
            if target.numel() > 2:
                target[1] = -1e30 if floating else -1
        wl = rows("weight_left", 0.0, 1.0)
        wr = rows("weight_right", 0.0, 1.0)
        args = (pred, target, wl, wr, weight)
    else:
        teacher_shape = (N + (1 if spec.get("fault") == "teacher_shape" else 0), cols)
        teacher = torch.randn(*teacher_shape, generator=gen, dtype=torch.float64).to(dtype) * 3
        args = (pred, teacher, weight, float(spec.get("temperature", 5.0)))
    if spec["op"].endswith("_backward"):
        args = (rows("grad_rows", -1.0, 1.0),) + args
    elif spec["op"].endswith("_forward"):
        args = args + (bool(spec.get("compute_grad", True)),)
    else:  # _total
        args = args + (bool(spec.get("compute_grad", True)), bool(spec.get("mean", False)))
    return args


def call_loss(spec, args):
    name = {"fgl_forward": "fgl_loss_forward", "fgl_backward": "fgl_loss_backward", "fgl_total": "fgl_loss_total",
            "ddf_forward": "ddf_loss_forward", "ddf_backward": "ddf_loss_backward",
            "ddf_total": "ddf_loss_total"}[spec["op"]]
    out = getattr(torch.ops.dfine, name)(*args)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def build(spec):
    if spec["op"].startswith("msda"):
        return build_msda(spec)
    if spec["op"].startswith("fdr"):
        return build_fdr(spec)
    return build_loss(spec)


def call(spec, args):
    if spec["op"].startswith("msda"):
        return call_msda(spec, args)
    if spec["op"].startswith("fdr"):
        return call_fdr(spec, args)
    return call_loss(spec, args)


def run(specs, results_path):
    results = []
    for i, spec in enumerate(specs):
        print(f"start {i}", flush=True)
        try:
            args = build(spec)
        except Exception as err:  # a spec the test cannot build is the test's bug: reported as such
            results.append({"status": "unbuildable", "error": f"{type(err).__name__}: {err}"})
            print(f"done {i}", flush=True)
            continue
        try:
            outputs = call(spec, args)
            results.append({"status": "ok", "outputs": [t.detach().clone() for t in outputs]})
        except Exception as err:
            results.append({"status": "raised", "type": type(err).__name__, "message": str(err).split("\n")[0],
                            "where": traceback.extract_tb(err.__traceback__)[-1].name})
        print(f"done {i}", flush=True)
    torch.save(results, results_path)


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.ops.load_library(sys.argv[1])
    run(json.load(sys.stdin), sys.argv[2])
