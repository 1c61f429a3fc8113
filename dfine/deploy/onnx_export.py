"""ONNX export of a detector graph (``dfine.deploy.DetectorGraph``): the file, its check against onnxruntime.

The graph (the published D-FINE deployment interface):

* inputs  ``images`` [N, 3, H, W] float32 (RGB in [0, 1], plain resize: ``dfine.deploy.preprocess``) and
  ``orig_target_sizes`` [N, 2] int64, (w, h) of the original images;
* outputs ``labels`` [N, K] int64 (contiguous class ids), ``boxes`` [N, K, 4] float32 (x1, y1, x2, y2 in pixels
  of the original image) and ``scores`` [N, K] float32, K = ``DFINEPostProcessor.num_top_queries``;
* ``metadata_props`` (``python -m dfine export``): ``names`` and ``category_ids`` (JSON lists indexed by label)
  and ``num_classes`` - what the labels mean (``dfine.model.classes``).

The fused ops are exported through their plain-PyTorch references (the model is switched to
``backend="reference"`` while tracing), so the file holds standard ONNX operators only
(``ms_deform_attn`` becomes ``GridSample``, opset >= 16) and any runtime runs it. Anchors and
position embeddings are computed inside the graph from the input's size, so ``--dynamic-size``
and ``--dynamic-batch`` graphs run at any batch and any H, W (large enough for ``num_queries``).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from dfine.config import load_config
from dfine.deploy.graph import INPUT_NAMES, OUTPUT_NAMES, DeployError, DetectorGraph
from dfine.deploy.loader import require_file, input_size, load_detector
from dfine.deploy.runners import OnnxRuntimeRunner, TorchRunner
from dfine.model import build_postprocessor, set_backend

__all__ = [
    "export_onnx", "check_onnx", "simplify_onnx", "compare_detections", "onnx_op_domains", "MIN_OPSET", "MAX_OPSET",
    "DEFAULT_OPSET", "onnxruntime_runner",
]

MIN_OPSET = 16  # GridSample (the reference ms_deform_attn)
MAX_OPSET = 20  # the newest opset of torch.onnx's TorchScript exporter
DEFAULT_OPSET = 17


def _backends(module: nn.Module) -> Dict[nn.Module, str]:
    return {m: m.backend for m in module.modules() if hasattr(m, "backend")}


def export_onnx(detector: DetectorGraph, output, size: Sequence[int] = (640, 640), batch: int = 1,
                opset: int = DEFAULT_OPSET, dynamic_batch: bool = False, dynamic_size: bool = False,
                metadata: Optional[Dict[str, str]] = None) -> Path:
    """Trace ``detector`` at ``batch x 3 x H x W`` and write the ONNX file ``output``.

    The fused ops are switched to their references while tracing (restored afterwards). Dynamic
    axes: ``N`` (batch of every input and output) and ``H``/``W`` of ``images``. ``metadata`` ({key: string},
    e.g. ``ClassInfo.onnx_metadata()``) is written into the file's ``metadata_props``."""
    if not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise DeployError(f"--opset must be in [{MIN_OPSET}, {MAX_OPSET}] (GridSample needs opset >= {MIN_OPSET}; "
                          f"{MAX_OPSET} is the newest opset of torch's TorchScript ONNX exporter), got {opset}")
    h, w = (int(s) for s in size)
    if h < 32 or w < 32 or batch < 1:
        raise DeployError(f"export size must be at least 32 x 32 and batch >= 1, got {h} x {w}, batch {batch}")
    output = Path(output)
    if output.parent and not output.parent.exists():
        output.parent.mkdir(parents=True, exist_ok=True)
    device = next(detector.parameters()).device
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, h, w, generator=gen).to(device)
    sizes = torch.tensor([[w, h]] * batch, dtype=torch.int64, device=device)
    axes: Dict[str, Dict[int, str]] = {}
    if dynamic_batch:
        axes = {name: {0: "N"} for name in INPUT_NAMES + OUTPUT_NAMES}
    if dynamic_size:
        axes.setdefault("images", {}).update({2: "H", 3: "W"})
    saved = _backends(detector)
    was_training = detector.training
    set_backend(detector, "reference")
    detector.eval()
    try:
        try:  # one eager pass first: clear errors (e.g. too small for num_queries) instead of a tracer failure
            with torch.no_grad():
                detector(images, sizes)
        except ValueError as err:
            raise DeployError(f"cannot export at {batch}x3x{h}x{w}: {err}") from err
        with torch.no_grad(), warnings.catch_warnings():
            # deliberately the TorchScript exporter (no onnxscript dependency): silence its deprecation notice
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            # a strided Slice is left to the runtime instead of being folded: harmless, not actionable
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
            torch.onnx.export(
                detector, (images, sizes), str(output), dynamo=False, input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES), opset_version=int(opset), dynamic_axes=axes or None,
                do_constant_folding=True,
            )
    finally:
        for m, name in saved.items():
            m.backend = name
        detector.train(was_training)
    if metadata:
        import onnx

        proto = onnx.load(str(output))
        onnx.helper.set_model_props(proto, {str(k): str(v) for k, v in metadata.items()})
        onnx.save(proto, str(output))
    return output


def onnx_op_domains(path) -> Dict[str, int]:
    """{domain: number of nodes} of an ONNX file ("" is the standard ai.onnx domain), subgraphs included."""
    import onnx

    counts: Dict[str, int] = {}

    def visit(graph):
        for node in graph.node:
            counts[node.domain] = counts.get(node.domain, 0) + 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                for g in attr.graphs:
                    visit(g)

    visit(onnx.load(str(path)).graph)
    return counts


def compare_detections(ref, out, score_tol: float = 1e-4, box_tol: float = 1e-3) -> Dict[str, float]:
    """Match the detections of two runs of the same graph and report the largest differences.

    ``ref``/``out``: (labels [N, K], boxes [N, K, 4], scores [N, K]). Near-equal scores may come out
    of top-k in another order, so detections are matched per image: pairs with the same label and
    scores within ``score_tol`` and boxes within ``box_tol`` (relative to the box scale) are taken in
    order of increasing box distance (one-to-one). A
    reference detection left without a partner counts as ``boundary`` when its score is within
    ``score_tol`` of the last (K-th) score - a near-tie at the top-k cut, where either run may keep
    the other detection - and as ``unmatched`` otherwise. Box differences are reported in pixels and
    relative to the box scale (the largest coordinate of the image's boxes)."""
    ref = [torch.as_tensor(t).cpu() for t in ref]
    out = [torch.as_tensor(t).cpu() for t in out]
    if ref[0].shape != out[0].shape:
        return {"max_score_diff": float("inf"), "max_box_diff": float("inf"), "max_box_diff_rel": float("inf"),
                "unmatched": float(ref[0].numel()), "boundary": 0.0}
    max_s = max_b = max_rel = 0.0
    unmatched = boundary = 0
    for b in range(ref[0].shape[0]):
        rl, rb, rs = ref[0][b], ref[1][b].double(), ref[2][b].double()
        ol, ob, os_ = out[0][b], out[1][b].double(), out[2][b].double()
        scale = max(float(rb.abs().max()), float(ob.abs().max()), 1.0) if rb.numel() else 1.0
        dist = (rb[:, None, :] - ob[None, :, :]).abs().amax(-1)
        allowed = ((rl[:, None] == ol[None, :]) & ((rs[:, None] - os_[None, :]).abs() <= score_tol)
                   & (dist <= box_tol * scale))
        dist[~allowed] = float("inf")
        ref_used = torch.zeros(rl.shape[0], dtype=torch.bool)
        out_used = torch.zeros(ol.shape[0], dtype=torch.bool)
        order = dist.flatten().argsort()
        finite = int(torch.isfinite(dist).sum())
        for flat in order[:finite].tolist():
            i, j = divmod(flat, ol.shape[0])
            if ref_used[i] or out_used[j]:
                continue
            ref_used[i] = out_used[j] = True
            max_s = max(max_s, float((os_[j] - rs[i]).abs()))
            max_b = max(max_b, float(dist[i, j]))
            max_rel = max(max_rel, float(dist[i, j]) / scale)
        cut = float(torch.minimum(rs.min(), os_.min())) if rs.numel() else 0.0
        for i in (~ref_used).nonzero().flatten().tolist():
            if float(rs[i]) - cut <= score_tol:
                boundary += 1
            else:
                unmatched += 1
    return {"max_score_diff": max_s, "max_box_diff": max_b, "max_box_diff_rel": max_rel,
            "unmatched": float(unmatched), "boundary": float(boundary)}


def check_onnx(path, detector: DetectorGraph, shapes: Sequence[Tuple[int, int, int]], threads: Optional[int] = None,
               seed: int = 0) -> List[dict]:
    """onnx.checker on the file, then onnxruntime vs PyTorch (``detector`` as it is, e.g. with the
    fused ops) on random inputs of every (N, H, W) in ``shapes``. Returns one row of max diffs per shape."""
    import onnx


    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    ort_runner = OnnxRuntimeRunner(path, threads=threads)
    torch_runner = TorchRunner(detector)
    device = next(detector.parameters()).device
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for n, h, w in shapes:
        images = torch.rand(n, 3, h, w, generator=gen)
        # original sizes differ per image: boxes are scaled per image inside the graph
        sizes = torch.stack([torch.randint(64, 1000, (n,), generator=gen),
                             torch.randint(64, 1000, (n,), generator=gen)], 1)
        ref = [t.cpu() for t in torch_runner(images.to(device), sizes.to(device))]
        got = ort_runner(images, sizes)
        row = {"shape": (n, 3, h, w)}
        row.update(compare_detections(ref, got))
        rows.append(row)
    return rows


def simplify_onnx(path) -> str:
    """Run onnxsim on the file in place if it is installed; returns a message either way."""
    try:
        import onnxsim
    except ImportError:
        return ("--simplify: onnxsim is not installed (optional: `pip install onnxsim`); "
                f"{path} was written without simplification")
    import onnx

    model = onnx.load(str(path))
    simplified, ok = onnxsim.simplify(model)
    if not ok:
        return f"--simplify: onnxsim could not validate the simplified model; {path} was left as exported"
    onnx.save(simplified, str(path))
    return f"--simplify: {len(model.graph.node)} -> {len(simplified.graph.node)} nodes"


def onnxruntime_runner(config: str, checkpoint: str, onnx_path: Optional[str] = None, device: str = "cpu",
                       threads: Optional[int] = None, trusted: bool = False):
    """``(OnnxRuntimeRunner, cfg, postprocessor)``: the file ``onnx_path`` or, when it is None, the
    checkpoint exported to a temporary file first (static graph at the config's input size)."""
    if onnx_path is not None:
        # the file holds the weights; the config gives the input size and the post-processor settings
        cfg = load_config(require_file(config, "config"))
        postprocessor = build_postprocessor(cfg).deploy()
        runner = OnnxRuntimeRunner(onnx_path, threads=threads, device=device)
    else:
        det = load_detector(config, checkpoint, backend="reference", optimize=False, trusted=trusted)
        cfg = det.cfg
        graph = det.graph()
        postprocessor = graph.postprocessor
        with tempfile.TemporaryDirectory(prefix="dfine_onnx_") as tmp:
            path = export_onnx(graph, os.path.join(tmp, "model.onnx"), input_size(cfg))
            runner = OnnxRuntimeRunner(path, threads=threads, device=device)  # the session holds the model
    expected = input_size(cfg)
    got = runner.input_size
    if any(g is not None and g != e for g, e in zip(got, expected)):
        raise DeployError(f"the ONNX file takes {got[0]} x {got[1]} images but the config's eval_spatial_size is "
                          f"{expected[0]} x {expected[1]}; export it with --size {expected[0]} {expected[1]} "
                          "or --dynamic-size")
    return runner, cfg, postprocessor
