"""The published detection transforms, on torchvision.transforms.v2.

Train, in order: RandomPhotometricDistort(p=0.5), RandomZoomOut(fill=0), RandomIoUCrop applied with
p=0.8, SanitizeBoundingBoxes(min_size=1), RandomHorizontalFlip, Resize([H, W]),
SanitizeBoundingBoxes(min_size=1), to float32 /255 (no mean/std), boxes to normalised cxcywh.
From the stop epoch on (`set_epoch(e)` with e >= stop_epoch) the first three are skipped: the
published augmentation "policy". Val: Resize([H, W]), to float32 /255, normalised cxcywh boxes.

Input: (PIL image or uint8 tensor, target) as returned by dfine.data.coco.CocoDetection.
Output: (float32 tv_tensors.Image [3, H, W] in [0, 1], target) where target["boxes"] is a plain
float32 [N, 4] tensor of (cx, cy, w, h) divided by (W, H, W, H); labels/area/iscrowd are filtered
together with the boxes; image_id and orig_size pass through unchanged. N may be 0.
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from dfine.data.epoch import SharedEpoch

# ops switched off from the stop epoch on
POLICY_OPS = ("photometric_distort", "zoom_out", "iou_crop")
# per-box target entries that must be filtered together with the boxes
_PER_BOX_KEYS = ("labels", "area", "iscrowd")


def _per_box_entries(inputs):
    target = inputs[1] if isinstance(inputs, (tuple, list)) and len(inputs) == 2 else inputs
    return tuple(target[k] for k in _PER_BOX_KEYS if k in target)


def _boxes_of(inputs) -> tv_tensors.BoundingBoxes | None:
    for item in inputs:
        if isinstance(item, dict) and isinstance(item.get("boxes"), tv_tensors.BoundingBoxes):
            return item["boxes"]
    return None


class RandomIoUCropWithP(v2.Transform):
    """v2.RandomIoUCrop applied with probability p (v2's has no p), and never on an image without
    boxes, where its IoU criteria are undefined."""

    def __init__(self, p: float = 0.8, **iou_crop_kwargs):
        super().__init__()
        self.p = p
        self.crop = v2.RandomIoUCrop(**iou_crop_kwargs)

    def forward(self, *inputs):
        inputs = inputs if len(inputs) > 1 else inputs[0]
        boxes = _boxes_of(inputs if isinstance(inputs, (tuple, list)) else (inputs,))
        if boxes is None or boxes.shape[0] == 0 or torch.rand(1).item() >= self.p:
            return inputs
        return self.crop(inputs)


def sanitize(min_size: float = 1.0) -> v2.SanitizeBoundingBoxes:
    return v2.SanitizeBoundingBoxes(min_size=min_size, labels_getter=_per_box_entries)


def _as_size(image_size) -> tuple[int, int]:
    if isinstance(image_size, int):
        return (image_size, image_size)
    h, w = image_size
    return (int(h), int(w))


def to_model_input(image, target: dict):
    """float32 image in [0, 1] and plain normalised cxcywh boxes."""
    image = v2.functional.to_dtype(v2.functional.to_image(image), torch.float32, scale=True)
    boxes = target["boxes"]
    h, w = boxes.canvas_size
    cxcywh = v2.functional.convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.CXCYWH)
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    target = dict(target)
    target["boxes"] = cxcywh.as_subclass(torch.Tensor).to(torch.float32) / scale
    return image, target


class DetectionTransforms:
    """Callable (image, target) -> (image, target) with the published train or val pipeline.

    stop_epoch: from this epoch on the POLICY_OPS are skipped (None: never).
    """

    def __init__(self, image_size=640, train: bool = True, stop_epoch: int | None = None, policy_ops=POLICY_OPS):
        self.image_size = _as_size(image_size)
        self.train = train
        self.stop_epoch = stop_epoch
        self.policy_ops = tuple(policy_ops)
        self._epoch = SharedEpoch(0)
        if train:
            # PIL images stay PIL until the end, as published: the hue step of the photometric
            # distortion is ~30x faster through PIL than on uint8 tensors
            self.ops = [
                ("photometric_distort", v2.RandomPhotometricDistort(p=0.5)),
                ("zoom_out", v2.RandomZoomOut(fill=0)),
                ("iou_crop", RandomIoUCropWithP(p=0.8)),
                ("sanitize", sanitize(1.0)),
                ("flip", v2.RandomHorizontalFlip()),
                ("resize", v2.Resize(list(self.image_size))),
                ("sanitize_after_resize", sanitize(1.0)),
            ]
        else:
            self.ops = [("resize", v2.Resize(list(self.image_size)))]
        unknown = set(self.policy_ops) - {name for name, _ in self.ops}
        if train and unknown:
            raise ValueError(f"policy_ops {sorted(unknown)} are not ops of the train pipeline")

    def set_epoch(self, epoch: int) -> None:
        self._epoch.set(epoch)

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def active_ops(self) -> list[str]:
        skip = self.train and self.stop_epoch is not None and self.epoch >= self.stop_epoch
        return [name for name, _ in self.ops if not (skip and name in self.policy_ops)]

    def __call__(self, image, target: dict):
        active = set(self.active_ops())
        for name, op in self.ops:
            if name in active:
                image, target = op(image, target)
        return to_model_input(image, target)

    def __repr__(self) -> str:
        kind = "train" if self.train else "val"
        return f"DetectionTransforms({kind}, size={self.image_size}, stop_epoch={self.stop_epoch}, ops={self.active_ops()})"


def build_transforms(image_size=640, train: bool = True, stop_epoch: int | None = None) -> DetectionTransforms:
    return DetectionTransforms(image_size=image_size, train=train, stop_epoch=stop_epoch)
