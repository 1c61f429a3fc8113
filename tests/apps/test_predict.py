"""The prediction command on a tiny random-weight checkpoint."""

import json
import subprocess
import sys

import pytest
import torch
import torchvision

import dfine
from dfine.apps import predict as predict_mod
from dfine.deploy import preprocess
from tests.model_helpers import REPO, config_path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("pred")
    cfg_file = root / "tiny.yml"
    # a small N variant: fewer queries and a 320 model size keep the test fast
    cfg_file.write_text(
        f"__include__: ['{config_path('n')}']\n"
        "eval_spatial_size: [320, 320]\n"
        "DFINETransformer:\n  num_queries: 50\n"
        "DFINEPostProcessor:\n  num_top_queries: 20\n"
    )
    torch.manual_seed(0)
    model = dfine.build_model(dfine.load_config(str(cfg_file)), backend="reference")
    with torch.no_grad():
        # make some scores exceed the threshold: raise the class bias of the score heads
        for head in model.decoder.dec_score_head:
            head.bias.fill_(2.0)
    torch.save({"ema": {"module": model.state_dict()}}, root / "tiny.pth")
    images = root / "images"
    images.mkdir()
    for i, (h, w) in enumerate([(120, 200), (90, 90)]):
        torchvision.io.write_png(torch.randint(0, 255, (3, h, w), dtype=torch.uint8), str(images / f"im{i}.png"))
    (images / "broken.jpg").write_bytes(b"not an image")
    return cfg_file, root / "tiny.pth", images


def test_preprocess_plain_resize():
    img = torch.full((3, 10, 20), 255, dtype=torch.uint8)
    x = preprocess(img, (32, 16))
    assert x.shape == (3, 32, 16) and x.dtype == torch.float32
    assert torch.allclose(x, torch.ones_like(x))


def test_predict_directory(ckpt, tmp_path):
    cfg, weights, images = ckpt
    out = predict_mod.predict(str(cfg), str(weights), str(images), str(tmp_path), threshold=0.4, backend="reference")
    assert len(out["images"]) == 2
    assert len(out["errors"]) == 1 and "broken.jpg" in out["errors"][0]
    assert (tmp_path / "im0.jpg").exists() and (tmp_path / "im1.jpg").exists()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results and len(results) <= 2 * 20
    for r in results:
        assert set(r) == {"image_id", "category_id", "bbox", "score"}
        assert r["score"] > 0.4 and len(r["bbox"]) == 4 and r["bbox"][2] >= 0
    drawn = torchvision.io.decode_image(str(tmp_path / "im0.jpg"))
    assert drawn.shape == (3, 120, 200)


def test_cli_errors(ckpt, tmp_path):
    cfg, weights, images = ckpt
    cmd = [sys.executable, "-m", "dfine", "predict", "-c", str(cfg), "-r", str(tmp_path / "missing.pth"),
           "--input", str(images), "--output", str(tmp_path / "o")]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2 and "missing.pth" in res.stdout and "does not exist" in res.stdout
    cmd[cmd.index("-r") + 1] = str(weights)
    cmd[cmd.index("--input") + 1] = str(images / "broken.jpg")
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2 and "cannot read image" in res.stdout
