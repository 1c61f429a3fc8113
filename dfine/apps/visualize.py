"""Inspect Fine-grained Distribution Refinement: every decoder layer's box and edge distributions.

    python -m dfine visualize -c CFG -r CKPT --input IMG [--query K | --top N] --output fdr.png [--backend auto]

One row per decoder layer: the image with that layer's box of each chosen detection (dashed: the
layer-0 reference box that every FDR step refines), then the four edge distributions (left, top, right,
bottom) - the softmax of the layer's accumulated corner logits - plotted over the non-uniform bin
positions W(n). This is the picture of Figure 4 of the D-FINE paper: wide in the first layer, sharp
in the last.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from dfine.apps.common import PredictError, add_classes_argument, add_trust_argument, print_notice
from dfine.config import ConfigError
from dfine.deploy import load_detector, preprocess, read_image
from dfine.deploy.images import to_uint8
from dfine.model.classes import ClassInfo, resolve_classes
from dfine.ops import BACKENDS
from dfine.ops.fdr import weighting_function

EDGES = ("left", "top", "right", "bottom")
COLORS = ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
          "tab:cyan", "tab:gray")


@dataclass
class LayerTrace:
    """What the model computed for one image, per decoder layer and query."""

    probs: torch.Tensor  # [L, Q, 4, K+1] softmax of each layer's accumulated corner logits
    boxes: torch.Tensor  # [L, Q, 4] each layer's boxes, cxcywh normalised to the image
    ref_boxes: torch.Tensor  # [Q, 4] the reference (layer-0 refined) boxes of the FDR steps, cxcywh
    scores: torch.Tensor  # [Q] best class probability of the eval layer
    labels: torch.Tensor  # [Q] its class (contiguous label)
    bins: torch.Tensor  # [K+1] W(n)


@dataclass
class Visualization:
    figure: object  # matplotlib.figure.Figure
    axes: np.ndarray  # [L, 5]: image, left, top, right, bottom
    queries: List[int]
    probs: np.ndarray  # [D, L, 4, K+1] exactly what was plotted, per detection, layer, edge
    bins: np.ndarray  # [K+1] the x positions of the plotted points
    trace: Optional[LayerTrace] = field(default=None, repr=False)
    classes: Optional[ClassInfo] = field(default=None, repr=False)  # how the labels were named


@torch.no_grad()
def trace_layers(model, image: torch.Tensor, size, device="cpu") -> LayerTrace:
    """Run ``model`` (eval or deployed) on one uint8 [3, H, W] image with ``return_layers=True``."""
    model.eval()
    out = model(preprocess(image, size)[None].to(device), return_layers=True)
    layers = out["layers"]
    decoder = model.decoder  # DFINETransformer
    bins = weighting_function(decoder.reg_max, decoder.up, decoder.reg_scale).float().cpu()
    nbins = bins.numel()
    corners = torch.stack([layer["pred_corners"][0] for layer in layers]).float().cpu()  # [L, Q, 4*(K+1)]
    probs = corners.reshape(*corners.shape[:-1], 4, nbins).softmax(-1)
    scores, labels = out["pred_logits"][0].float().sigmoid().max(-1)
    return LayerTrace(
        probs=probs,
        boxes=torch.stack([layer["pred_boxes"][0] for layer in layers]).float().cpu(),
        ref_boxes=layers[0]["ref_points"][0].float().cpu(),
        scores=scores.cpu(),
        labels=labels.cpu(),
        bins=bins,
    )


def select_queries(scores: torch.Tensor, query: Optional[int] = None, top: Optional[int] = None) -> List[int]:
    """The query indices to show: ``query`` alone, else the ``top`` (default 1) best by score."""
    num = int(scores.numel())
    if query is not None and top is not None:
        raise PredictError("give either --query or --top, not both")
    if query is not None:
        if not 0 <= int(query) < num:
            raise PredictError(f"--query {query} is out of range: the model has {num} queries (0..{num - 1})")
        return [int(query)]
    top = 1 if top is None else int(top)
    if not 1 <= top <= num:
        raise PredictError(f"--top {top} is out of range: the model has {num} queries (1..{num})")
    return scores.topk(top).indices.tolist()


def _cxcywh_to_pixels(box: torch.Tensor, w: int, h: int):
    cx, cy, bw, bh = box.tolist()
    return (cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h


def plot_fdr_layers(image: torch.Tensor, trace: LayerTrace, queries: Sequence[int], names: Sequence[str] = ()):
    """Draw the figure. Returns ``(figure, axes [L, 5], probs [D, L, 4, K+1])`` where ``probs`` is the
    array whose rows were handed to matplotlib (the y data of the lines with gid ``"prob:<query>"``; the
    image panels hold rectangles with gid ``"box:<query>"`` (the layer's box) and ``"ref:<query>"``)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    num_layers = trace.probs.shape[0]
    h, w = int(image.shape[-2]), int(image.shape[-1])
    bins = trace.bins.numpy()
    probs = trace.probs[:, list(queries)].permute(1, 0, 2, 3).numpy()  # [D, L, 4, K+1]
    fig = Figure(figsize=(3.2 * 5, 2.6 * num_layers), dpi=100, layout="constrained")
    axes = np.asarray(fig.subplots(num_layers, 5, squeeze=False))
    picture = to_uint8(image).permute(1, 2, 0).cpu().numpy()
    for layer in range(num_layers):
        ax = axes[layer, 0]
        ax.imshow(picture)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"layer {layer}" + (" (first)" if layer == 0 else " (last)" if layer == num_layers - 1 else ""))
        for d, q in enumerate(queries):
            color = COLORS[d % len(COLORS)]
            x, y, bw, bh = _cxcywh_to_pixels(trace.ref_boxes[q], w, h)
            ax.add_patch(Rectangle((x, y), bw, bh, fill=False, edgecolor=color, linestyle="--", linewidth=0.8,
                                   alpha=0.6, gid=f"ref:{q}"))
            x, y, bw, bh = _cxcywh_to_pixels(trace.boxes[layer, q], w, h)
            ax.add_patch(Rectangle((x, y), bw, bh, fill=False, edgecolor=color, linewidth=1.8, gid=f"box:{q}"))
        for e, edge in enumerate(EDGES):
            ax = axes[layer, 1 + e]
            for d, q in enumerate(queries):
                color = COLORS[d % len(COLORS)]
                p = probs[d, layer, e]
                ax.plot(bins, p, marker=".", markersize=3, linewidth=1.0, color=color, gid=f"prob:{q}",
                        label=names[d] if layer == 0 and e == 0 and d < len(names) else None)
                ax.axvline(float((p * bins).sum()), color=color, linewidth=0.6, linestyle=":", gid=f"mean:{q}")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            if layer == 0:
                ax.set_title(edge)
            if layer == num_layers - 1:
                ax.set_xlabel("bin position W(n)")
    if names:
        axes[0, 1].legend(fontsize=7, loc="upper left")
    fig.suptitle("FDR edge distributions per decoder layer (softmax of the accumulated corner logits); "
                 "dashed box: reference, dotted line: expected offset", fontsize=10)
    return fig, axes, probs


def visualize_image(model, image: torch.Tensor, size, query=None, top=None, output=None, device="cpu",
                    classes: ClassInfo = None) -> Visualization:
    """Trace, choose the detections, plot, and save to ``output`` when given. ``classes`` names the labels
    (default: from the class count, as for a checkpoint without class metadata)."""
    trace = trace_layers(model, image, size, device)
    if classes is None:
        classes = resolve_classes(model.decoder.num_classes, coco_config=True)
    queries = select_queries(trace.scores, query, top)
    names = [f"query {q}: {classes.name(int(trace.labels[q]))} {float(trace.scores[q]):.2f}" for q in queries]
    fig, axes, probs = plot_fdr_layers(image, trace, queries, names)
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(str(output))
    return Visualization(figure=fig, axes=axes, queries=queries, probs=probs, bins=trace.bins.numpy(), trace=trace,
                         classes=classes)


def visualize(config, checkpoint, input_path, output, query=None, top=None, backend="auto",
              device="cpu", trusted=False, classes=None) -> Visualization:
    if query is not None and top is not None:
        raise PredictError("give either --query or --top, not both")
    path = Path(input_path)
    if not path.is_file():
        raise PredictError(f"--input {str(path)!r} is not an image file")
    image = read_image(path)
    det = load_detector(config, checkpoint, device=device, backend=backend, trusted=trusted, classes=classes)
    return visualize_image(det.model, image, det.input_size, query, top, output, device, det.classes)


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("-c", "--config", required=True, help="config YAML")
    parser.add_argument("-r", "--resume", required=True, help="checkpoint (.pth): state_dict, {'model'} or {'ema'}")
    parser.add_argument("--input", required=True, help="an image")
    parser.add_argument("--output", required=True, help="the figure (.png)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--query", type=int, default=None, help="show this query index (0..num_queries-1)")
    which.add_argument("--top", type=int, default=None, help="show the N best-scoring queries (default 1)")
    parser.add_argument("--backend", default="auto", choices=list(BACKENDS))
    parser.add_argument("--device", default="cpu")
    add_classes_argument(parser)
    add_trust_argument(parser)


def run(args) -> int:
    try:
        vis = visualize(args.config, args.resume, args.input, args.output, args.query, args.top, args.backend,
                        args.device, args.trust_checkpoint, args.classes)
    except (PredictError, ConfigError) as err:  # ConfigError: the config or a -u override
        print(f"error: {err}")
        return 2
    print_notice(vis.classes)
    print(f"queries {vis.queries}: {vis.probs.shape[1]} decoder layers -> {args.output}")
    return 0
