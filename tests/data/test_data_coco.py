import json
import os
import warnings

import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from dfine.data.coco import (
    MSCOCO_CATEGORY_IDS,
    MSCOCO_CATEGORY_TO_LABEL,
    AnnotationFileError,
    CocoDetection,
    build_category_mapping,
)


def write_dataset(root, images, annotations, categories, image_size=None):
    """images: list of (id, width, height); image files are solid grey PNGs."""
    os.makedirs(root / "img", exist_ok=True)
    for image_id, w, h in images:
        Image.new("RGB", image_size or (w, h), (90, 90, 90)).save(root / "img" / f"{image_id}.png")
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": w, "height": h} for i, w, h in images],
        "annotations": annotations,
        "categories": [{"id": c, "name": f"c{c}"} for c in categories],
    }
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps(data))
    return str(root / "img"), str(ann_file)


def ann(ann_id, image_id, category_id, bbox, iscrowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": iscrowd,
            "area": bbox[2] * bbox[3]}


def test_noncontiguous_ids_map_to_sorted_labels_and_back(tmp_path):
    img, ann_file = write_dataset(
        tmp_path,
        [(1, 64, 48)],
        [ann(1, 1, 10, [1, 2, 10, 10]), ann(2, 1, 3, [5, 5, 20, 10]), ann(3, 1, 7, [0, 0, 4, 4])],
        categories=[10, 3, 7],
    )
    ds = CocoDetection(img, ann_file)
    assert ds.category_id_to_label == {3: 0, 7: 1, 10: 2}
    assert ds.label_to_category_id == {0: 3, 1: 7, 2: 10}
    assert ds.num_classes == 3
    image, target = ds[0]
    assert isinstance(image, Image.Image) and image.size == (64, 48)
    assert target["labels"].tolist() == [2, 0, 1]
    assert [ds.label_to_category_id[label] for label in target["labels"].tolist()] == [10, 3, 7]
    boxes = target["boxes"]
    assert isinstance(boxes, tv_tensors.BoundingBoxes)
    assert boxes.format == tv_tensors.BoundingBoxFormat.XYXY and tuple(boxes.canvas_size) == (48, 64)
    assert boxes.tolist() == [[1, 2, 11, 12], [5, 5, 25, 15], [0, 0, 4, 4]]
    assert target["labels"].dtype == torch.int64
    assert target["orig_size"].tolist() == [64, 48] and target["orig_size"].dtype == torch.int64
    assert int(target["image_id"]) == 1
    assert target["area"].tolist() == [100, 200, 16] and target["iscrowd"].tolist() == [0, 0, 0]


def test_mscoco_and_identity_mappings():
    assert len(MSCOCO_CATEGORY_IDS) == 80 and MSCOCO_CATEGORY_IDS[0] == 1 and MSCOCO_CATEGORY_IDS[-1] == 90
    assert 12 not in MSCOCO_CATEGORY_TO_LABEL and MSCOCO_CATEGORY_TO_LABEL[13] == 11
    to_label, to_cat = build_category_mapping([1, 90, 13], "mscoco")
    assert to_label[90] == 79 and to_cat[79] == 90 and len(to_label) == 80
    assert all(to_cat[to_label[c]] == c for c in MSCOCO_CATEGORY_IDS)
    with pytest.raises(ValueError, match=r"\[12\]"):
        build_category_mapping([1, 12], "mscoco")
    assert build_category_mapping([2, 0, 1], "identity")[0] == {0: 0, 1: 1, 2: 2}
    # the release's remap_mscoco_category: False: label = id, gaps allowed (Objects365 ids 1..365, label 0 unused)
    assert build_category_mapping([1, 3], "identity") == ({1: 1, 3: 3}, {1: 1, 3: 3})
    with pytest.raises(ValueError, match="non-negative"):
        build_category_mapping([-1, 3], "identity")
    with pytest.raises(ValueError, match="category_map"):
        build_category_mapping([1], "bogus")


def test_image_without_annotations_gives_empty_boxes(tmp_path):
    img, ann_file = write_dataset(tmp_path, [(1, 32, 32), (2, 32, 32)], [ann(1, 2, 1, [1, 1, 5, 5])], [1])
    ds = CocoDetection(img, ann_file)
    assert ds.stats["empty_images"] == 1
    _, target = ds[0]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["boxes"].dtype == torch.float32


def test_crowd_annotations_dropped_and_counted(tmp_path):
    img, ann_file = write_dataset(
        tmp_path, [(1, 40, 40)], [ann(1, 1, 1, [1, 1, 5, 5], iscrowd=1), ann(2, 1, 1, [10, 10, 5, 5])], [1]
    )
    ds = CocoDetection(img, ann_file)
    assert ds.stats["crowd"] == 1
    _, target = ds[0]
    assert target["boxes"].tolist() == [[10, 10, 15, 15]]


def test_degenerate_boxes_dropped_with_counted_warning(tmp_path):
    anns = [ann(1, 1, 1, [1, 1, 0, 5]), ann(2, 1, 1, [1, 1, 5, -2]), ann(3, 1, 1, [2, 3, 4, 5])]
    img, ann_file = write_dataset(tmp_path, [(1, 40, 40)], anns, [1])
    with pytest.warns(UserWarning, match="dropped 2 degenerate"):
        ds = CocoDetection(img, ann_file)
    assert ds.stats["degenerate"] == 2
    _, target = ds[0]
    assert target["boxes"].tolist() == [[2, 3, 6, 8]] and target["labels"].tolist() == [0]


def test_boxes_outside_the_image_are_clipped_or_dropped(tmp_path):
    anns = [ann(1, 1, 1, [-10, 5, 30, 20]), ann(2, 1, 1, [50, 40, 30, 30]), ann(3, 1, 1, [100, 100, 10, 10])]
    img, ann_file = write_dataset(tmp_path, [(1, 64, 48)], anns, [1])
    with pytest.warns(UserWarning, match="clipped 2"):
        ds = CocoDetection(img, ann_file)
    assert ds.stats["clipped"] == 2 and ds.stats["outside"] == 1
    _, target = ds[0]
    assert target["boxes"].tolist() == [[0, 5, 20, 25], [50, 40, 64, 48]]


def test_clean_dataset_emits_no_warning(tmp_path):
    img, ann_file = write_dataset(tmp_path, [(1, 40, 40)], [ann(1, 1, 1, [2, 3, 4, 5])], [1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CocoDetection(img, ann_file)


def test_unknown_category_names_annotation_and_category(tmp_path):
    img, ann_file = write_dataset(tmp_path, [(1, 40, 40)], [ann(17, 1, 1, [1, 1, 5, 5]), ann(23, 1, 4, [1, 1, 5, 5])], [1])
    with pytest.raises(ValueError, match=r"annotation id 23 has category_id 4"):
        CocoDetection(img, ann_file)


def test_missing_image_names_the_path(tmp_path):
    img, ann_file = write_dataset(tmp_path, [(1, 40, 40)], [ann(1, 1, 1, [1, 1, 5, 5])], [1])
    os.remove(os.path.join(img, "1.png"))
    with pytest.raises(FileNotFoundError, match=r"1 of 1 image files are not in .*'1\.png'"):
        CocoDetection(img, ann_file)  # found when the dataset is built, before any training step
    ds = CocoDetection(img, ann_file, check_files=False)
    with pytest.raises(FileNotFoundError, match=r"1\.png"):
        ds[0]


def test_malformed_annotation_files_name_the_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [')
    with pytest.raises(AnnotationFileError, match="broken.json"):
        CocoDetection(str(tmp_path), str(bad))
    bad.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(AnnotationFileError, match=r"broken.json.*'annotations'"):
        CocoDetection(str(tmp_path), str(bad))
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}],
                               "annotations": [{"id": 5, "image_id": 1, "category_id": 1}],
                               "categories": [{"id": 1}]}))
    with pytest.raises(AnnotationFileError, match=r"broken.json.*id 5.*bbox"):
        CocoDetection(str(tmp_path), str(bad))
    bad.write_text(json.dumps({"images": [], "annotations": [{"id": 5, "image_id": 9, "category_id": 1,
                                                              "bbox": [0, 0, 1, 1]}], "categories": [{"id": 1}]}))
    with pytest.raises(AnnotationFileError, match="image_id 9"):
        CocoDetection(str(tmp_path), str(bad))
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        CocoDetection(str(tmp_path), str(tmp_path / "nothere.json"))


def test_seeded_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    from dfine.data.transforms import DetectionTransforms

    img, ann_file = write_dataset(tmp_path, [(1, 64, 64), (2, 64, 64)],
                                  [ann(1, 1, 1, [10, 10, 30, 20]), ann(2, 2, 1, [5, 5, 20, 20])], [1])
    ds = CocoDetection(img, ann_file, transforms=DetectionTransforms(32, train=True), aug_seed=3)
    outputs = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        torch.manual_seed(100 + epoch)  # the global RNG must neither matter nor be consumed
        state = torch.get_rng_state()
        first = ds[0]
        assert torch.equal(torch.get_rng_state(), state)
        torch.manual_seed(7)
        again = ds[0]
        assert torch.equal(first[0], again[0]) and torch.equal(first[1]["boxes"], again[1]["boxes"])
        outputs.append(first[1]["boxes"])
    assert any(not torch.equal(outputs[0], o) for o in outputs[1:])


def test_package_exports_resolve():
    import dfine.data

    assert dfine.data.CocoDetection is CocoDetection
    for name in dfine.data.__all__:
        assert getattr(dfine.data, name) is not None
    with pytest.raises(AttributeError, match="no_such_name"):
        dfine.data.no_such_name
