"""Video input for `python -m dfine predict`: decode frames with OpenCV, detect on each frame, write an
annotated video and COCO-format results whose ``image_id`` is the frame index (0-based).

    python -m dfine predict -c CFG -r CKPT --input clip.mp4 --output DIR     # DIR/clip.mp4, results.json, images.json

torchvision 0.29 has no video decoding (``torchvision.io`` image codecs only), so this uses
``opencv-python-headless`` (in requirements.txt), imported only when a video is given.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterator

import torch
from torchvision.utils import draw_bounding_boxes

from tqdm import tqdm

from dfine.apps.common import PredictError, coco_records, detect, label_texts
from dfine.model.classes import COCO_CLASS_NAMES, ClassInfo
from dfine.model.postprocessor import MSCOCO_CATEGORY_IDS

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv"}
DEFAULT_FPS = 25.0


def is_video(path) -> bool:
    path = Path(path)
    return path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES


def _cv2():
    try:
        import cv2
    except ImportError as err:
        raise PredictError("video input needs OpenCV: pip install opencv-python-headless") from err
    return cv2


class VideoReader:
    """Frames of a video file as uint8 [3, H, W] RGB tensors; ``fps`` and ``frame_count`` (0 when unknown)."""

    def __init__(self, path):
        cv2 = _cv2()
        self.path = Path(path)
        self._cap = cv2.VideoCapture(str(self.path))
        if not self._cap.isOpened():
            raise PredictError(f"cannot read video {str(self.path)!r}: OpenCV could not open it")
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and math.isfinite(fps) and fps > 0 else DEFAULT_FPS
        count = self._cap.get(cv2.CAP_PROP_FRAME_COUNT)
        self.frame_count = int(count) if count and math.isfinite(count) and count > 0 else 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        cv2 = _cv2()
        while True:
            ok, bgr = self._cap.read()
            if not ok:
                return
            yield torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).contiguous()

    def close(self):
        self._cap.release()


class VideoWriter:
    """Writes uint8 [3, H, W] RGB frames to an .mp4 (mp4v) file; opened at the first frame."""

    def __init__(self, path, fps: float):
        self.path = Path(path)
        self.fps = fps
        self._writer = None
        self.frames = 0

    def write(self, frame: torch.Tensor):
        cv2 = _cv2()
        h, w = int(frame.shape[-2]), int(frame.shape[-1])
        if self._writer is None:
            self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
            if not self._writer.isOpened():
                raise PredictError(f"cannot write video {str(self.path)!r} (OpenCV mp4v writer did not open)")
        bgr = cv2.cvtColor(frame.permute(1, 2, 0).contiguous().numpy(), cv2.COLOR_RGB2BGR)
        self._writer.write(bgr)
        self.frames += 1

    def close(self):
        if self._writer is not None:
            self._writer.release()


def predict_video(runner: Callable, size, input_path, output_dir, threshold=0.4, device="cpu",
                  classes: ClassInfo = None) -> dict:
    """Returns {"results": [COCO detections, image_id = frame index], "images": [one per frame], "categories",
    "errors": [], "video": {...}}; writes ``output_dir/<stem>.mp4``, ``results.json`` and ``images.json``.
    ``classes``: names and category ids per label (default: the COCO ones)."""
    if classes is None:
        classes = ClassInfo(tuple(COCO_CLASS_NAMES), tuple(MSCOCO_CATEGORY_IDS), "COCO")
    input_path = Path(input_path)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_video = out_dir / f"{input_path.stem}.mp4"
    if out_video.resolve() == input_path.resolve():
        raise PredictError(f"--output {str(out_dir)!r} would overwrite the input video; choose another directory")
    reader = VideoReader(input_path)
    writer = VideoWriter(out_video, reader.fps)
    results, infos = [], []
    try:
        for frame_id, frame in enumerate(tqdm(reader, total=reader.frame_count or None, desc="predict video",
                                              unit="frame")):
            labels, boxes, scores = detect(runner, frame, size, threshold, device)
            writer.write(draw_bounding_boxes(frame, boxes, labels=label_texts(classes, labels, scores), colors="red",
                                             width=2))
            h, w = frame.shape[-2:]
            infos.append({"id": frame_id, "file_name": input_path.name, "frame": frame_id,
                          "width": int(w), "height": int(h)})
            results += coco_records(classes, frame_id, labels, boxes, scores)
    finally:
        reader.close()
        writer.close()
    if not infos:
        out_video.unlink(missing_ok=True)
        raise PredictError(f"cannot read video {str(input_path)!r}: no frame could be decoded")
    video = {"file_name": input_path.name, "fps": reader.fps, "frames": len(infos), "output": out_video.name}
    with open(out_dir / "results.json", "w") as f:
        json.dump(results, f)
    with open(out_dir / "images.json", "w") as f:
        json.dump({"images": infos, "categories": classes.categories(), "video": video}, f, indent=1)
    return {"results": results, "images": infos, "categories": classes.categories(), "errors": [], "video": video}
