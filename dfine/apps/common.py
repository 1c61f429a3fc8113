"""What the command lines share: one image through a runner, the --classes and --trust-checkpoint options,
the class-names notice."""

from __future__ import annotations

import argparse
import sys

import torch

from dfine.deploy import DeployError, preprocess
from dfine.model.classes import COCO_CLASS_NAMES, ClassInfo

__all__ = ["COCO_CLASS_NAMES", "PredictError", "add_classes_argument", "add_trust_argument", "coco_records",
           "detect", "label_texts", "print_notice"]

# The command lines' user-facing error: one line, non-zero exit.
PredictError = DeployError


def detect(runner, image: torch.Tensor, size, threshold: float, device="cpu"):
    """One uint8 [3, H, W] image -> (labels, boxes xyxy in its pixels, scores) above `threshold`; labels are the
    model's (0..K-1): ``ClassInfo`` says what they mean."""
    h, w = image.shape[-2:]
    labels, boxes, scores = (t[0].cpu() for t in runner(preprocess(image, size)[None].to(device),
                                                         torch.tensor([[w, h]], device=device)))
    keep = scores > threshold
    return labels[keep], boxes[keep], scores[keep]


def label_texts(classes: ClassInfo, labels, scores) -> list:
    """The text drawn at each box: the class name and the score."""
    return [f"{classes.name(int(l))} {float(s):.2f}" for l, s in zip(labels, scores)]


def coco_records(classes: ClassInfo, image_id: int, labels, boxes, scores) -> list:
    """COCO results records of one image; ``category_id`` is the dataset's id of each label (None for a label
    no dataset category maps to)."""
    return [{"image_id": image_id, "category_id": classes.category_id(l),
             "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)}
            for l, b, s in zip(labels.tolist(), boxes.tolist(), scores.tolist())]


def print_notice(classes: ClassInfo) -> None:
    """The notice of class names that were guessed (no metadata in the checkpoint), on stderr."""
    if classes is not None and classes.notice:
        print(f"notice: {classes.notice}", file=sys.stderr)


def add_classes_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", default=None, metavar="FILE",
                        help="class names overriding those the checkpoint records: a text file with one name per line "
                             "(label order), a JSON list of names, a JSON object {category_id: name}, or a COCO "
                             "annotation file (its 'categories'); see docs/deploy.md")


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow a checkpoint that needs arbitrary pickle to load (it can run code; only for files "
                             "you trust). Without it checkpoints load with torch.load(weights_only=True)")
