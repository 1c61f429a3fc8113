"""`python -m dfine predict --input VIDEO`: per-frame detection, annotated video, COCO results by frame."""

import json
import subprocess
import sys

import cv2  # opencv-python-headless, in requirements.txt
import numpy as np
import pytest
import torch

from dfine.apps import predict as predict_mod
from dfine.deploy import preprocess
from dfine.apps import video as video_mod
from tests.model_helpers import REPO, load_predictor
from tests.tiny_checkpoint import write_tiny_checkpoint

FRAMES, H, W = 4, 96, 128


def write_clip(path, fourcc):
    """A few frames: grey noise background and a blue square moving right (RGB; no pure red anywhere)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 5.0, (W, H))
    assert writer.isOpened()
    rng = np.random.default_rng(0)
    for i in range(FRAMES):
        grey = rng.integers(60, 140, size=(H, W, 1), dtype=np.uint8)
        rgb = np.repeat(grey, 3, axis=2)
        rgb[30:70, 10 + 15 * i:50 + 15 * i] = (30, 60, 220)
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()


def decode_all(path):
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    return frames


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    cfg, weights = write_tiny_checkpoint(root)
    write_clip(root / "clip.mp4", "mp4v")
    write_clip(root / "clip.avi", "MJPG")
    return cfg, weights, root


def is_red(frame):
    return (frame[..., 0] > 200) & (frame[..., 1] < 80) & (frame[..., 2] < 80)


@pytest.mark.parametrize("name", ["clip.mp4", "clip.avi"])
def test_video_results_and_annotated_output(setup, tmp_path, name):
    cfg, weights, root = setup
    out = predict_mod.predict(str(cfg), str(weights), str(root / name), str(tmp_path), threshold=0.4, backend="cpp")
    assert out["errors"] == [] and out["video"]["frames"] == FRAMES and out["video"]["fps"] == pytest.approx(5.0)
    assert [im["id"] for im in out["images"]] == list(range(FRAMES))
    assert all(im["width"] == W and im["height"] == H and im["file_name"] == name for im in out["images"])
    assert json.loads((tmp_path / "results.json").read_text()) == out["results"]
    assert json.loads((tmp_path / "images.json").read_text())["images"] == out["images"]

    # independent: decode the frames here, run the deployed model + postprocessor on each
    model, post, _ = load_predictor(str(cfg), str(weights), backend="cpp")
    frames = decode_all(root / name)
    assert len(frames) == FRAMES
    for frame_id, frame in enumerate(frames):
        image = torch.from_numpy(frame).permute(2, 0, 1)
        with torch.no_grad():
            det = post(model(preprocess(image, [320, 320])[None]), torch.tensor([[W, H]]))[0]
        keep = det["scores"] > 0.4
        got = [r for r in out["results"] if r["image_id"] == frame_id]
        assert len(got) == int(keep.sum()) > 0
        np.testing.assert_allclose([r["score"] for r in got], det["scores"][keep].tolist(), rtol=1e-6)
        boxes = det["boxes"][keep]
        np.testing.assert_allclose([r["bbox"] for r in got],
                                   torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist(), atol=1e-4)
        assert [r["category_id"] for r in got] == det["labels"][keep].tolist()

    # the annotated video: same frame count and size, red boxes drawn (the input has no red)
    written = decode_all(tmp_path / "clip.mp4")
    assert len(written) == FRAMES and written[0].shape == (H, W, 3)
    assert not any(is_red(f).any() for f in frames)
    assert all(is_red(f).sum() > 20 for f in written)


def test_cli_video_progress_and_errors(setup, tmp_path):
    cfg, weights, root = setup
    cmd = [sys.executable, "-m", "dfine", "predict", "-c", str(cfg), "-r", str(weights), "--input",
           str(root / "clip.avi"), "--output", str(tmp_path / "o"), "--backend", "cpp"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{FRAMES} frame(s)" in res.stdout
    assert "predict video" in res.stderr and f"{FRAMES}/{FRAMES}" in res.stderr  # tqdm bar with the total
    assert (tmp_path / "o" / "clip.mp4").exists()

    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 10)
    with pytest.raises(predict_mod.PredictError, match="cannot read video"):
        predict_mod.predict(str(cfg), str(weights), str(broken), str(tmp_path / "b"), backend="cpp")


def test_is_video(tmp_path):
    (tmp_path / "a.MKV").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    assert video_mod.is_video(tmp_path / "a.MKV") and not video_mod.is_video(tmp_path / "b.png")
    assert not video_mod.is_video(tmp_path / "missing.mp4") and not video_mod.is_video(tmp_path)
