"""predict never writes over an input or another result; 16-bit images are scaled by their range everywhere
(predict, visualize, the training loader)."""

import json

import cv2
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from dfine.apps import predict as predict_mod
from dfine.apps import visualize as vis_mod
from dfine.apps.common import PredictError
from dfine.data.coco import to_rgb8
from dfine.deploy import preprocess, read_image
from tests.tiny_checkpoint import write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    cfg, weights = write_tiny_checkpoint(root)
    gen = torch.Generator().manual_seed(0)
    image8 = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8, generator=gen)
    return str(cfg), str(weights), root, image8


def _write_png16(path, image8):
    """The same picture as a 48-bit RGB PNG (value * 257, so 255 -> 65535); OpenCV writes BGR."""
    rgb16 = image8.permute(1, 2, 0).numpy().astype(np.uint16) * 257
    assert cv2.imwrite(str(path), rgb16[:, :, ::-1].copy())


def test_16bit_png_is_scaled_by_its_range(tiny, tmp_path):
    cfg, weights, _, image8 = tiny
    _write_png16(tmp_path / "deep.png", image8)
    image16 = read_image(tmp_path / "deep.png")
    assert image16.dtype == torch.uint16
    a, b = preprocess(image8, (64, 64)), preprocess(image16, (64, 64))
    assert float(b.max()) <= 1.0
    torch.testing.assert_close(b, a, rtol=0, atol=2.5 / 255)  # uint8 resize rounds to integers
    out = predict_mod.predict(cfg, weights, str(tmp_path / "deep.png"), str(tmp_path / "out"), threshold=0.0,
                              backend="reference")
    assert out["errors"] == [] and len(out["results"]) > 0
    assert (tmp_path / "out" / "deep.jpg").is_file()
    vis = vis_mod.visualize(cfg, weights, str(tmp_path / "deep.png"), str(tmp_path / "fdr.png"),
                            backend="reference")
    assert (tmp_path / "fdr.png").is_file() and vis.probs.shape[0] == 1


def test_training_loader_scales_16bit_grayscale():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    rgb = np.asarray(to_rgb8(Image.fromarray(values)))
    assert rgb.shape == (1, 4, 3) and rgb[0, :, 0].tolist() == [0, 1, 128, 255]
    assert np.array_equal(rgb[..., 0], rgb[..., 2])
    plain = Image.fromarray(np.full((2, 2, 3), 7, np.uint8))
    assert np.array_equal(np.asarray(to_rgb8(plain)), np.asarray(plain))


def test_inputs_with_one_stem_get_distinct_outputs(tiny, tmp_path):
    cfg, weights, _, image8 = tiny
    images = tmp_path / "in"
    images.mkdir()
    torchvision.io.write_jpeg(image8, str(images / "a.jpg"))
    torchvision.io.write_png(image8.flip(-1), str(images / "a.png"))
    torchvision.io.write_png(image8, str(images / "b.png"))
    out = predict_mod.predict(cfg, weights, str(images), str(tmp_path / "out"), backend="reference")
    drawn = sorted(p.name for p in (tmp_path / "out").glob("*.jpg"))
    assert drawn == ["a.jpg.jpg", "a.png.jpg", "b.jpg"]
    assert [i["file_name"] for i in out["images"]] == ["a.jpg", "a.png", "b.png"]


def test_output_into_the_input_directory_never_overwrites_an_input(tiny, tmp_path):
    cfg, weights, _, image8 = tiny
    torchvision.io.write_jpeg(image8, str(tmp_path / "c.jpg"))
    before = (tmp_path / "c.jpg").read_bytes()
    with pytest.raises(PredictError, match="would overwrite the input image"):
        predict_mod.predict(cfg, weights, str(tmp_path), str(tmp_path), backend="reference")
    with pytest.raises(PredictError, match="would overwrite the input image"):
        predict_mod.predict(cfg, weights, str(tmp_path / "c.jpg"), str(tmp_path), backend="reference")
    assert (tmp_path / "c.jpg").read_bytes() == before
    assert not (tmp_path / "results.json").exists()
    # a PNG input next to its drawn JPEG is fine: nothing is overwritten
    other = tmp_path / "png"
    other.mkdir()
    torchvision.io.write_png(image8, str(other / "d.png"))
    predict_mod.predict(cfg, weights, str(other), str(other), backend="reference")
    assert (other / "d.jpg").is_file() and json.loads((other / "images.json").read_text())["images"][0]["id"] == 0


def test_unwritable_output_is_one_error_line(tiny, tmp_path, capsys):
    from dfine.__main__ import main

    cfg, weights, _, image8 = tiny
    torchvision.io.write_png(image8, str(tmp_path / "e.png"))
    (tmp_path / "a_file").write_text("in the way")
    code = main(["predict", "-c", cfg, "-r", weights, "--input", str(tmp_path / "e.png"), "--output",
                 str(tmp_path / "a_file" / "out"), "--backend", "reference"])
    assert code == 2
    assert "error: cannot write the results to --output" in capsys.readouterr().out
