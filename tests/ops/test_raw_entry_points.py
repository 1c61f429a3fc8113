"""The raw C++ entry points (``torch.ops.dfine.*``, which torch.compile and careless callers reach
without the Python checks) under hostile arguments: every call raises a Python exception or returns
the reference's result, and none kills the process.

The calls run in child processes (tests/ops/raw_cases.py), many per child, so that a segfault or a
glibc abort fails the test, naming the case, instead of killing pytest. Hypothesis draws the cases:
spatial_shapes whose H * W wraps around int64 onto S, huge, zero and negative sizes, num_points_list
whose sum wraps onto P, saved top-k bins out of range, mismatched shapes, wrong dtypes, non-finite
values. The issue's two crashers run as explicit cases, and once through torch.compile.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dfine.ops.fdr import distance2bbox, fdr_decode_reference
from dfine.ops.golsd_losses import ddf_loss_reference, fgl_loss_reference
from dfine.ops.ms_deform_attn import ms_deform_attn_reference
from tests.conftest import require_backend
from tests.ops import raw_cases

REPO = Path(__file__).resolve().parents[2]
INT64_MAX = 2**63 - 1


def _library() -> str:
    require_backend("cpp")
    return os.path.abspath(glob.glob(str(REPO / "dfine" / "_C*.so"))[0])


def run_in_child(specs, tmp_path, name="cases"):
    """Runs the specs in one child process; returns its results, or fails naming the case that
    killed it."""
    results_path = tmp_path / f"{name}.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "tests.ops.raw_cases", _library(), str(results_path)],
                          input=json.dumps(specs), capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    if proc.returncode != 0:
        started = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("start ")]
        case = specs[started[-1]] if started else None
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        pytest.fail(f"the child died ({how}) in case {case}\nstderr: {proc.stderr[-2000:]}")
    return torch.load(results_path, weights_only=True)


# --------------------------------------------------------------------------------------------
# What a call that returned must equal: the reference on the same inputs (in float64).


def _tame(spec) -> bool:
    """Whether the inputs are finite and moderate, so that a result can be compared with the reference
    (huge and non-finite values only have to give no crash and outputs of the right shape)."""
    if spec.get("values", "tame") != "tame" or spec.get("target_values") == "hostile":
        return False
    if spec["op"].startswith("fdr") and not 0.1 <= abs(spec.get("reg_scale", 4.0)) <= 100:
        return False
    if spec["op"].startswith("ddf") and not 0.1 <= spec.get("temperature", 5.0) <= 100:
        return False
    return True


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str):
    if tuple(actual.shape) != tuple(expected.shape):
        return f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    tol = 1e-9 if actual.dtype == torch.float64 else 2e-4
    if not torch.allclose(actual.double(), expected.double(), rtol=tol, atol=tol, equal_nan=True):
        worst = (actual.double() - expected.double()).abs().nan_to_num(float("inf")).max().item()
        return f"{what}: differs from the reference by up to {worst}"
    return None


def _grads(outputs, inputs, upstream):
    grads = torch.autograd.grad(outputs, inputs, upstream, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def _expected_msda(spec, args):
    if spec["op"] == "msda_backward":
        grad, args = args[0].double(), args[1:]
    value, shapes, loc, attn, npl = args
    value, loc, attn = (t.double().requires_grad_(True) for t in (value, loc, attn))
    B, S, M, D = value.shape
    Q = loc.shape[1]
    if B * Q * M * D == 0:  # nothing to sample (grid_sample rejects empty batches)
        out = value.new_zeros((B, Q, M * D))
        return [out] if spec["op"] == "msda_forward" else [torch.zeros_like(t) for t in (value, loc, attn)]
    out = ms_deform_attn_reference(value, shapes.tolist(), loc, attn, npl)
    if spec["op"] == "msda_forward":
        return [out]
    return _grads(out, [value, loc, attn], grad)


def _expected_fdr(spec, args):
    if spec["op"] == "fdr_forward":
        pred, project, ref, rs, topk = args
        return list(fdr_decode_reference(pred.double(), project.double(), ref.double(), rs, topk))
    grad_boxes, grad_stats, pred, project, ref, index, rs, topk = args
    # the gradient of boxes . grad_boxes + stats . grad_stats with the top-k taken at the given bins
    bins = project.shape[0]
    z = pred.double().requires_grad_(True)
    ref = ref.double().requires_grad_(True)
    p = F.softmax(z.reshape(-1, 4, bins), -1)
    boxes = distance2bbox(ref, p @ project.double(), rs)
    top = p.gather(-1, index.long())
    stats = torch.cat([top, top.mean(-1, keepdim=True)], -1)
    loss = (boxes * grad_boxes.double()).sum() + (stats * grad_stats.double()).sum()
    return _grads(loss, [z, ref], torch.ones((), dtype=torch.float64))


def _expected_loss(spec, args):
    op = spec["op"]
    upstream = None
    if op.endswith("_backward"):
        upstream, args = args[0].double(), args[1:]
    if op.startswith("fgl"):
        pred, target, wl, wr, weight = args[:5]
        pred = pred.double().requires_grad_(True)
        rows = fgl_loss_reference(pred, target.double(), wl.double(), wr.double(),
                                  None if weight is None else weight.double(), reduction="none")
    else:
        pred, teacher, weight, temperature = args[:4]
        pred = pred.double().requires_grad_(True)
        rows = ddf_loss_reference(pred, teacher.double(), None if weight is None else weight.double(), temperature,
                                  reduction="none")
    if op.endswith("_backward"):
        return _grads(rows, [pred], upstream)
    compute_grad = args[-2] if op.endswith("_total") else args[-1]
    grad = _grads(rows, [pred], torch.ones_like(rows))[0] if compute_grad else pred.new_empty((0,))
    if op.endswith("_total"):
        total = rows.sum() / (max(rows.shape[0], 1) if args[-1] else 1)
        return [total.detach(), grad]
    return [rows.detach(), grad]


def check_result(spec, result):
    """None if the call raised or returned the reference's outputs; else what is wrong."""
    if result["status"] == "unbuildable":
        return f"test bug, case cannot be built: {result['error']}"
    if result["status"] == "raised":
        return None
    args = raw_cases.build(spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if spec["op"].startswith("msda"):
                expected = _expected_msda(spec, args)
            elif spec["op"].startswith("fdr"):
                expected = _expected_fdr(spec, args)
            else:
                expected = _expected_loss(spec, args)
    except Exception as err:  # the op accepted what the reference cannot compute
        return f"accepted arguments the reference rejects ({type(err).__name__}: {str(err)[:200]})"
    outputs = result["outputs"]
    if spec["op"] == "fdr_forward":
        index = outputs[2]
        bins, k = args[1].shape[0], args[4]
        if index.dtype != torch.uint8 or tuple(index.shape) != (args[0].shape[0], 4, k):
            return f"topk_index: {index.dtype} {tuple(index.shape)}"
        if index.numel() and int(index.max()) >= bins:
            return f"topk_index holds bin {int(index.max())} of {bins}"
        outputs = outputs[:2]
    if len(outputs) != len(expected):
        return f"{len(outputs)} outputs, expected {len(expected)}"
    for i, (actual, want) in enumerate(zip(outputs, expected)):
        if not _tame(spec):
            if tuple(actual.shape) != tuple(want.shape):
                return f"output {i}: shape {tuple(actual.shape)}, expected {tuple(want.shape)}"
            continue
        problem = _close(actual, want, f"output {i}")
        if problem:
            return problem
    return None


def check_all(specs, results):
    problems = [f"{spec}: {problem}" for spec, result in zip(specs, results)
                if (problem := check_result(spec, result)) is not None]
    assert not problems, "\n".join(problems[:10])


# --------------------------------------------------------------------------------------------
# Hostile cases drawn by hypothesis.

HOSTILE_SIZES = [0, -1, -7, 2**31 - 1, 2**31, 2**32 + 1, 2**62, INT64_MAX, -(2**63)]


def _signed(x: int) -> int:
    x %= 2**64
    return x - 2**64 if x >= 2**63 else x


@st.composite
def msda_specs(draw):
    L = draw(st.integers(1, 3))
    shapes = [[draw(st.integers(1, 4)), draw(st.integers(1, 4))] for _ in range(L)]
    npl = [draw(st.integers(1, 2)) for _ in range(L)]
    spec = {"op": draw(st.sampled_from(["msda_forward", "msda_backward"])), "seed": draw(st.integers(0, 99)),
            "B": draw(st.integers(0, 2)), "Q": draw(st.integers(0, 3)), "M": draw(st.integers(0, 2)),
            "D": draw(st.integers(0, 5)), "dtype": draw(st.sampled_from(["float32", "float32", "float64", "float64",
                                                                       "float16"])),
            "values": draw(st.sampled_from(["tame", "tame", "tame", "nonfinite", "huge"])), "fault": None}
    level = draw(st.integers(0, L - 1))
    kind = draw(st.sampled_from(["valid", "valid", "valid", "wrap", "wrap", "size", "S", "points", "points_wrap",
                                 "fault"]))
    if kind == "wrap":  # H * W == the old size modulo 2**64, with a huge odd H
        size = shapes[level][0] * shapes[level][1]
        H = draw(st.integers(2**20, 2**40)) * 2 + 1
        shapes[level] = [H, _signed(size * pow(H, -1, 2**64))]
    elif kind == "size":
        shapes[level][draw(st.integers(0, 1))] = draw(st.sampled_from(HOSTILE_SIZES))
    elif kind == "points":
        npl[level] = draw(st.sampled_from([0, -1, 3, 2**31, INT64_MAX]))
    elif kind == "points_wrap":  # entries whose int64 sum wraps around onto P
        npl = [2**62, 2**62, 2**62, 2**62] + npl
        shapes = [[1, 1]] * 4 + shapes
    elif kind == "fault":
        spec["fault"] = draw(st.sampled_from(["attn_Q", "loc_M", "loc_coords3", "shapes_int32", "shapes_3cols",
                                              "attn_dtype", "value_3d", "grad_shape", "noncontiguous"]))
    # S: the sum of H * W as int64 arithmetic wraps it (what an unguarded check compares with S)
    wrapped = _signed(sum(h * w for h, w in shapes))
    S = wrapped if 0 <= wrapped <= 64 else 16
    spec["S"] = S + (draw(st.sampled_from([-1, 1])) if kind == "S" and S > 1 else 0)
    spec["P"] = sum(npl[4:]) if kind == "points_wrap" else sum(p for p in npl if 0 < p < 100)
    spec.update(shapes=shapes, npl=npl)
    return spec


@st.composite
def fdr_specs(draw):
    """A valid call with (mostly) one hostile argument."""
    bins = draw(st.sampled_from([2, 5, 9, 33, 33, 64]))
    spec = {"op": draw(st.sampled_from(["fdr_forward", "fdr_backward", "fdr_backward"])),
            "seed": draw(st.integers(0, 99)), "R": draw(st.integers(0, 5)), "bins": bins,
            "topk": draw(st.integers(1, min(bins, 8))), "dtype": draw(st.sampled_from(["float32", "float64"])),
            "values": draw(st.sampled_from(["tame", "tame", "nonfinite", "huge"])),
            "reg_scale": draw(st.sampled_from([4.0, 4.0, -2.0, 0.5, 0.0, float("inf")])), "fault": None}
    kind = draw(st.sampled_from(["none", "none", "none", "bins", "topk", "cols", "dtype", "index", "fault"]))
    if kind == "bins":
        spec["bins"] = draw(st.sampled_from([0, 1, 65, 300]))
    elif kind == "topk":
        spec["topk"] = draw(st.sampled_from([0, -1, 9, bins + 1, 2**31]))
    elif kind == "cols":
        spec["cols"] = draw(st.sampled_from([0, 4 * bins - 1, 4 * bins + 4, bins]))
    elif kind == "dtype":
        spec["dtype"] = draw(st.sampled_from(["float16", "int64"]))
    elif kind == "index":
        spec["index"] = draw(st.sampled_from(["int64", "shape"]))
        spec["index_high"] = draw(st.sampled_from([256, bins + 1]))
    elif kind == "fault":
        spec["fault"] = draw(st.sampled_from(["ref_rows", "project_dtype", "grad_boxes_shape", "grad_stats_shape",
                                              "grad_int"]))
    return spec


@st.composite
def loss_specs(draw):
    """A valid call with (mostly) one hostile argument."""
    op = draw(st.sampled_from(["fgl_forward", "fgl_backward", "fgl_total", "ddf_forward", "ddf_backward",
                               "ddf_total"]))
    N = draw(st.integers(0, 12))
    spec = {"op": op, "seed": draw(st.integers(0, 99)), "N": N, "cols": draw(st.sampled_from([33, 33, 2, 5, 64])),
            "dtype": draw(st.sampled_from(["float32", "float32", "float64"])),
            "values": draw(st.sampled_from(["tame", "tame", "nonfinite", "huge"])),
            "weight": draw(st.booleans()), "compute_grad": draw(st.booleans()), "mean": draw(st.booleans())}
    if op.startswith("fgl"):
        spec["target_values"] = draw(st.sampled_from(["tame", "tame", "hostile"]))
    else:
        spec["temperature"] = draw(st.sampled_from([5.0, 5.0, 1.0, 1e-30, 1e30]))
    kind = draw(st.sampled_from(["none", "none", "none", "cols", "dtype", "lengths", "row_dtype", "temperature",
                                 "teacher"]))
    if kind == "cols":
        spec["cols"] = draw(st.sampled_from([0, 1, 65]))
    elif kind == "dtype":
        spec["dtype"] = "float16"
    elif kind == "lengths":
        name = draw(st.sampled_from(["target", "weight_left", "weight_right", "weight", "grad_rows"]))
        spec["lengths"] = {name: draw(st.sampled_from([0, N + 1, max(N - 1, 0), 2 * N]))}
        spec["weight"] = spec["weight"] or name == "weight"
    elif kind == "row_dtype":
        spec["row_dtype"] = draw(st.sampled_from(["int64", "float64", "float16"]))
    elif kind == "temperature" and op.startswith("ddf"):
        spec["temperature"] = draw(st.sampled_from([0.0, -1.0, float("nan"), float("inf")]))
    elif kind == "teacher" and op.startswith("ddf"):
        spec["fault"] = "teacher_shape"
    return spec


@settings(max_examples=4, derandomize=True, deadline=None, database=None,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
@given(specs=st.lists(st.one_of(msda_specs(), fdr_specs(), loss_specs()), min_size=60, max_size=60))
def test_hostile_calls_raise_or_match_the_reference(specs, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("raw")
    check_all(specs, run_in_child(specs, tmp_path))


# --------------------------------------------------------------------------------------------
# The crashers and the other known holes, with the argument the error must name.

EXPLICIT = [
    # H * W = 2**88 + 16 wraps to 16 = S in int64; then cast to int: a segfault before
    ({"op": "msda_forward", "B": 1, "Q": 3, "M": 1, "D": 2, "S": 16, "P": 1,
      "shapes": [[268435457, 2**60 - 2**32 + 16]], "npl": [1]}, "spatial_shapes"),
    ({"op": "msda_backward", "B": 1, "Q": 3, "M": 1, "D": 2, "S": 16, "P": 1,
      "shapes": [[268435457, 2**60 - 2**32 + 16]], "npl": [1]}, "spatial_shapes"),
    # per-level points whose sum wraps around onto P = 2
    ({"op": "msda_forward", "B": 1, "Q": 2, "M": 1, "D": 2, "S": 5, "P": 2, "shapes": [[1, 1]] * 4 + [[1, 1]],
      "npl": [2**62, 2**62, 2**62, 2**62, 2]}, "num_points_list"),
    ({"op": "msda_forward", "B": 1, "Q": 2, "M": 1, "D": 2, "S": 4, "P": 1, "shapes": [[2, -2]], "npl": [1]},
     "spatial_shapes"),
    # saved top-k bin 255 of rows of 33 bins: heap corruption (glibc abort) before
    ({"op": "fdr_backward", "R": 4, "bins": 33, "topk": 4, "index_high": 256, "seed": 3}, "topk_index"),
    ({"op": "fdr_backward", "R": 64, "bins": 33, "topk": 4, "index_high": 256, "seed": 4}, "topk_index"),
    ({"op": "fdr_backward", "R": 3, "bins": 9, "topk": 2, "index_high": 256, "seed": 5, "dtype": "float64"},
     "topk_index"),
    ({"op": "fdr_backward", "R": 2, "bins": 9, "topk": 2, "fault": "grad_int"}, "grad_boxes"),
    ({"op": "fgl_forward", "N": 4, "cols": 33, "lengths": {"target": 3}}, "target_bins"),
    ({"op": "ddf_backward", "N": 4, "cols": 33, "lengths": {"grad_rows": 5}}, "grad_rows"),
    ({"op": "ddf_forward", "N": 4, "cols": 33, "temperature": float("nan")}, "temperature"),
]


def test_known_crashers_raise_errors_naming_the_argument(tmp_path):
    specs = [spec for spec, _ in EXPLICIT]
    results = run_in_child(specs, tmp_path)
    for (spec, argument), result in zip(EXPLICIT, results):
        assert result["status"] == "raised", f"{spec} returned instead of raising"
        assert result["type"] == "RuntimeError" and argument in result["message"], (spec, result)


_COMPILED_CALL = """
import torch
import dfine.ops as ops
value = torch.zeros(1, 16, 1, 2)
shapes = torch.tensor([[268435457, 2**60 - 2**32 + 16]])
loc, attn = torch.rand(1, 3, 1, 1, 2), torch.rand(1, 3, 1, 1)
step = torch.compile(lambda v, s, l, a: ops.ms_deform_attn(v, s, l, a, [1], backend="cpp"), backend="eager")
try:
    step(value, shapes, loc, attn)
except RuntimeError as err:
    print("raised:", str(err).splitlines()[0])
"""


def test_compiled_call_skipping_the_python_checks_raises(tmp_path):
    """Under torch.compile the Python wrapper cannot read spatial_shapes (it is traced), so only the
    C++ check stands between these shapes and the kernel."""
    _library()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _COMPILED_CALL], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)
    assert proc.returncode == 0, f"the child died (return code {proc.returncode}): {proc.stderr[-2000:]}"
    assert "raised:" in proc.stdout and "spatial_shapes" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_level_size_limit_is_the_kernels():
    """The size check accepts the largest level the int offsets allow and rejects the next one (the
    limit is checked without forming H * W, which may not fit in int64)."""
    require_backend("cpp")
    value = torch.ones(1, 1, 1, 1)
    loc, attn = torch.zeros(1, 1, 1, 1, 2), torch.ones(1, 1, 1, 1)
    for shape in ([2**30 + 1, 1], [1, 2**30 + 1], [2**31, 2**31], [INT64_MAX, INT64_MAX], [-(2**63), -1]):
        with pytest.raises(RuntimeError, match="spatial_shapes"):
            torch.ops.dfine.ms_deform_attn_forward(value, torch.tensor([shape]), loc, attn, [1])
    # (0, 0) on a 1 x 1 map is pixel (-0.5, -0.5): a quarter of the only pixel
    out = torch.ops.dfine.ms_deform_attn_forward(value, torch.tensor([[1, 1]]), loc, attn, [1])
    assert out.item() == 0.25
