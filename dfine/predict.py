"""Run a D-FINE checkpoint on images: draw boxes, write COCO-format results.

    python -m dfine predict -c CFG -r CKPT --input IMG_OR_DIR --output DIR [--threshold 0.4] [--backend auto]
    python -m dfine predict ... --backend onnxruntime [--onnx model.onnx]    # exported graph (dfine.export)
    python -m dfine predict ... --compile                                    # torch.compile (dfine/compiled.py)
    python -m dfine predict ... --input clip.mp4                             # video (dfine/video.py)

Both paths go through a runner (dfine.runners): runner(images [N,3,H,W], orig_sizes [N,2] (w, h)) ->
(labels, boxes, scores), fed by the same `preprocess`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import List

import torch
import torchvision
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes

import dfine
from dfine.checkpoint import load_checkpoint
from dfine.cpu_speed import (
    loaded_allocator, prepack_linear_weights, resolve_channels_last, retain_freed_memory, to_memory_format,
)
from dfine.export import DetectorGraph, ExportError
from dfine.model.postprocessor import MSCOCO_CATEGORY_IDS
from dfine.runners import TorchRunner, onnxruntime_runner

RUNNER_BACKENDS = list(dfine.ops.BACKENDS) + ["onnxruntime"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

COCO_CLASS_NAMES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
]


class PredictError(RuntimeError):
    """A clear, user-facing failure (missing file, unreadable image)."""


def preprocess(image: torch.Tensor, size) -> torch.Tensor:
    """uint8 [3, H, W] RGB -> float [3, h, w] in [0, 1]: plain resize to the model size (aspect
    ratio not kept, as the model was trained and evaluated), no mean/std normalisation."""
    resized = TF.resize(image, list(size), antialias=True)
    return resized.float() / 255.0


def read_image(path: Path) -> torch.Tensor:
    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except Exception as err:  # torchvision raises RuntimeError/ValueError depending on the format
        raise PredictError(f"cannot read image {str(path)!r}: {err}") from err


def list_images(path: Path) -> List[Path]:
    if not path.exists():
        raise PredictError(f"--input {str(path)!r} does not exist")
    if path.is_file():
        return [path]
    images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise PredictError(f"--input directory {str(path)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


def class_name(label: int, remapped: bool) -> str:
    if remapped and label in MSCOCO_CATEGORY_IDS:
        return COCO_CLASS_NAMES[MSCOCO_CATEGORY_IDS.index(label)]
    if not remapped and 0 <= label < len(COCO_CLASS_NAMES):
        return COCO_CLASS_NAMES[label]
    return str(label)


def load_predictor(config: str, checkpoint: str, backend: str = "auto", device: str = "cpu", compiled: bool = False):
    if not os.path.isfile(config):
        raise PredictError(f"config file {config!r} does not exist")
    if not os.path.isfile(checkpoint):
        raise PredictError(f"checkpoint file {checkpoint!r} does not exist")
    cfg = dfine.load_config(config)
    model = dfine.build_model(cfg, backend=backend)
    load_checkpoint(model, checkpoint)
    # channels_last weights on the CPU: oneDNN then keeps every activation NHWC (no reorders)
    model = to_memory_format(model.deploy().to(device), resolve_channels_last(cfg.get("channels_last"), device))
    if torch.device(device).type == "cpu":
        prepack_linear_weights(model)  # linear layers through oneDNN with prepacked weights
    if compiled:  # torch.compile, fused ops inside the graph (dfine/compiled.py)
        from dfine.compiled import compile_model

        model = compile_model(model)
    post = dfine.build_postprocessor(cfg)
    return model, post, cfg


def load_runner(config: str, checkpoint: str, backend: str = "auto", device: str = "cpu", onnx=None,
                compiled: bool = False):
    """(runner, cfg, postprocessor): the PyTorch model of `load_predictor`, or onnxruntime."""
    if backend == "onnxruntime":
        try:
            return onnxruntime_runner(config, checkpoint, onnx, device)
        except ExportError as err:
            raise PredictError(str(err)) from err
        if compiled:
            raise PredictError("--compile applies to the PyTorch model, not to --backend onnxruntime")
    if onnx is not None:
        raise PredictError("--onnx is only used with --backend onnxruntime")
    model, post, cfg = load_predictor(config, checkpoint, backend, device, compiled)
    return TorchRunner(DetectorGraph(model, post)), cfg, post


def detect(runner, image: torch.Tensor, size, threshold: float, device="cpu", remapped=False):
    """One uint8 [3, H, W] image -> (labels, boxes xyxy in its pixels, scores) above `threshold`; labels are
    COCO category ids when the config remaps them."""
    h, w = image.shape[-2:]
    labels, boxes, scores = (t[0].cpu() for t in runner(preprocess(image, size)[None].to(device),
                                                         torch.tensor([[w, h]], device=device)))
    if remapped:
        labels = torch.tensor(MSCOCO_CATEGORY_IDS)[labels]
    keep = scores > threshold
    return labels[keep], boxes[keep], scores[keep]


def predict(config, checkpoint, input_path, output_dir, threshold=0.4, backend="auto", device="cpu",
            onnx=None, compiled=False) -> dict:
    """Returns {"results": [COCO detections], "images": [...], "errors": [messages]} (+ "video" for a video).

    backend: a fused-op backend (PyTorch) or "onnxruntime" (the file `onnx`, else an on-the-fly export)."""
    from tqdm import tqdm

    from dfine.video import is_video, predict_video

    video = is_video(input_path)
    images = [] if video else list_images(Path(input_path))
    runner, cfg, post = load_runner(config, checkpoint, backend, device, onnx, compiled)
    size = cfg.get("eval_spatial_size") or [640, 640]
    remapped = bool(post.remap_mscoco_category)
    if video:
        return predict_video(runner, size, input_path, output_dir, threshold, device, remapped)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, infos, errors = [], [], []
    for image_id, path in enumerate(tqdm(images, disable=len(images) == 1, desc="predict")):
        try:
            image = read_image(path)
        except PredictError as err:
            if len(images) == 1:
                raise
            errors.append(str(err))
            continue
        h, w = image.shape[-2:]
        labels, boxes, scores = detect(runner, image, size, threshold, device, remapped)
        names = [f"{class_name(int(l), remapped)} {float(s):.2f}" for l, s in zip(labels, scores)]
        drawn = draw_bounding_boxes(image, boxes, labels=names, colors="red", width=2)
        torchvision.io.write_jpeg(drawn, str(out_dir / f"{path.stem}.jpg"))
        infos.append({"id": image_id, "file_name": path.name, "width": int(w), "height": int(h)})
        for l, b, s in zip(labels.tolist(), boxes.tolist(), scores.tolist()):
            results.append({"image_id": image_id, "category_id": int(l),
                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)})
    with open(out_dir / "results.json", "w") as f:
        json.dump(results, f)
    with open(out_dir / "images.json", "w") as f:
        json.dump({"images": infos}, f, indent=1)
    return {"results": results, "images": infos, "errors": errors}


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("-c", "--config", required=True, help="config YAML, e.g. configs/dfine/dfine_hgnetv2_n_coco.yml")
    parser.add_argument("-r", "--resume", required=True, help="checkpoint (.pth): state_dict, {'model'} or {'ema'}")
    parser.add_argument("--input", required=True, help="an image, a directory of images, or a video (.mp4, .avi, ...)")
    parser.add_argument("--output", required=True, help="directory for drawn images (or the video) and results.json")
    parser.add_argument("--threshold", type=float, default=0.4)
    parser.add_argument("--backend", default="auto", choices=RUNNER_BACKENDS,
                        help="fused-op backend of the PyTorch model, or onnxruntime (an exported graph)")
    parser.add_argument("--onnx", default=None,
                        help="with --backend onnxruntime: the ONNX file (default: export the checkpoint to a temp file)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the deployed model (fused ops in the graph; the first image compiles)")


def run(args) -> int:
    if torch.device(args.device).type == "cpu" and loaded_allocator() == "system":
        # the command owns its process: keep freed activations on the heap for the next image instead
        # of faulting fresh pages in for every large tensor (dfine/cpu_speed.py)
        retain_freed_memory()
    try:
        out = predict(args.config, args.resume, args.input, args.output, args.threshold, args.backend, args.device,
                      onnx=args.onnx, compiled=args.compile)
    except PredictError as err:
        print(f"error: {err}")
        return 2
    for msg in out["errors"]:
        print(f"error: {msg}")
    unit = "frame(s)" if "video" in out else "image(s)"
    print(f"{len(out['images'])} {unit}, {len(out['results'])} detection(s) > {args.threshold} -> {args.output}")
    return 1 if out["errors"] else 0
