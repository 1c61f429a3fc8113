"""Export the deployed D-FINE model and its post-processor to ONNX as one graph.

    python -m dfine export -c CFG -r CKPT [--output model.onnx] [--opset 17] [--dynamic-batch] [--dynamic-size]
                           [--size H W] [--check] [--simplify]

The graph (the published D-FINE deployment interface):

* inputs  ``images`` [N, 3, H, W] float32 (RGB in [0, 1], plain resize: ``dfine.predict.preprocess``) and
  ``orig_target_sizes`` [N, 2] int64, (w, h) of the original images;
* outputs ``labels`` [N, K] int64 (contiguous class ids), ``boxes`` [N, K, 4] float32 (x1, y1, x2, y2 in pixels
  of the original image) and ``scores`` [N, K] float32, K = ``DFINEPostProcessor.num_top_queries``.

The fused ops are exported through their plain-PyTorch references (the model is switched to
``backend="reference"`` while tracing), so the file holds standard ONNX operators only
(``ms_deform_attn`` becomes ``GridSample``, opset >= 16) and any runtime runs it. Anchors and
position embeddings are computed inside the graph from the input's size, so ``--dynamic-size``
and ``--dynamic-batch`` graphs run at any batch and any H, W (large enough for ``num_queries``).
"""

from __future__ import annotations

import argparse
import copy
import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import dfine
from dfine.checkpoint import load_checkpoint

__all__ = [
    "ExportError", "DetectorGraph", "load_detector", "export_onnx", "check_onnx", "simplify_onnx",
    "compare_detections", "onnx_op_domains", "INPUT_NAMES", "OUTPUT_NAMES", "MIN_OPSET", "MAX_OPSET",
]

INPUT_NAMES = ("images", "orig_target_sizes")
OUTPUT_NAMES = ("labels", "boxes", "scores")
MIN_OPSET = 16  # GridSample (the reference ms_deform_attn)
MAX_OPSET = 20  # the newest opset of torch.onnx's TorchScript exporter
DEFAULT_OPSET = 17


class ExportError(RuntimeError):
    """A clear, user-facing failure (missing file, bad option, onnxruntime missing)."""


class DetectorGraph(nn.Module):
    """Model + post-processor in deploy mode: (images, orig_target_sizes) -> (labels, boxes, scores).

    This is what the ONNX file holds, and what the PyTorch runner of ``dfine predict`` calls, so both
    paths compute the same thing. Labels are the contiguous training ids (no COCO remapping)."""

    def __init__(self, model: nn.Module, postprocessor: nn.Module):
        super().__init__()
        self.model = model
        self.postprocessor = copy.deepcopy(postprocessor).deploy()

    def forward(self, images: torch.Tensor, orig_target_sizes: torch.Tensor):
        return self.postprocessor(self.model(images), orig_target_sizes)


def _require_file(path, what: str) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ExportError(f"{what} file {path!r} does not exist")
    return path


def load_detector(config: str, checkpoint: str, backend: str = "reference", device: str = "cpu"):
    """The deployed model (``model.deploy()``) of a config + checkpoint wrapped with its
    post-processor. Returns ``(DetectorGraph, cfg)``."""
    _require_file(config, "config")
    _require_file(checkpoint, "checkpoint")
    cfg = dfine.load_config(config)
    model = dfine.build_model(cfg, backend=backend)
    load_checkpoint(model, checkpoint)
    model.deploy()
    return DetectorGraph(model, dfine.build_postprocessor(cfg)).to(device).eval(), cfg


def model_size(cfg: dict) -> Tuple[int, int]:
    """(H, W) the model was configured for (``eval_spatial_size``, else 640 x 640)."""
    size = cfg.get("eval_spatial_size") or [640, 640]
    return int(size[0]), int(size[1])


def _backends(module: nn.Module) -> Dict[nn.Module, str]:
    return {m: m.backend for m in module.modules() if hasattr(m, "backend")}


def export_onnx(detector: DetectorGraph, output, size: Sequence[int] = (640, 640), batch: int = 1,
                opset: int = DEFAULT_OPSET, dynamic_batch: bool = False, dynamic_size: bool = False) -> Path:
    """Trace ``detector`` at ``batch x 3 x H x W`` and write the ONNX file ``output``.

    The fused ops are switched to their references while tracing (restored afterwards). Dynamic
    axes: ``N`` (batch of every input and output) and ``H``/``W`` of ``images``."""
    if not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise ExportError(f"--opset must be in [{MIN_OPSET}, {MAX_OPSET}] (GridSample needs opset >= {MIN_OPSET}; "
                          f"{MAX_OPSET} is the newest opset of torch's TorchScript ONNX exporter), got {opset}")
    h, w = (int(s) for s in size)
    if h < 32 or w < 32 or batch < 1:
        raise ExportError(f"export size must be at least 32 x 32 and batch >= 1, got {h} x {w}, batch {batch}")
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
    dfine.set_backend(detector, "reference")
    detector.eval()
    try:
        try:  # one eager pass first: clear errors (e.g. too small for num_queries) instead of a tracer failure
            with torch.no_grad():
                detector(images, sizes)
        except ValueError as err:
            raise ExportError(f"cannot export at {batch}x3x{h}x{w}: {err}") from err
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

    from dfine.runners import OnnxRuntimeRunner, TorchRunner

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


# --------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("-c", "--config", required=True, help="config YAML, e.g. configs/dfine/dfine_hgnetv2_s_coco.yml")
    parser.add_argument("-r", "--resume", required=True, help="checkpoint (.pth): state_dict, {'model'} or {'ema'}")
    parser.add_argument("--output", default="model.onnx", help="ONNX file to write (default: model.onnx)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})")
    parser.add_argument("--dynamic-batch", action="store_true", help="any batch size N")
    parser.add_argument("--dynamic-size", action="store_true", help="any input height and width")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="input size to trace at (default: the config's eval_spatial_size, else 640 640)")
    parser.add_argument("--check", action="store_true",
                        help="run onnx.checker and compare onnxruntime with PyTorch on random inputs")
    parser.add_argument("--simplify", action="store_true", help="simplify with onnxsim (when installed)")


def run(args) -> int:
    try:
        detector, cfg = load_detector(args.config, args.resume, backend="reference")
        h, w = args.size if args.size else model_size(cfg)
        path = export_onnx(detector, args.output, (h, w), opset=args.opset, dynamic_batch=args.dynamic_batch,
                           dynamic_size=args.dynamic_size)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, opset {args.opset}, input 1x3x{h}x{w}"
              f"{', dynamic batch' if args.dynamic_batch else ''}{', dynamic H/W' if args.dynamic_size else ''})")
        if args.simplify:
            print(simplify_onnx(path))
        if args.check:
            shapes = [(1, h, w)]
            if args.dynamic_batch:
                shapes.append((3, h, w))
            if args.dynamic_size:
                shapes.append((2 if args.dynamic_batch else 1, h + 32, w + 64))
            domains = onnx_op_domains(path)
            print(f"onnx.checker: ok; node domains: {domains}")
            # PyTorch side: the deployed model with the fused ops when they are built (what predict runs)
            dfine.set_backend(detector, "auto")
            failed = False
            for row in check_onnx(path, detector, shapes):
                print(f"  {'x'.join(map(str, row['shape']))}: max |score diff| {row['max_score_diff']:.2e}, "
                      f"max |box diff| {row['max_box_diff']:.2e} px ({row['max_box_diff_rel']:.1e} of the box scale), "
                      f"unmatched detections {int(row['unmatched'])} (+{int(row['boundary'])} near-ties at the top-k cut)")
                failed |= row["unmatched"] > 0 or row["max_score_diff"] > 1e-3 or row["max_box_diff_rel"] > 1e-3
            if set(domains) - {"", "ai.onnx"}:
                print(f"check: non-standard operator domains {sorted(set(domains) - {'', 'ai.onnx'})}")
                failed = True
            print("check: " + ("FAILED" if failed else "onnxruntime matches PyTorch"))
            return 1 if failed else 0
    except ExportError as err:
        print(f"error: {err}")
        return 2
    return 0
