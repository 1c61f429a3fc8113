"""Detection transforms built from a config's `transforms.ops` list, on torchvision.transforms.v2.

A pipeline is a list of ops as the published configs write them, ``{type: NAME, param: value, ...}``,
applied in order to (image, target), plus the published augmentation "policy": from the stop epoch on
(`set_epoch(e)` with e >= stop_epoch) the ops whose type is listed in `policy_ops` are skipped.
`OPS` maps each type to its constructor; docs/training.md lists them with their parameters.

Defaults (`default_ops`), the published pipelines:
train: RandomPhotometricDistort(p=0.5), RandomZoomOut(fill=0), RandomIoUCrop(p=0.8),
SanitizeBoundingBoxes(min_size=1), RandomHorizontalFlip, Resize([H, W]), SanitizeBoundingBoxes(min_size=1),
ConvertPILImage(float32, scale), ConvertBoxes(cxcywh, normalize); policy ops: the first three.
val: Resize([H, W]), ConvertPILImage(float32, scale).

Input: (PIL image or uint8 tensor, target) as returned by dfine.data.coco.CocoDetection.
Output, whatever the list: (float32 tv_tensors.Image [3, H, W], target) where target["boxes"] is a plain
float32 [N, 4] tensor of (cx, cy, w, h) divided by (W, H, W, H); labels/area/iscrowd are filtered
together with the boxes; image_id and orig_size pass through unchanged. N may be 0. A list without
ConvertPILImage / ConvertBoxes gets their default conversion at the end (the published val list has no
ConvertBoxes), because the loss and the collate function need exactly this output.

Mosaic and MixUp draw other images of the dataset: the dataset binds itself (`bind_source`), and the
other images enter the op un-augmented (put these ops first).
"""

from __future__ import annotations

import inspect
import math

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from dfine.data.epoch import SharedEpoch

# per-box target entries that must be filtered (and mixed) together with the boxes
_PER_BOX_KEYS = ("labels", "area", "iscrowd")
# the published policy: switched off from the stop epoch on
POLICY_OPS = ("RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop")


def default_ops(image_size=640, train: bool = True) -> list[dict]:
    """The published train or val `ops` list at `image_size` (int or [H, W])."""
    size = list(_as_size(image_size))
    if not train:
        return [{"type": "Resize", "size": size}, {"type": "ConvertPILImage", "dtype": "float32", "scale": True}]
    return [
        {"type": "RandomPhotometricDistort", "p": 0.5},
        {"type": "RandomZoomOut", "fill": 0},
        {"type": "RandomIoUCrop", "p": 0.8},
        {"type": "SanitizeBoundingBoxes", "min_size": 1},
        {"type": "RandomHorizontalFlip"},
        {"type": "Resize", "size": size},
        {"type": "SanitizeBoundingBoxes", "min_size": 1},
        {"type": "ConvertPILImage", "dtype": "float32", "scale": True},
        {"type": "ConvertBoxes", "fmt": "cxcywh", "normalize": True},
    ]


def _per_box_entries(inputs):
    target = inputs[1] if isinstance(inputs, (tuple, list)) and len(inputs) == 2 else inputs
    return tuple(target[k] for k in _PER_BOX_KEYS if k in target)


def _boxes_of(inputs) -> tv_tensors.BoundingBoxes | None:
    for item in inputs:
        if isinstance(item, dict) and isinstance(item.get("boxes"), tv_tensors.BoundingBoxes):
            return item["boxes"]
    return None


def _as_size(image_size) -> tuple[int, int]:
    if isinstance(image_size, int):
        return (image_size, image_size)
    h, w = image_size
    return (int(h), int(w))


# ------------------------------------------------------------------------------------------------
# ops (published names). v2 classes where torchvision has the op; the rest are defined here.


class RandomIoUCrop(v2.Transform):
    """v2.RandomIoUCrop applied with probability p (v2's has no p; the published default is 1), and never on
    an image without boxes, where its IoU criteria are undefined."""

    def __init__(self, min_scale: float = 0.3, max_scale: float = 1.0, min_aspect_ratio: float = 0.5,
                 max_aspect_ratio: float = 2.0, sampler_options=None, trials: int = 40, p: float = 1.0):
        super().__init__()
        self.p = p
        self.crop = v2.RandomIoUCrop(min_scale, max_scale, min_aspect_ratio, max_aspect_ratio,
                                     sampler_options=sampler_options, trials=trials)

    def forward(self, *inputs):
        inputs = inputs if len(inputs) > 1 else inputs[0]
        boxes = _boxes_of(inputs if isinstance(inputs, (tuple, list)) else (inputs,))
        if boxes is None or boxes.shape[0] == 0 or torch.rand(1).item() >= self.p:
            return inputs
        return self.crop(inputs)


def SanitizeBoundingBoxes(min_size: float = 1.0, min_area: float = 1.0) -> v2.SanitizeBoundingBoxes:
    """v2.SanitizeBoundingBoxes that drops labels, area and iscrowd together with their boxes."""
    return v2.SanitizeBoundingBoxes(min_size=min_size, min_area=min_area, labels_getter=_per_box_entries)


def Resize(size, interpolation: str = "bilinear", max_size=None, antialias: bool = True) -> v2.Resize:
    """v2.Resize; an integer size means a square (batches are stacked, so every image needs the same size)."""
    if isinstance(size, int):
        size = [size, size]
    return v2.Resize(list(size), interpolation=v2.InterpolationMode(interpolation), max_size=max_size,
                     antialias=antialias)


def EmptyTransform():
    """The published no-op."""
    return v2.Identity()


class ConvertPILImage:
    """PIL image or uint8 tensor -> float32 tv_tensors.Image, divided by 255 when `scale`."""

    def __init__(self, dtype: str = "float32", scale: bool = True):
        if dtype != "float32":
            raise ValueError(f"ConvertPILImage: dtype must be 'float32' (the model's input), got {dtype!r}")
        self.dtype = torch.float32
        self.scale = bool(scale)

    def __call__(self, image, target):
        return TF.to_dtype(TF.to_image(image), self.dtype, scale=self.scale), target

    def __repr__(self) -> str:
        return f"ConvertPILImage(dtype=float32, scale={self.scale})"


class ConvertBoxes:
    """Boxes -> a plain float32 [N, 4] tensor of (cx, cy, w, h) / (W, H, W, H), what the loss reads (the only
    format and normalisation this code accepts). Must be the last op: later ops would not see boxes."""

    def __init__(self, fmt: str = "cxcywh", normalize: bool = True):
        if fmt != "cxcywh" or normalize is not True:
            raise ValueError(f"ConvertBoxes: only fmt='cxcywh', normalize=True is supported (the loss reads normalised "
                             f"cxcywh boxes), got fmt={fmt!r}, normalize={normalize!r}")

    def __call__(self, image, target):
        boxes = target["boxes"]
        h, w = boxes.canvas_size
        cxcywh = TF.convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.CXCYWH)
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        target = dict(target)
        target["boxes"] = cxcywh.as_subclass(torch.Tensor).to(torch.float32) / scale
        return image, target

    def __repr__(self) -> str:
        return "ConvertBoxes(fmt='cxcywh', normalize=True)"


def _uint8_image(image) -> torch.Tensor:
    image = TF.to_image(image)
    if image.dtype != torch.uint8:
        raise TypeError(f"expected an 8-bit image (PIL or uint8), got {image.dtype}: put Mosaic and MixUp before "
                        "ConvertPILImage")
    return image.as_subclass(torch.Tensor)


def _like_input(image: torch.Tensor, original):
    """The result in the input's kind: PIL stays PIL (the photometric ops are much faster on PIL)."""
    if isinstance(original, torch.Tensor):
        return tv_tensors.Image(image)
    return TF.to_pil_image(image)


def _concat_targets(parts: list[tuple[dict, torch.Tensor, float]], base: dict, canvas_hw) -> dict:
    """One target from (target, xyxy boxes on the canvas, area factor) pieces; image_id etc. from `base`."""
    out = dict(base)
    out["boxes"] = tv_tensors.BoundingBoxes(torch.cat([b for _, b, _ in parts]).reshape(-1, 4).to(torch.float32),
                                            format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=tuple(canvas_hw))
    for key in _PER_BOX_KEYS:
        if key in base:
            out[key] = torch.cat([t[key] * f if key == "area" else t[key] for t, _, f in parts])
    return out


def _xyxy_pixels(target: dict) -> torch.Tensor:
    boxes = target["boxes"]
    return TF.convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.XYXY).as_subclass(torch.Tensor)


class _NeedsSource:
    """An op that draws other images from the dataset: `source(index) -> (image, target)` un-transformed."""

    source = None
    source_len = 0

    def _draw_other(self):
        if self.source is None or self.source_len < 1:
            raise RuntimeError(f"{type(self).__name__} draws other images from the dataset: use the pipeline through "
                               "dfine.data.CocoDetection (or call bind_source(load_item, length))")
        return self.source(int(torch.randint(self.source_len, (1,)).item()))


class Mosaic(_NeedsSource):
    """Four images - this one and three drawn at random from the dataset - on one square canvas of side
    2 * output_size: each is scaled (aspect kept) to fit an output_size tile and set into its quadrant
    against the centre; then the canvas gets a random affine (rotation in +-rotation_range degrees, shift by
    up to translation_range of the side, zoom in scaling_range) with fill_value outside. Boxes follow;
    boxes left with a side under 1 px are dropped. Applied with probability `probability`."""

    def __init__(self, output_size: int = 320, rotation_range: float = 0.0, translation_range=(0.1, 0.1),
                 scaling_range=(0.5, 1.5), probability: float = 1.0, fill_value: int = 0):
        self.output_size = int(output_size)
        self.rotation_range = float(rotation_range)
        self.translation_range = tuple(float(t) for t in translation_range)
        self.scaling_range = tuple(float(s) for s in scaling_range)
        self.probability = float(probability)
        self.fill_value = fill_value
        if self.output_size < 1 or len(self.translation_range) != 2 or len(self.scaling_range) != 2:
            raise ValueError("Mosaic: output_size must be positive, translation_range and scaling_range two numbers")
        self._sanitize = SanitizeBoundingBoxes(1.0)

    def __call__(self, image, target):
        if torch.rand(1).item() >= self.probability:
            return image, target
        tiles = [(image, target)] + [self._draw_other() for _ in range(3)]
        s = self.output_size
        canvas = torch.full((3, 2 * s, 2 * s), self.fill_value, dtype=torch.uint8)
        parts = []
        for k, (img, tgt) in enumerate(tiles):
            pixels = _uint8_image(img)
            h, w = pixels.shape[-2:]
            f = s / max(h, w)
            th, tw = max(1, round(h * f)), max(1, round(w * f))
            pixels = TF.resize(pixels, [th, tw], antialias=True)
            # quadrants: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right, each touching the centre
            x0 = s - tw if k in (0, 2) else s
            y0 = s - th if k in (0, 1) else s
            canvas[:, y0:y0 + th, x0:x0 + tw] = pixels
            boxes = _xyxy_pixels(tgt) * torch.tensor([tw / w, th / h, tw / w, th / h]) + torch.tensor([x0, y0, x0, y0])
            parts.append((tgt, boxes, (tw / w) * (th / h)))
        mosaic = _concat_targets(parts, target, (2 * s, 2 * s))
        angle = (torch.rand(1).item() * 2 - 1) * self.rotation_range
        tx = round((torch.rand(1).item() * 2 - 1) * self.translation_range[0] * 2 * s)
        ty = round((torch.rand(1).item() * 2 - 1) * self.translation_range[1] * 2 * s)
        zoom = self.scaling_range[0] + torch.rand(1).item() * (self.scaling_range[1] - self.scaling_range[0])
        affine = dict(angle=angle, translate=[tx, ty], scale=zoom, shear=[0.0, 0.0])
        canvas = TF.affine(tv_tensors.Image(canvas), **affine, interpolation=v2.InterpolationMode.NEAREST,
                           fill=self.fill_value)
        boxes = TF.clamp_bounding_boxes(TF.affine(mosaic["boxes"], **affine))
        mosaic["boxes"] = boxes
        if "area" in mosaic:
            mosaic["area"] = mosaic["area"] * zoom ** 2
        canvas, mosaic = self._sanitize(canvas, mosaic)
        return _like_input(canvas.as_subclass(torch.Tensor), image), mosaic

    def __repr__(self) -> str:
        return (f"Mosaic(output_size={self.output_size}, rotation_range={self.rotation_range}, translation_range="
                f"{list(self.translation_range)}, scaling_range={list(self.scaling_range)}, "
                f"probability={self.probability}, fill_value={self.fill_value})")


class MixUp(_NeedsSource):
    """With probability `probability`, blend this image with one drawn at random from the dataset (resized to
    this image's size): r * this + (1 - r) * other, r uniform in ratio_range. The target is the union of both
    images' boxes, labels, areas and iscrowd flags."""

    def __init__(self, probability: float = 0.5, ratio_range=(0.45, 0.55)):
        self.probability = float(probability)
        self.ratio_range = tuple(float(r) for r in ratio_range)
        if len(self.ratio_range) != 2 or not 0.0 <= self.ratio_range[0] <= self.ratio_range[1] <= 1.0:
            raise ValueError(f"MixUp: ratio_range must be two numbers 0 <= lo <= hi <= 1, got {list(ratio_range)}")

    def __call__(self, image, target):
        if torch.rand(1).item() >= self.probability:
            return image, target
        other_image, other_target = self._draw_other()
        ratio = self.ratio_range[0] + torch.rand(1).item() * (self.ratio_range[1] - self.ratio_range[0])
        pixels = _uint8_image(image)
        h, w = pixels.shape[-2:]
        other = _uint8_image(other_image)
        oh, ow = other.shape[-2:]
        if (oh, ow) != (h, w):
            other = TF.resize(other, [h, w], antialias=True)
        mixed = (ratio * pixels.to(torch.float32) + (1 - ratio) * other.to(torch.float32)).round().clamp(0, 255)
        sx, sy = w / ow, h / oh
        other_boxes = _xyxy_pixels(other_target) * torch.tensor([sx, sy, sx, sy])
        out = _concat_targets([(target, _xyxy_pixels(target), 1.0), (other_target, other_boxes, sx * sy)], target, (h, w))
        return _like_input(mixed.to(torch.uint8), image), out

    def __repr__(self) -> str:
        return f"MixUp(probability={self.probability}, ratio_range={list(self.ratio_range)})"


# type -> constructor; parameters are the constructor's keyword arguments (dfine.config.schema declares
# the same ones, tests/data/test_transform_ops.py checks that they agree)
OPS = {
    "RandomPhotometricDistort": v2.RandomPhotometricDistort,
    "RandomZoomOut": v2.RandomZoomOut,
    "RandomIoUCrop": RandomIoUCrop,
    "SanitizeBoundingBoxes": SanitizeBoundingBoxes,
    "RandomHorizontalFlip": v2.RandomHorizontalFlip,
    "Resize": Resize,
    "RandomCrop": v2.RandomCrop,
    "Normalize": v2.Normalize,
    "EmptyTransform": EmptyTransform,
    "ConvertPILImage": ConvertPILImage,
    "ConvertBoxes": ConvertBoxes,
    "Mosaic": Mosaic,
    "MixUp": MixUp,
}
# ops that need the 8-bit image (before ConvertPILImage) or the float one (after it)
_BEFORE_CONVERSION = ("Mosaic", "MixUp")
_AFTER_CONVERSION = ("Normalize",)


def op_parameters(op_type: str) -> dict:
    """{parameter: default (inspect.Parameter.empty when required)} of an op type."""
    params = inspect.signature(OPS[op_type]).parameters
    return {name: p.default for name, p in params.items() if name != "self"}


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def build_op(spec: dict, where: str = "ops[0]"):
    """One op from ``{type: NAME, param: value, ...}``; a ValueError names `where`, the op and the parameter."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"{where}: expected a mapping with a 'type', got {spec!r}")
    op_type = spec["type"]
    if op_type not in OPS:
        raise ValueError(f"{where}.type: unknown transform op {op_type!r}; known: {', '.join(OPS)}")
    known = op_parameters(op_type)
    params = {k: v for k, v in spec.items() if k != "type"}
    for name in params:
        if name not in known:
            raise ValueError(f"{where}.{name}: {op_type} has no parameter {name!r} (parameters: {', '.join(known)})")
    missing = [n for n, d in known.items() if d is inspect.Parameter.empty and n not in params]
    if missing:
        raise ValueError(f"{where}: {op_type} needs the parameter(s) {', '.join(missing)}")
    if op_type != "Resize":  # sequences as tuples, as torchvision writes its defaults
        params = {k: _tuples(v) for k, v in params.items()}
    try:
        return op_type, OPS[op_type](**params)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {op_type}({', '.join(f'{k}={v!r}' for k, v in params.items())}) refused: {err}") from None


def check_op_order(types: list[str], where: str = "ops") -> None:
    """ConvertBoxes last; Mosaic / MixUp on the 8-bit image, Normalize on the float one."""
    convert = types.index("ConvertPILImage") if "ConvertPILImage" in types else len(types)
    for i, op_type in enumerate(types):
        if op_type == "ConvertBoxes" and i != len(types) - 1:
            raise ValueError(f"{where}[{i}]: ConvertBoxes must be the last op (the ops after it would not see the "
                             f"boxes), but {types[i + 1]} follows")
        if op_type in _BEFORE_CONVERSION and i > convert:
            raise ValueError(f"{where}[{i}]: {op_type} must come before ConvertPILImage (it mixes 8-bit images)")
        if op_type in _AFTER_CONVERSION and i < convert:
            raise ValueError(f"{where}[{i}]: {op_type} must come after ConvertPILImage (it needs the float image)")


class DetectionTransforms:
    """Callable (image, target) -> (image, target) running an `ops` list (default: the published train or
    val pipeline at `image_size`).

    stop_epoch: from this epoch on the ops whose type is in `policy_ops` are skipped (None: never).
    """

    def __init__(self, image_size=640, train: bool = True, stop_epoch: int | None = None, policy_ops=POLICY_OPS,
                 ops: list[dict] | None = None):
        self.train = train
        self.stop_epoch = stop_epoch
        self.policy_ops = tuple(policy_ops or ())
        self.specs = [dict(op) for op in (ops if ops is not None else default_ops(image_size, train))]
        self.ops = [build_op(spec, f"ops[{i}]") for i, spec in enumerate(self.specs)]
        types = [t for t, _ in self.ops]
        check_op_order(types)
        unknown = [name for name in self.policy_ops if name not in OPS]
        if unknown:  # a known type that is not in the list is allowed (no effect), as published
            raise ValueError(f"policy.ops: unknown op type(s) {unknown}; known: {', '.join(OPS)}")
        self._epoch = SharedEpoch(0)
        self._finish_image = ConvertPILImage() if "ConvertPILImage" not in types else None
        self._finish_boxes = ConvertBoxes() if "ConvertBoxes" not in types else None

    def bind_source(self, load_item, length: int) -> None:
        """Give Mosaic / MixUp the dataset's un-transformed items: load_item(index) -> (image, target)."""
        for _, op in self.ops:
            if isinstance(op, _NeedsSource):
                op.source, op.source_len = load_item, int(length)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.set(epoch)

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def _skipping_policy_ops(self) -> bool:
        return self.train and self.stop_epoch is not None and self.epoch >= self.stop_epoch

    def active_ops(self) -> list[str]:
        """Types of the ops that run in the current epoch, in order."""
        skip = self._skipping_policy_ops()
        return [t for t, _ in self.ops if not (skip and t in self.policy_ops)]

    def __call__(self, image, target: dict):
        skip = self._skipping_policy_ops()
        for op_type, op in self.ops:
            if not (skip and op_type in self.policy_ops):
                image, target = op(image, target)
        if self._finish_image is not None and not (isinstance(image, torch.Tensor) and image.is_floating_point()):
            image, target = self._finish_image(image, target)
        if self._finish_boxes is not None and isinstance(target.get("boxes"), tv_tensors.BoundingBoxes):
            image, target = self._finish_boxes(image, target)
        return image, target

    def __repr__(self) -> str:
        kind = "train" if self.train else "val"
        return f"DetectionTransforms({kind}, stop_epoch={self.stop_epoch}, ops={self.active_ops()})"


def build_transforms(image_size=640, train: bool = True, stop_epoch: int | None = None, ops=None,
                     policy_ops=POLICY_OPS) -> DetectionTransforms:
    return DetectionTransforms(image_size=image_size, train=train, stop_epoch=stop_epoch, policy_ops=policy_ops, ops=ops)
