"""COCO-format detection datasets (images + an instances JSON) through pycocotools.

Labels. The model predicts contiguous labels 0..K-1; the JSON has arbitrary category ids. The mapping
is chosen with `category_map`:
  * "contiguous" (default, any dataset): the JSON's category ids sorted ascending -> 0..K-1;
  * "mscoco": the published COCO table, COCO's 80 ids (1..90 with 10 gaps) -> 0..79, fixed, so a
    COCO-trained head keeps its meaning even if a JSON lists fewer categories
    (the release's `remap_mscoco_category: True`);
  * "identity": label = category id (the release with `remap_mscoco_category: False`): ids must be
    non-negative and below num_classes; gaps are allowed (Objects365: ids 1..365, num_classes 366, label 0
    unused).
`label_to_category_id` / `category_id_to_label` give the two directions; the evaluator uses the first.

Annotation hygiene, counted once at construction (`dataset.stats`) and warned about:
  * iscrowd=1 annotations are dropped (as published) -> stats["crowd"];
  * boxes with w <= 0 or h <= 0 (or non-finite) are dropped -> stats["degenerate"];
  * boxes partly outside the image are CLIPPED to the image -> stats["clipped"];
    boxes entirely outside are dropped -> stats["outside"].
Clipping uses the image size found in the file at load time (the JSON's width/height for the counts).
Bad input raises: an unknown category id names the annotation id and the category id; a missing
image names its path (FileNotFoundError); a malformed JSON names the file (AnnotationFileError).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors

from dfine.data.epoch import SharedEpoch, mix_seed

# COCO 2017 category ids of the 80 detection classes (ids 1..90 minus the 10 unused ones).
_COCO_UNUSED_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
MSCOCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in _COCO_UNUSED_IDS]
MSCOCO_CATEGORY_TO_LABEL = {cid: label for label, cid in enumerate(MSCOCO_CATEGORY_IDS)}
MSCOCO_LABEL_TO_CATEGORY = {label: cid for cid, label in MSCOCO_CATEGORY_TO_LABEL.items()}

CATEGORY_MAPS = ("contiguous", "mscoco", "identity")


class AnnotationFileError(ValueError):
    """The annotation file cannot be read or lacks required fields; the message names the file."""


def _require(items, keys, what: str, ann_file: str) -> None:
    for k, item in enumerate(items):
        if not isinstance(item, dict):
            raise AnnotationFileError(f"{ann_file}: {what}[{k}] must be an object, got {type(item).__name__}")
        missing = [key for key in keys if key not in item]
        if missing:
            ident = f" (id {item['id']})" if "id" in item else ""
            raise AnnotationFileError(f"{ann_file}: {what}[{k}]{ident} lacks required key(s) {missing}")


def load_coco_json(ann_file: str) -> dict:
    """Read and check an instances JSON; every error names the file."""
    ann_file = os.fspath(ann_file)
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {ann_file}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnnotationFileError(f"{ann_file}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise AnnotationFileError(f"{ann_file}: top level must be an object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise AnnotationFileError(f"{ann_file}: top-level key {key!r} must be a list (missing or wrong type)")
    _require(data["images"], ("id", "file_name", "width", "height"), "images", ann_file)
    _require(data["annotations"], ("id", "image_id", "category_id", "bbox"), "annotations", ann_file)
    _require(data["categories"], ("id",), "categories", ann_file)
    image_ids = set()
    for img in data["images"]:
        if img["id"] in image_ids:
            raise AnnotationFileError(f"{ann_file}: duplicate image id {img['id']}")
        image_ids.add(img["id"])
    for ann in data["annotations"]:
        bbox = ann["bbox"]
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise AnnotationFileError(f"{ann_file}: annotation id {ann['id']} has bbox {bbox!r}, expected [x, y, w, h]")
        if ann["image_id"] not in image_ids:
            raise AnnotationFileError(
                f"{ann_file}: annotation id {ann['id']} refers to image_id {ann['image_id']} not in 'images'"
            )
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(bbox[2]) * float(bbox[3]))
    return data


def coco_api_from_dict(data: dict):
    """A pycocotools COCO object built from an already loaded dict, without its console chatter."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def build_category_mapping(category_ids, category_map: str = "contiguous") -> tuple[dict, dict]:
    """(category_id -> label, label -> category_id) for the ids listed in a JSON's 'categories'."""
    ids = sorted(int(c) for c in category_ids)
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate category ids in 'categories': {ids}")
    if category_map == "contiguous":
        cat_to_label = {cid: label for label, cid in enumerate(ids)}
    elif category_map == "mscoco":
        unknown = [cid for cid in ids if cid not in MSCOCO_CATEGORY_TO_LABEL]
        if unknown:
            raise ValueError(f"category_map='mscoco' but category ids {unknown} are not COCO detection ids")
        cat_to_label = dict(MSCOCO_CATEGORY_TO_LABEL)
    elif category_map == "identity":
        if ids and ids[0] < 0:
            raise ValueError(
                f"category_map='identity' needs non-negative category ids (labels = ids), got {ids[:10]}; "
                "use category_map='contiguous' to map them"
            )
        cat_to_label = {cid: cid for cid in ids}
    else:
        raise ValueError(f"category_map must be one of {CATEGORY_MAPS}, got {category_map!r}")
    return cat_to_label, {label: cid for cid, label in cat_to_label.items()}


def clean_boxes(anns: list[dict], width: float, height: float):
    """Boxes of non-crowd annotations as clipped XYXY; returns (kept annotations, boxes [N,4], counts)."""
    counts = {"crowd": 0, "degenerate": 0, "clipped": 0, "outside": 0}
    kept, boxes = [], []
    for ann in anns:
        if ann.get("iscrowd", 0):
            counts["crowd"] += 1
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            counts["degenerate"] += 1
            continue
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
        if x1 <= x0 or y1 <= y0:
            counts["outside"] += 1
            continue
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            counts["clipped"] += 1
        kept.append(ann)
        boxes.append((x0, y0, x1, y1))
    return kept, np.asarray(boxes, dtype=np.float32).reshape(-1, 4), counts


def to_rgb8(img: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of ``img``. PIL's convert("RGB") clips 16-bit grayscale ("I;16", "I") to 255 (white);
    those are scaled by 1/257 instead (65535 -> 255). 48-bit RGB PNGs already open as 8-bit RGB."""
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img, dtype=np.float64).clip(0, 65535) / 257.0
        img = Image.fromarray(np.rint(values).astype(np.uint8), mode="L")
    return img.convert("RGB")


class CocoDetection(torch.utils.data.Dataset):
    """Items are (image, target).

    Without `transforms` the image is a PIL RGB image and target holds
    boxes (tv_tensors.BoundingBoxes, XYXY, absolute pixels, canvas (h, w)), labels (int64),
    image_id (0-d int64), area (float32, the JSON's area), iscrowd (int64, all 0), orig_size ([w, h] int64).
    `transforms(image, target) -> (image, target)` is applied after that (see dfine.data.transforms).

    aug_seed: when given, random augmentations of item i in epoch e are drawn from a generator seeded by
    (aug_seed, e, i), so they do not depend on worker count, rank or resuming; otherwise they use the
    global torch RNG as torchvision does.
    """

    def __init__(
        self,
        img_folder: str,
        ann_file: str,
        transforms=None,
        category_map: str = "contiguous",
        aug_seed: int | None = None,
        warn: bool = True,
        check_files: bool = True,
    ):
        self.img_folder = os.fspath(img_folder)
        self.ann_file = os.fspath(ann_file)
        self.transforms = transforms
        self.category_map = category_map
        self.aug_seed = aug_seed
        self._epoch = SharedEpoch(0)
        data = load_coco_json(self.ann_file)
        self.coco = coco_api_from_dict(data)
        self.category_id_to_label, self.label_to_category_id = build_category_mapping(
            [c["id"] for c in data["categories"]], category_map
        )
        self.num_classes = (max(self.label_to_category_id) + 1) if self.label_to_category_id else 0
        self.category_names = {c["id"]: c.get("name", str(c["id"])) for c in data["categories"]}
        known = {c["id"] for c in data["categories"]}
        for ann in data["annotations"]:
            if ann["category_id"] not in known:
                raise ValueError(
                    f"{self.ann_file}: annotation id {ann['id']} has category_id {ann['category_id']}, "
                    f"which is not in the file's 'categories' {sorted(known)}"
                )
        self.ids = sorted(self.coco.imgs)
        self.stats = {"crowd": 0, "degenerate": 0, "clipped": 0, "outside": 0, "empty_images": 0}
        for image_id in self.ids:
            info = self.coco.imgs[image_id]
            kept, _, counts = clean_boxes(self.coco.imgToAnns.get(image_id, []), info["width"], info["height"])
            for key, n in counts.items():
                self.stats[key] += n
            self.stats["empty_images"] += int(not kept)
        self._size_mismatch_warned = False
        if hasattr(transforms, "bind_source"):  # Mosaic / MixUp draw other items of this dataset
            transforms.bind_source(self.load_item, len(self.ids))
        if check_files:  # before the first training step, not in the middle of an epoch
            self.check_image_files()
        if warn and (self.stats["degenerate"] or self.stats["outside"] or self.stats["clipped"]):
            warnings.warn(
                f"{self.ann_file}: dropped {self.stats['degenerate']} degenerate box(es) (w or h <= 0), "
                f"dropped {self.stats['outside']} box(es) entirely outside their image, "
                f"clipped {self.stats['clipped']} box(es) to the image",
                stacklevel=2,
            )

    def check_image_files(self) -> None:
        """FileNotFoundError naming how many image files of the annotation file are missing, and the first ones."""
        missing = [self.coco.imgs[i]["file_name"] for i in self.ids
                   if not os.path.isfile(os.path.join(self.img_folder, self.coco.imgs[i]["file_name"]))]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise FileNotFoundError(f"{self.ann_file}: {len(missing)} of {len(self.ids)} image files are not in "
                                    f"{self.img_folder!r}: {shown}")

    def __len__(self) -> int:
        return len(self.ids)

    # epoch: for seeded augmentation and the transforms' stop-epoch policy
    def set_epoch(self, epoch: int) -> None:
        self._epoch.set(epoch)
        if hasattr(self.transforms, "set_epoch"):
            self.transforms.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def load_image(self, image_id: int) -> Image.Image:
        path = os.path.join(self.img_folder, self.coco.imgs[image_id]["file_name"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: {path} (image_id {image_id}, from {self.ann_file})")
        with Image.open(path) as img:
            return to_rgb8(img)

    def load_target(self, image_id: int, width: int, height: int) -> dict:
        info = self.coco.imgs[image_id]
        if (info["width"], info["height"]) != (width, height) and not self._size_mismatch_warned:
            self._size_mismatch_warned = True
            warnings.warn(
                f"{self.ann_file}: image_id {image_id} is {width}x{height} on disk but "
                f"{info['width']}x{info['height']} in the JSON; boxes are clipped to the size on disk",
                stacklevel=3,
            )
        kept, boxes, _ = clean_boxes(self.coco.imgToAnns.get(image_id, []), width, height)
        labels = [self.category_id_to_label[a["category_id"]] for a in kept]
        return {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(boxes), format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=(height, width)
            ),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": torch.tensor(int(image_id), dtype=torch.int64),
            "area": torch.tensor([float(a["area"]) for a in kept], dtype=torch.float32),
            "iscrowd": torch.zeros(len(kept), dtype=torch.int64),
            "orig_size": torch.tensor([width, height], dtype=torch.int64),
        }

    def load_item(self, index: int):
        """Item `index` without transforms: (PIL RGB image, target)."""
        image_id = self.ids[index]
        image = self.load_image(image_id)
        return image, self.load_target(image_id, image.width, image.height)

    def __getitem__(self, index: int):
        image, target = self.load_item(index)
        if self.transforms is None:
            return image, target
        if self.aug_seed is None:
            return self.transforms(image, target)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.aug_seed, self.epoch, index))
            return self.transforms(image, target)
