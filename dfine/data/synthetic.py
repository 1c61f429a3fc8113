"""A built-in COCO-format detection dataset of rendered shapes, so training needs no download.

    python -m dfine.data.synthetic --out DIR [--seed 0] [--num-train 600] [--num-val 100] [--image-size 320]

writes DIR/train/*.jpg, DIR/val/*.jpg and DIR/annotations/instances_{train,val}.json
(`--format png` for lossless files; JPEG is the default because it encodes ~30x faster here).

Every object is painted from a hard (not anti-aliased) pixel mask, and its box is the extent of the
pixels it still owns after all later objects are painted, so boxes are exact and tight. A pixel
(col x, row y) covers [x, x+1) x [y, y+1); a box [x, y, w, h] therefore spans whole pixels.
Category ids are deliberately not contiguous (1, 3, 5, 7, 9) so the id <-> label mapping is exercised.
Output is a pure function of the seed: numpy's PCG64 generator, fixed-quality JPEG (or PNG) through
PIL, sorted-key JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

# (category id, name, base RGB colour); ids are odd on purpose.
CATEGORIES = [
    (1, "circle", (220, 40, 40)),
    (3, "square", (40, 190, 60)),
    (5, "triangle", (50, 80, 230)),
    (7, "cross", (235, 200, 30)),
    (9, "ring", (200, 50, 210)),
]
_SHAPE_BY_ID = {cid: name for cid, name, _ in CATEGORIES}
_COLOUR_BY_ID = {cid: colour for cid, _, colour in CATEGORIES}

MIN_OBJECTS, MAX_OBJECTS = 1, 6
# Object extent relative to a 320 px image: 24..120 px there.
MIN_REL_SIZE, MAX_REL_SIZE = 24 / 320, 120 / 320
# A painted object must keep this fraction of its own pixels visible after later objects are painted.
MIN_VISIBLE_FRACTION = 0.6
PLACEMENT_TRIALS = 30


@dataclass(frozen=True)
class ObjectSpec:
    """One object: shape by category id, centre (pixel units, continuous), size = outer diameter in px,
    rotation in radians (ignored for circle/ring), RGB fill colour."""

    category_id: int
    cx: float
    cy: float
    size: float
    angle: float
    color: tuple[int, int, int]


def _pixel_centres(height: int, width: int, y0: int = 0, x0: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Centres of the pixels of the window [y0, y0+height) x [x0, x0+width), in image coordinates."""
    xs = np.arange(x0, x0 + width, dtype=np.float64)[None, :] + 0.5
    ys = np.arange(y0, y0 + height, dtype=np.float64)[:, None] + 0.5
    return xs, ys


def _shape_inside(spec: ObjectSpec, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Boolean mask of the pixel centres (px, py) that lie inside the shape."""
    dx, dy = px - spec.cx, py - spec.cy
    r = spec.size / 2.0
    # rotate the offsets into the object's frame
    c, s = math.cos(spec.angle), math.sin(spec.angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    shape = _SHAPE_BY_ID.get(spec.category_id)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "square":
        half = r / math.sqrt(2.0)  # the rotated square fits in the diameter
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if shape == "cross":
        half = r / math.sqrt(2.0)
        arm = 0.33 * half
        inside = (np.abs(u) <= half) & (np.abs(v) <= half)
        return inside & ((np.abs(u) <= arm) | (np.abs(v) <= arm))
    if shape == "triangle":
        # equilateral triangle inscribed in the circle of radius r: inside all three edge half-planes
        inside = None
        for k in range(3):
            theta = math.pi / 2 + k * 2 * math.pi / 3  # outward normal of edge k
            half_plane = (u * math.cos(theta) + v * math.sin(theta)) <= r / 2.0
            inside = half_plane if inside is None else inside & half_plane
        return inside
    raise ValueError(f"category_id {spec.category_id} is not one of {sorted(_SHAPE_BY_ID)}")


def object_window(spec: ObjectSpec, height: int, width: int) -> tuple[int, int, int, int]:
    """Pixel window (y0, y1, x0, x1) that contains every pixel the shape can cover, clipped to the image."""
    r = spec.size / 2.0
    y0, y1 = max(0, math.floor(spec.cy - r) - 1), min(height, math.ceil(spec.cy + r) + 1)
    x0, x1 = max(0, math.floor(spec.cx - r) - 1), min(width, math.ceil(spec.cx + r) + 1)
    return y0, max(y0, y1), x0, max(x0, x1)


def object_mask(spec: ObjectSpec, height: int, width: int) -> np.ndarray:
    """Boolean [H, W] mask of the pixels whose centre lies inside the shape."""
    mask = np.zeros((height, width), dtype=bool)
    y0, y1, x0, x1 = object_window(spec, height, width)
    px, py = _pixel_centres(y1 - y0, x1 - x0, y0, x0)
    mask[y0:y1, x0:x1] = _shape_inside(spec, px, py)
    return mask


def mask_to_box(mask: np.ndarray) -> list[int] | None:
    """Tight COCO box [x, y, w, h] (whole pixels) of a boolean mask, None if it is empty."""
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    if cols.size == 0:
        return None
    x0, x1, y0, y1 = int(cols[0]), int(cols[-1]), int(rows[0]), int(rows[-1])
    return [x0, y0, x1 - x0 + 1, y1 - y0 + 1]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Greyish texture, float32 [H, W, 3]: a random linear gradient, soft blobs and pixel noise.

    The smooth part is a sum of separable (column profile x row profile x colour) terms.
    """
    px, py = _pixel_centres(height, width)
    px, py = px[0].astype(np.float32), py[:, 0].astype(np.float32)
    base = rng.uniform(70, 150, size=3)
    gx, gy = rng.uniform(-40, 40, size=(2, 3))
    cols = [np.ones_like(py), np.ones_like(py), py / height - 0.5]  # [H] profiles
    rows = [np.ones_like(px), px / width - 0.5, np.ones_like(px)]  # [W] profiles
    amps = [base, gx, gy]  # [3] colours
    for _ in range(3):
        bx, by = rng.uniform(0, width), rng.uniform(0, height)
        sigma = rng.uniform(0.1, 0.3) * max(height, width)
        cols.append(np.exp(-((py - by) ** 2) / (2 * sigma * sigma)))
        rows.append(np.exp(-((px - bx) ** 2) / (2 * sigma * sigma)))
        amps.append(rng.uniform(-30, 30, size=3))
    # explicit sum instead of a BLAS matmul: single-threaded, so bit-identical on every machine
    img = np.zeros((height, width, 3), dtype=np.float32)
    for col, row, amp in zip(cols, rows, amps):
        row_colour = (row[:, None] * amp[None, :]).astype(np.float32)  # [W, 3]
        img += col[:, None, None] * row_colour[None]
    img += rng.integers(-14, 15, size=(height, width, 3), dtype=np.int16)  # uniform pixel noise
    return img


def render_scene(
    objects: list[ObjectSpec], height: int, width: int, background: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Paint objects in order on a float RGB background; returns (uint8 image [H,W,3], owner map).

    owner[y, x] is the index of the object owning that pixel, -1 for background.
    """
    img = np.zeros((height, width, 3), np.float32) if background is None else background.astype(np.float32)
    owner = np.full((height, width), -1, dtype=np.int64)
    for i, spec in enumerate(objects):
        y0, y1, x0, x1 = object_window(spec, height, width)
        px, py = _pixel_centres(y1 - y0, x1 - x0, y0, x0)
        patch = _shape_inside(spec, px, py)
        img[y0:y1, x0:x1][patch] = spec.color
        owner[y0:y1, x0:x1][patch] = i
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8), owner


def _jittered_colour(rng: np.random.Generator, category_id: int) -> tuple[int, int, int]:
    base = np.array(_COLOUR_BY_ID[category_id], dtype=np.float64)
    return tuple(int(c) for c in np.clip(base + rng.uniform(-25, 25, size=3), 0, 255))


def random_scene(rng: np.random.Generator, height: int, width: int):
    """Sample a scene; returns (uint8 image, list of (ObjectSpec, box, area)) for the visible objects."""
    num_objects = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    short = min(height, width)
    specs: list[ObjectSpec] = []
    full_areas: list[int] = []
    visible_areas: list[int] = []
    owner = np.full((height, width), -1, dtype=np.int64)
    cat_ids = [cid for cid, _, _ in CATEGORIES]
    for _ in range(num_objects):
        category_id = int(cat_ids[int(rng.integers(len(cat_ids)))])
        color = _jittered_colour(rng, category_id)
        for _trial in range(PLACEMENT_TRIALS):
            size = float(rng.uniform(MIN_REL_SIZE, MAX_REL_SIZE) * short)
            r = size / 2
            cx = float(rng.uniform(r, width - r))
            cy = float(rng.uniform(r, height - r))
            angle = float(rng.uniform(0, 2 * math.pi))
            spec = ObjectSpec(category_id, cx, cy, size, angle, color)
            y0, y1, x0, x1 = object_window(spec, height, width)
            px, py = _pixel_centres(y1 - y0, x1 - x0, y0, x0)
            patch = _shape_inside(spec, px, py)
            area = int(patch.sum())
            if area == 0:
                continue
            # keep every earlier object mostly visible
            under = owner[y0:y1, x0:x1][patch]
            covered = np.bincount(under[under >= 0], minlength=len(specs))
            if all(visible_areas[j] - covered[j] >= MIN_VISIBLE_FRACTION * full_areas[j] for j in range(len(specs))):
                for j in range(len(specs)):
                    visible_areas[j] -= int(covered[j])
                owner[y0:y1, x0:x1][patch] = len(specs)
                specs.append(spec)
                full_areas.append(area)
                visible_areas.append(area)
                break
    image, owner = render_scene(specs, height, width, background=_background(rng, height, width))
    objects = []
    for i, spec in enumerate(specs):
        visible = owner == i
        box = mask_to_box(visible)
        if box is not None:
            objects.append((spec, box, int(visible.sum())))
    return image, objects


_SAVE_OPTIONS = {
    "jpg": {"format": "JPEG", "quality": 95, "subsampling": 0},
    "png": {"format": "PNG", "compress_level": 1},
}


def _write_split(
    out_dir: str, split: str, num_images: int, image_size: int, seed: int, split_key: int, image_format: str
):
    img_dir = os.path.join(out_dir, split)
    os.makedirs(img_dir, exist_ok=True)
    # one independent stream per (seed, split): the val split does not change when num_train changes
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, split_key])))
    images, annotations = [], []
    ann_id = 1
    for k in range(num_images):
        image_id = k + 1
        file_name = f"{image_id:06d}.{image_format}"
        image, objects = random_scene(rng, image_size, image_size)
        Image.fromarray(image).save(os.path.join(img_dir, file_name), **_SAVE_OPTIONS[image_format])
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for spec, box, area in objects:
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": spec.category_id,
                    "bbox": box,
                    "area": area,
                    "iscrowd": 0,
                }
            )
            ann_id += 1
    coco = {
        "info": {"description": f"dfine synthetic shapes, seed {seed}, split {split}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": "shape"} for cid, name, _ in CATEGORIES],
    }
    ann_path = os.path.join(out_dir, "annotations", f"instances_{split}.json")
    os.makedirs(os.path.dirname(ann_path), exist_ok=True)
    with open(ann_path, "w") as f:
        json.dump(coco, f, sort_keys=True, indent=1)
    return img_dir, ann_path


def make_synthetic_coco(
    out_dir: str,
    seed: int = 0,
    num_train: int = 600,
    num_val: int = 100,
    image_size: int = 320,
    image_format: str = "jpg",
) -> dict:
    """Write the dataset; returns the paths {train_images, train_annotations, val_images, val_annotations}."""
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    if image_format not in _SAVE_OPTIONS:
        raise ValueError(f"image_format must be one of {sorted(_SAVE_OPTIONS)}, got {image_format!r}")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train}, {num_val}")
    train_dir, train_ann = _write_split(out_dir, "train", num_train, image_size, seed, 0, image_format)
    val_dir, val_ann = _write_split(out_dir, "val", num_val, image_size, seed, 1, image_format)
    return {
        "train_images": train_dir,
        "train_annotations": train_ann,
        "val_images": val_dir,
        "val_annotations": val_ann,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--format", choices=sorted(_SAVE_OPTIONS), default="jpg", help="image file format")
    args = parser.parse_args(argv)
    paths = make_synthetic_coco(args.out, args.seed, args.num_train, args.num_val, args.image_size, args.format)
    for key, path in paths.items():
        print(f"{key}: {path}")


if __name__ == "__main__":
    main()
