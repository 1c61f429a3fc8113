"""What the command lines share: class names for drawing, one image through a runner."""

from __future__ import annotations

import argparse

import torch

from dfine.deploy import DeployError, preprocess
from dfine.model.postprocessor import MSCOCO_CATEGORY_IDS

__all__ = ["COCO_CLASS_NAMES", "PredictError", "add_trust_argument", "class_name", "detect"]

# The command lines' user-facing error: one line, non-zero exit.
PredictError = DeployError

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


def class_name(label: int, remapped: bool) -> str:
    if remapped and label in MSCOCO_CATEGORY_IDS:
        return COCO_CLASS_NAMES[MSCOCO_CATEGORY_IDS.index(label)]
    if not remapped and 0 <= label < len(COCO_CLASS_NAMES):
        return COCO_CLASS_NAMES[label]
    return str(label)


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


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow a checkpoint that needs arbitrary pickle to load (it can run code; only for files "
                             "you trust). Without it checkpoints load with torch.load(weights_only=True)")
