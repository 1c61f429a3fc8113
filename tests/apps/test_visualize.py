"""`python -m dfine visualize`: per-layer boxes and FDR edge distributions of chosen detections.

The plotted probabilities are checked against an independent recomputation: forward hooks on the
decoder's box heads record each layer's corner-logit increment, the increments are accumulated as the
FDR recursion defines (corners_i = head_i(...) + corners_{i-1}) and soft-maxed per edge here."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

from dfine.apps import visualize as vis_mod
from dfine.apps.common import PredictError
from dfine.deploy import preprocess, read_image
from dfine.ops.fdr import weighting_function
from tests.model_helpers import REPO, load_predictor
from tests.tiny_checkpoint import write_tiny_checkpoint

NUM_LAYERS = 3  # D-FINE-N
NUM_QUERIES = 50
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vis")
    cfg, weights = write_tiny_checkpoint(root)
    torch.manual_seed(1)
    image = torch.randint(0, 255, (3, 150, 210), dtype=torch.uint8)
    image[:, 40:110, 50:150] = torch.tensor([200, 60, 40], dtype=torch.uint8)[:, None, None]
    torchvision.io.write_png(image, str(root / "im.png"))
    return cfg, weights, root / "im.png"


@pytest.fixture(scope="module")
def independent(setup):
    """Per-layer edge probabilities [L, Q, 4, 33], final boxes and scores, without return_layers."""
    cfg, weights, image_path = setup
    model, _, _ = load_predictor(str(cfg), str(weights), backend="cpp")
    increments = []
    hooks = [head.register_forward_hook(lambda m, i, o: increments.append(o.detach()))
             for head in model.decoder.dec_bbox_head if not isinstance(head, torch.nn.Identity)]
    with torch.no_grad():
        out = model(preprocess(read_image(image_path), [320, 320])[None])
    for h in hooks:
        h.remove()
    assert len(increments) == NUM_LAYERS
    corners = torch.stack(increments)[:, 0].cumsum(0)  # [L, Q, 4*33]
    probs = torch.softmax(corners.double().reshape(NUM_LAYERS, NUM_QUERIES, 4, 33), dim=-1)
    scores = out["pred_logits"][0].sigmoid().max(-1).values
    return {"probs": probs, "boxes": out["pred_boxes"][0], "scores": scores}


def _plotted(axes, query):
    """The y data of the distribution lines of `query`: [L, 4, K+1], and their x data."""
    ys, xs = [], []
    for row in axes:
        for ax in row[1:]:
            (line,) = [ln for ln in ax.get_lines() if ln.get_gid() == f"prob:{query}"]
            ys.append(np.asarray(line.get_ydata(), dtype=np.float64))
            xs.append(np.asarray(line.get_xdata(), dtype=np.float64))
    return np.stack(ys).reshape(len(axes), 4, -1), np.stack(xs)


def test_top_n_layout_and_plotted_probabilities(setup, independent, tmp_path):
    cfg, weights, image_path = setup
    out_png = tmp_path / "fdr.png"
    vis = vis_mod.visualize(str(cfg), str(weights), str(image_path), str(out_png), top=3, backend="cpp")

    # layout: one row per decoder layer, image + left/top/right/bottom
    assert vis.axes.shape == (NUM_LAYERS, 5)
    assert [ax.get_title() for ax in vis.axes[0, 1:]] == ["left", "top", "right", "bottom"]
    assert len(vis.figure.axes) == NUM_LAYERS * 5
    assert out_png.read_bytes()[:8] == PNG_MAGIC
    png = torchvision.io.decode_image(str(out_png))
    w_in, h_in = vis.figure.get_size_inches()
    assert png.shape[-2:] == (round(h_in * vis.figure.dpi), round(w_in * vis.figure.dpi))

    # the chosen queries: the 3 best by score, best first
    assert vis.queries == independent["scores"].topk(3).indices.tolist()

    bins = weighting_function(32, 0.5, 4.0, dtype=torch.float64).numpy()
    for d, q in enumerate(vis.queries):
        plotted, xs = _plotted(vis.axes, q)
        expected = independent["probs"][:, q].numpy()
        np.testing.assert_allclose(plotted, expected, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(vis.probs[d], expected, rtol=1e-5, atol=1e-7)  # the returned data
        np.testing.assert_allclose(xs, np.broadcast_to(bins, xs.shape), rtol=1e-6)  # over W(n)
        np.testing.assert_allclose(plotted.sum(-1), 1.0, rtol=1e-5)

    # the last row's solid box of the best query is the model's detection box (pixels of the image)
    h, w = 150, 210
    cx, cy, bw, bh = independent["boxes"][vis.queries[0]].tolist()
    (box,) = [p for p in vis.axes[-1, 0].patches if p.get_gid() == f"box:{vis.queries[0]}"]
    x, y = box.get_xy()
    np.testing.assert_allclose([x, y, box.get_width(), box.get_height()],
                               [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h], rtol=1e-4, atol=1e-3)
    gids = sorted(p.get_gid() for p in vis.axes[-1, 0].patches)
    assert gids == sorted([f"box:{q}" for q in vis.queries] + [f"ref:{q}" for q in vis.queries])


def test_query_index(setup, independent, tmp_path):
    cfg, weights, image_path = setup
    vis = vis_mod.visualize(str(cfg), str(weights), str(image_path), str(tmp_path / "q.png"), query=7,
                            backend="cpp")
    assert vis.queries == [7] and vis.probs.shape == (1, NUM_LAYERS, 4, 33)
    plotted, _ = _plotted(vis.axes, 7)
    np.testing.assert_allclose(plotted, independent["probs"][:, 7].numpy(), rtol=1e-5, atol=1e-7)
    # accumulated corners: the layers' distributions differ
    assert not np.allclose(plotted[0], plotted[-1], atol=1e-3)


def test_select_queries_errors():
    scores = torch.rand(NUM_QUERIES)
    with pytest.raises(PredictError, match=r"--query 50 is out of range: the model has 50 queries \(0\.\.49\)"):
        vis_mod.select_queries(scores, query=50)
    with pytest.raises(PredictError, match="out of range"):
        vis_mod.select_queries(scores, query=-1)
    with pytest.raises(PredictError, match="--top 0 is out of range"):
        vis_mod.select_queries(scores, top=0)
    with pytest.raises(PredictError, match="either --query or --top"):
        vis_mod.select_queries(scores, query=1, top=2)
    assert vis_mod.select_queries(scores) == [int(scores.argmax())]


def test_cli(setup, tmp_path):
    cfg, weights, image_path = setup
    base = [sys.executable, "-m", "dfine", "visualize", "-c", str(cfg), "-r", str(weights), "--input",
            str(image_path), "--backend", "cpp"]
    out_png = tmp_path / "sub" / "cli.png"
    res = subprocess.run(base + ["--top", "2", "--output", str(out_png)], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert out_png.read_bytes()[:8] == PNG_MAGIC
    assert torchvision.io.decode_image(str(out_png)).shape[-2:] == (round(2.6 * NUM_LAYERS * 100), 1600)

    res = subprocess.run(base + ["--query", "50", "--output", str(tmp_path / "bad.png")], capture_output=True,
                         text=True, cwd=REPO)
    assert res.returncode == 2 and "--query 50 is out of range" in res.stdout
    assert not (tmp_path / "bad.png").exists()

    res = subprocess.run(base + ["--query", "1", "--top", "2", "--output", str(tmp_path / "x.png")],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2 and "not allowed with argument" in res.stderr
