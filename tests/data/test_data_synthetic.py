import json
import os

import numpy as np
import pytest
from PIL import Image

from dfine.data import synthetic as S


def _all_files(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    kwargs = dict(num_train=4, num_val=2, image_size=96)
    S.make_synthetic_coco(tmp_path / "a", seed=0, **kwargs)
    S.make_synthetic_coco(tmp_path / "b", seed=0, **kwargs)
    S.make_synthetic_coco(tmp_path / "c", seed=1, **kwargs)
    a, b, c = _all_files(tmp_path / "a"), _all_files(tmp_path / "b"), _all_files(tmp_path / "c")
    assert len(a) == 4 + 2 + 2
    assert a == b
    assert a.keys() == c.keys()
    assert a["annotations/instances_train.json"] != c["annotations/instances_train.json"]
    assert all(a[k] != c[k] for k in a if k.endswith(".jpg"))


def test_val_split_does_not_depend_on_train_size(tmp_path):
    S.make_synthetic_coco(tmp_path / "a", seed=3, num_train=2, num_val=2, image_size=64)
    S.make_synthetic_coco(tmp_path / "b", seed=3, num_train=5, num_val=2, image_size=64)
    a, b = _all_files(tmp_path / "a"), _all_files(tmp_path / "b")
    assert {k: v for k, v in a.items() if "val" in k} == {k: v for k, v in b.items() if "val" in k}


@pytest.mark.parametrize("category_id", [cid for cid, _, _ in S.CATEGORIES])
def test_single_object_box_is_the_painted_pixel_extent(category_id):
    # on a black background the painted pixels are exactly the non-zero pixels of the image
    spec = S.ObjectSpec(category_id, cx=41.3, cy=37.8, size=40.0, angle=0.4, color=(200, 120, 60))
    image, owner = S.render_scene([spec], 80, 90)
    painted = image.any(axis=-1)
    box = S.mask_to_box(owner == 0)
    ys, xs = np.nonzero(painted)
    assert box == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    # tight: every box edge row/column holds a painted pixel, and nothing is painted outside the box
    x, y, w, h = box
    assert painted[y, x : x + w].any() and painted[y + h - 1, x : x + w].any()
    assert painted[y : y + h, x].any() and painted[y : y + h, x + w - 1].any()
    assert painted.sum() == painted[y : y + h, x : x + w].sum()


def test_circle_box_matches_the_analytic_extent():
    # pixel centres within radius 10 of (50.5, 40.5): columns 40..60, rows 30..50
    spec = S.ObjectSpec(1, cx=50.5, cy=40.5, size=20.0, angle=0.0, color=(255, 0, 0))
    _, owner = S.render_scene([spec], 100, 100)
    assert S.mask_to_box(owner == 0) == [40, 30, 21, 21]
    assert int((owner == 0).sum()) == sum(
        1 for y in range(100) for x in range(100) if (x + 0.5 - 50.5) ** 2 + (y + 0.5 - 40.5) ** 2 <= 100
    )


def test_random_scene_boxes_and_areas_are_exact_for_visible_pixels():
    rng = np.random.default_rng(7)
    for _ in range(10):
        image, objects = S.random_scene(rng, 96, 96)
        assert S.MIN_OBJECTS <= len(objects) <= S.MAX_OBJECTS
        for spec, box, area in objects:
            # visible pixels of this object: inside its own shape and still carrying its colour
            visible = S.object_mask(spec, 96, 96) & (image == np.array(spec.color, dtype=np.uint8)).all(-1)
            assert box == S.mask_to_box(visible)
            assert area == int(visible.sum())
            assert area >= S.MIN_VISIBLE_FRACTION * int(S.object_mask(spec, 96, 96).sum()) - 1e-9


def test_annotation_file_contents(tmp_path):
    paths = S.make_synthetic_coco(tmp_path, seed=0, num_train=6, num_val=2, image_size=96, image_format="png")
    with open(paths["train_annotations"]) as f:
        data = json.load(f)
    assert [c["id"] for c in data["categories"]] == [1, 3, 5, 7, 9]
    assert len(data["images"]) == 6
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"]) > 0
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        assert ann["category_id"] in (1, 3, 5, 7, 9) and ann["iscrowd"] == 0
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 96 and y + h <= 96
        assert 0 < ann["area"] <= w * h
    # lossless files: an object's colour is the commonest one in its box, it touches all four box edges
    # and does not occur in the one-pixel ring around the box
    for image_info in data["images"][:3]:
        img = np.asarray(Image.open(os.path.join(paths["train_images"], image_info["file_name"])))
        assert img.shape == (96, 96, 3)
        padded = np.pad(img.astype(np.int64), ((1, 1), (1, 1), (0, 0)), constant_values=-1)
        for ann in (a for a in data["annotations"] if a["image_id"] == image_info["id"]):
            x, y, w, h = ann["bbox"]
            patch = img[y : y + h, x : x + w].reshape(-1, 3)
            colours, counts = np.unique(patch, axis=0, return_counts=True)
            colour = colours[counts.argmax()]
            in_box = (img[y : y + h, x : x + w] == colour).all(-1)
            assert in_box[0].any() and in_box[-1].any() and in_box[:, 0].any() and in_box[:, -1].any()
            ring = (padded[y : y + h + 2, x : x + w + 2] == colour).all(-1)
            ring[1:-1, 1:-1] = False
            assert not ring.any()


def test_command_line(tmp_path):
    S.main(["--out", str(tmp_path), "--num-train", "2", "--num-val", "1", "--image-size", "64", "--seed", "5"])
    assert sorted(os.listdir(tmp_path / "train")) == ["000001.jpg", "000002.jpg"]
    assert os.listdir(tmp_path / "val") == ["000001.jpg"]
    with Image.open(tmp_path / "train" / "000001.jpg") as im:
        assert im.size == (64, 64)


def test_bad_arguments():
    with pytest.raises(ValueError, match="image_size"):
        S.make_synthetic_coco("/nonexistent-never-written", image_size=8)
    with pytest.raises(ValueError, match="image_format"):
        S.make_synthetic_coco("/nonexistent-never-written", image_format="gif")
