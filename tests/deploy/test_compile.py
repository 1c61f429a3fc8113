"""torch.compile of the deployed model: one graph, the fused C++ ops inside it, same outputs as eager."""

import numpy as np
import pytest
import torch
import torchvision

from dfine.apps import predict as predict_mod
from dfine.deploy.compiled import compile_model, custom_ops_in, graph_breaks
from tests.conftest import require_backend
from tests.model_helpers import load_predictor
from tests.tiny_checkpoint import write_tiny_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    require_backend("cpp")
    root = tmp_path_factory.mktemp("compile")
    cfg, weights = write_tiny_checkpoint(root)
    images = root / "images"
    images.mkdir()
    gen = torch.Generator().manual_seed(3)
    for i, (h, w) in enumerate([(120, 200), (90, 90)]):
        torchvision.io.write_png(torch.randint(0, 255, (3, h, w), dtype=torch.uint8, generator=gen),
                                 str(images / f"im{i}.png"))
    return str(cfg), str(weights), images


def test_one_graph_with_the_fused_ops(setup):
    cfg, weights, _ = setup
    model, _, _ = load_predictor(cfg, weights, backend="cpp")
    graphs, breaks, reasons, fx = graph_breaks(model, torch.rand(1, 3, 320, 320))
    assert (graphs, breaks) == (1, 0), reasons
    assert custom_ops_in(fx) == {"ms_deform_attn_forward", "fdr_decode_forward"}


def test_one_compile_per_input_size(setup):
    """Sizes other than eval_spatial_size: the per-size caches (encoder position embeddings, decoder anchors)
    are filled before tracing, so each size compiles once (no recompile on its second call), fullgraph, and
    matches eager. Backend: a counting wrapper of "eager" (Dynamo's tracing and guards, no Inductor time)."""
    cfg, weights, _ = setup
    model, _, _ = load_predictor(cfg, weights, backend="cpp")
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = compile_model(model, backend=counting_backend)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for size in [(256, 288), (256, 288), (320, 320), (320, 320), (256, 288)]:
            x = torch.rand(1, 3, *size, generator=gen)
            out, ref = compiled(x), model(x)
            for key in ("pred_logits", "pred_boxes"):
                torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-5)
    assert len(compiles) == 2
    assert [k[0] for k in model.decoder._anchor_cache] == [((16, 18), (8, 9))]
    with pytest.raises(ValueError, match="eval mode"):
        compile_model(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_inductor_parity_and_predict_compile(setup, tmp_path):
    """The real thing: Inductor over the deployed tiny D-FINE-N at 320 (a minute or two on 2 cores, cold)."""
    cfg, weights, images = setup
    torch._dynamo.reset()
    eager, post, _ = load_predictor(cfg, weights, backend="cpp")
    compiled, _, _ = load_predictor(cfg, weights, backend="cpp", compiled=True)
    assert isinstance(compiled.compiled, torch._dynamo.eval_frame.OptimizedModule)
    with torch.no_grad():
        for seed in (0, 1):
            x = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(seed))
            out, ref = compiled(x), eager(x)
            for key in ("pred_logits", "pred_boxes"):
                torch.testing.assert_close(out[key], ref[key], rtol=1e-4, atol=1e-4)

    # the command path: predict(..., compiled=True) gives the eager detections
    got = predict_mod.predict(cfg, weights, str(images), str(tmp_path / "c"), threshold=0.4, backend="cpp",
                              compiled=True)
    want = predict_mod.predict(cfg, weights, str(images), str(tmp_path / "e"), threshold=0.4, backend="cpp")
    assert len(got["results"]) == len(want["results"]) > 0
    key = lambda r: (r["image_id"], -r["score"])  # noqa: E731
    for g, w in zip(sorted(got["results"], key=key), sorted(want["results"], key=key)):
        assert (g["image_id"], g["category_id"]) == (w["image_id"], w["category_id"])
        assert g["score"] == pytest.approx(w["score"], abs=1e-4)
        np.testing.assert_allclose(g["bbox"], w["bbox"], atol=1e-2)
