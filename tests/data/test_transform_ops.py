"""Transform pipelines built from the config's `transforms.ops` and `policy`: the shipped configs give exactly
the pipeline that was hard-coded before (a frozen copy of that code is below), unknown ops and parameters are
errors, a changed list takes effect, and the optional Mosaic / MixUp ops on tiny synthetic data."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

import dfine
from dfine.config import ConfigError
from dfine.config.schema import PUBLISHED_POLICY_OPS, TRANSFORM_OPS
from dfine.data import CocoDetection, build_dataloader, make_synthetic_coco, set_loader_epoch
from dfine.data.collate import build_split_transforms
from dfine.data.transforms import (OPS, POLICY_OPS, DetectionTransforms, MixUp, Mosaic, default_ops, op_parameters)
from dfine.engine.data_config import check_transforms, loader_settings

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs" / "dfine").glob("*.yml")) + sorted((REPO / "configs" / "dataset").glob("*.yml"))


# ------------------------------------------------------------------------------------------------
# The train/val pipeline as dfine/data/transforms.py hard-coded it before the ops list drove it (commit a08d443):
# the same ops with the same arguments in the same order and the same final conversion; only the names carry an
# _old prefix, the epoch is a plain int and the policy-name check is left out. The reference the config-built
# pipelines must reproduce.

_OLD_POLICY_OPS = ("photometric_distort", "zoom_out", "iou_crop")
_PER_BOX_KEYS = ("labels", "area", "iscrowd")


def _old_per_box_entries(inputs):
    target = inputs[1] if isinstance(inputs, (tuple, list)) and len(inputs) == 2 else inputs
    return tuple(target[k] for k in _PER_BOX_KEYS if k in target)


def _old_boxes_of(inputs):
    for item in inputs:
        if isinstance(item, dict) and isinstance(item.get("boxes"), tv_tensors.BoundingBoxes):
            return item["boxes"]
    return None


class _OldRandomIoUCropWithP(v2.Transform):
    def __init__(self, p: float = 0.8, **iou_crop_kwargs):
        super().__init__()
        self.p = p
        self.crop = v2.RandomIoUCrop(**iou_crop_kwargs)

    def forward(self, *inputs):
        inputs = inputs if len(inputs) > 1 else inputs[0]
        boxes = _old_boxes_of(inputs if isinstance(inputs, (tuple, list)) else (inputs,))
        if boxes is None or boxes.shape[0] == 0 or torch.rand(1).item() >= self.p:
            return inputs
        return self.crop(inputs)


def _old_sanitize(min_size: float = 1.0):
    return v2.SanitizeBoundingBoxes(min_size=min_size, labels_getter=_old_per_box_entries)


def _old_as_size(image_size):
    if isinstance(image_size, int):
        return (image_size, image_size)
    h, w = image_size
    return (int(h), int(w))


def _old_to_model_input(image, target):
    image = v2.functional.to_dtype(v2.functional.to_image(image), torch.float32, scale=True)
    boxes = target["boxes"]
    h, w = boxes.canvas_size
    cxcywh = v2.functional.convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.CXCYWH)
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    target = dict(target)
    target["boxes"] = cxcywh.as_subclass(torch.Tensor).to(torch.float32) / scale
    return image, target


class _OldDetectionTransforms:
    def __init__(self, image_size=640, train=True, stop_epoch=None, policy_ops=_OLD_POLICY_OPS):
        self.image_size = _old_as_size(image_size)
        self.train = train
        self.stop_epoch = stop_epoch
        self.policy_ops = tuple(policy_ops)
        self.epoch = 0
        if train:
            self.ops = [
                ("photometric_distort", v2.RandomPhotometricDistort(p=0.5)),
                ("zoom_out", v2.RandomZoomOut(fill=0)),
                ("iou_crop", _OldRandomIoUCropWithP(p=0.8)),
                ("sanitize", _old_sanitize(1.0)),
                ("flip", v2.RandomHorizontalFlip()),
                ("resize", v2.Resize(list(self.image_size))),
                ("sanitize_after_resize", _old_sanitize(1.0)),
            ]
        else:
            self.ops = [("resize", v2.Resize(list(self.image_size)))]

    def set_epoch(self, epoch):
        self.epoch = epoch

    def active_ops(self):
        skip = self.train and self.stop_epoch is not None and self.epoch >= self.stop_epoch
        return [name for name, _ in self.ops if not (skip and name in self.policy_ops)]

    def __call__(self, image, target):
        active = set(self.active_ops())
        for name, op in self.ops:
            if name in active:
                image, target = op(image, target)
        return _old_to_model_input(image, target)

# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("ops"), seed=1, num_train=6, num_val=2, image_size=96,
                               image_format="png")


@pytest.fixture(scope="module")
def raw_items(synthetic):
    ds = CocoDetection(synthetic["train_images"], synthetic["train_annotations"], warn=False)
    items = [ds.load_item(i) for i in range(4)]
    image, target = items[0]
    empty = {k: (v[:0] if k in _PER_BOX_KEYS else v) for k, v in target.items()}
    empty["boxes"] = tv_tensors.wrap(target["boxes"][:0], like=target["boxes"])
    return items + [(image, empty)]


def _copy(target):
    return {k: v.clone() for k, v in target.items()}


def assert_same_output(got, want, what):
    (gi, gt), (wi, wt) = got, want
    assert type(gi) is type(wi) and gi.dtype == wi.dtype and torch.equal(gi, wi), f"{what}: image differs"
    assert sorted(gt) == sorted(wt), what
    for key in wt:
        assert type(gt[key]) is type(wt[key]) and gt[key].dtype == wt[key].dtype, f"{what}: {key}"
        assert torch.equal(gt[key], wt[key]), f"{what}: {key} differs"


_OLD_NAME_TO_TYPE = {"photometric_distort": "RandomPhotometricDistort", "zoom_out": "RandomZoomOut",
                     "iou_crop": "RandomIoUCrop", "sanitize": "SanitizeBoundingBoxes", "flip": "RandomHorizontalFlip",
                     "resize": "Resize", "sanitize_after_resize": "SanitizeBoundingBoxes"}
_CONVERSIONS = ("ConvertPILImage", "ConvertBoxes")


def _compare(new, old, items, seeds, epochs, what):
    """Same images, boxes, labels, areas (and the same use of the random stream) from both, item by item."""
    for epoch in epochs:
        new.set_epoch(epoch)
        old.set_epoch(epoch)
        assert [t for t in new.active_ops() if t not in _CONVERSIONS] == [_OLD_NAME_TO_TYPE[n] for n in old.active_ops()]
        for seed in seeds:
            for n, (image, target) in enumerate(items):
                torch.manual_seed(seed)
                want = old(image, _copy(target))
                want_rng = torch.get_rng_state()
                torch.manual_seed(seed)
                got = new(image, _copy(target))
                assert_same_output(got, want, f"{what} epoch {epoch} seed {seed} item {n}")
                assert torch.equal(torch.get_rng_state(), want_rng), f"{what}: the random stream is used differently"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_build_exactly_the_old_pipeline(path, raw_items):
    """Every shipped config, through the settings the trainer builds its loaders from. (The random
    IoU crop costs ~50 ms a call on a busy CPU, so few samples here; more in the next test.)"""
    cfg = dfine.load_config(path)
    for split in ("train", "val"):
        settings = loader_settings(cfg, split)
        train = split == "train"
        new = build_split_transforms(settings)
        stop = settings.get("policy_epoch")
        old = _OldDetectionTransforms(settings["image_size"], train=train, stop_epoch=stop)
        epochs = ([0] if stop is None else [stop - 1, stop]) if train else [0]
        _compare(new, old, [raw_items[0], raw_items[-1]], range(2) if train else [0], epochs, f"{path.name} {split}")


def test_the_config_built_pipeline_matches_over_many_draws(raw_items):
    cfg = dfine.load_config(REPO / "configs/dfine/dfine_hgnetv2_n_synthetic.yml", ["eval_spatial_size=[64, 64]"] + [
        f"{k}.dataset.transforms.ops=" + str(default_ops(64, k == "train_dataloader")).replace("'", "")
        for k in ("train_dataloader", "val_dataloader")])
    for split in ("train", "val"):
        settings = loader_settings(cfg, split)
        new = build_split_transforms(settings)
        old = _OldDetectionTransforms(64, train=split == "train", stop_epoch=settings.get("policy_epoch"))
        changed = 0
        for seed in range(3):
            _compare(new, old, raw_items, [seed], [0], split)
            torch.manual_seed(seed)
            changed += sum(not torch.equal(new(*item)[0], new(*item)[0]) for item in raw_items[:2])
        if split == "train":  # the draws covered random augmentations, not only resizing
            assert changed > 0


def test_the_dataset_path_gives_the_old_items(synthetic):
    """build_dataloader (seeded per item) with the synthetic config's list equals CocoDetection with the old code."""
    cfg = dfine.load_config(REPO / "configs/dfine/dfine_hgnetv2_n_synthetic.yml", [
        f"train_dataloader.dataset.img_folder={synthetic['train_images']}",
        f"train_dataloader.dataset.ann_file={synthetic['train_annotations']}",
        "train_dataloader.dataset.transforms.policy.epoch=2", "train_dataloader.collate_fn.stop_epoch=2"])
    settings = loader_settings(cfg, "train", seed=5)
    new = build_dataloader(settings).dataset
    old = CocoDetection(synthetic["train_images"], synthetic["train_annotations"], warn=False, aug_seed=5,
                        transforms=_OldDetectionTransforms(settings["image_size"], True, stop_epoch=2))
    for epoch in (1, 2):  # policy ops on, off
        new.set_epoch(epoch)
        old.set_epoch(epoch)
        for i in range(len(new)):
            assert_same_output(new[i], old[i], f"epoch {epoch} item {i}")


def test_default_lists_are_the_published_ones():
    assert [op["type"] for op in default_ops(320, True)] == [
        "RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop", "SanitizeBoundingBoxes", "RandomHorizontalFlip",
        "Resize", "SanitizeBoundingBoxes", "ConvertPILImage", "ConvertBoxes"]
    assert default_ops([320, 480], False)[0] == {"type": "Resize", "size": [320, 480]}
    assert POLICY_OPS == PUBLISHED_POLICY_OPS
    for path in SHIPPED:  # Mosaic and MixUp are off in every shipped config
        ops = dfine.load_config(path)["train_dataloader"]["dataset"]["transforms"]["ops"] or []
        assert not {"Mosaic", "MixUp"} & {op["type"] for op in ops}, path.name


def test_schema_declares_each_ops_constructor_parameters():
    assert list(TRANSFORM_OPS) == list(OPS)
    for op_type, section in TRANSFORM_OPS.items():
        params = op_parameters(op_type)
        assert list(section.keys) == list(params), op_type
        for name, key in section.keys.items():
            default = params[name]
            if default is __import__("inspect").Parameter.empty:
                assert key.default is None and not key.nullable, f"{op_type}.{name} is required"
            else:
                want = list(default) if isinstance(default, tuple) else default
                assert key.default == want, f"{op_type}.{name}: schema {key.default!r}, constructor {default!r}"


# ------------------------------------------------------------------------------------------------
# errors

KEY = "train_dataloader.dataset.transforms.ops"
N_CFG = REPO / "configs/dfine/dfine_hgnetv2_n_coco.yml"


@pytest.mark.parametrize("ops, where, words", [
    ("[{type: RandomBlur}]", "ops[0].type", ["unknown transform op 'RandomBlur'", "known: RandomPhotometricDistort"]),
    ("[{type: Resize, size: 64}, {type: RandomZoomOut, fil: 0}]", "ops[1].fil",
     ["RandomZoomOut has no parameter 'fil'", "did you mean 'fill'", "side_range"]),
    ("[{type: RandomHorizontalFlip, p: high}]", "ops[0].p", ["expected a number"]),
    ("[{type: Resize}]", "ops[0]", ["Resize needs the parameter 'size'"]),
    ("[{type: ConvertBoxes, fmt: xyxy}]", "ops[0].fmt", ["'xyxy' is not supported"]),
    ("[RandomHorizontalFlip]", "ops[0]", ["expected a mapping with a 'type'"]),
])
def test_unknown_ops_and_parameters_name_the_op_and_the_key(ops, where, words):
    with pytest.raises(ConfigError) as err:
        dfine.load_config(N_CFG, [f"{KEY}={ops}"])
    msg = str(err.value)
    assert msg.startswith(f"config key '{KEY[:-4]}.{where}' in the -u override"), msg
    for word in words:
        assert word in msg, msg


def test_an_unknown_op_in_a_file_names_the_file(tmp_path):
    own = tmp_path / "mine.yml"
    own.write_text(f"__include__: ['{N_CFG}']\nval_dataloader:\n  dataset:\n    transforms:\n"
                   "      ops: [{type: Resize, size: [64, 64]}, {type: Normalise, mean: [0.5], std: [0.5]}]\n")
    with pytest.raises(ConfigError, match=r"'val_dataloader.dataset.transforms.ops\[1\].type' in .*mine\.yml: "
                                          r"unknown transform op 'Normalise' \(did you mean 'Normalize'\?\)"):
        dfine.load_config(own)


@pytest.mark.parametrize("ops, words", [
    ("[{type: ConvertBoxes}, {type: Resize, size: 64}]", ["ops[0]'", "ConvertBoxes must be the last op"]),
    ("[{type: ConvertPILImage}, {type: Mosaic}]", ["ops[1]'", "Mosaic must come before ConvertPILImage"]),
    ("[{type: Normalize, mean: [0.5], std: [0.5]}]", ["ops[0]'", "Normalize must come after ConvertPILImage"]),
    ("[{type: Mosaic, translation_range: [0.1, 0.1, 0.1]}]", ["ops[0].translation_range'", "expected 2 values"]),
    ("[{type: MixUp, ratio_range: [0.7, 0.2]}]", ["ops[0]'", "MixUp", "refused", "0 <= lo <= hi <= 1"]),
])
def test_what_only_the_builder_sees_is_a_config_error_before_training(ops, words):
    try:
        cfg = dfine.load_config(N_CFG, [f"{KEY}={ops}"])
    except ConfigError as err:  # load_config already knows
        msg = str(err)
    else:
        with pytest.raises(ConfigError) as err:
            check_transforms(cfg)
        msg = str(err.value)
    assert msg.startswith(f"config key '{KEY}"), msg
    for word in words:
        assert word in msg, msg


def test_the_data_layer_names_bad_ops_too():
    with pytest.raises(ValueError, match=r"ops\[1\].type: unknown transform op 'Blur'"):
        DetectionTransforms(ops=[{"type": "Resize", "size": 8}, {"type": "Blur"}])
    with pytest.raises(ValueError, match=r"ops\[0\].q: RandomHorizontalFlip has no parameter 'q' \(parameters: p\)"):
        DetectionTransforms(ops=[{"type": "RandomHorizontalFlip", "q": 1}])
    with pytest.raises(ValueError, match=r"policy.ops: unknown op type\(s\) \['Flip'\]"):
        DetectionTransforms(ops=[{"type": "RandomHorizontalFlip"}], policy_ops=["Flip"])
    with pytest.raises(RuntimeError, match="Mosaic draws other images from the dataset"):
        DetectionTransforms(ops=[{"type": "Mosaic"}])(*_rect_item(64, 64, [(0, 0, 16, 16)], 0))


# ------------------------------------------------------------------------------------------------
# a changed list takes effect


def test_edits_to_the_list_and_the_policy_take_effect(raw_items):
    image, target = raw_items[0]
    plain = DetectionTransforms(ops=[{"type": "Resize", "size": [64, 64]}], train=False)(image, _copy(target))
    # an op with p: 0 does nothing; with p: 1 it always acts; the policy switches a listed type off
    never = DetectionTransforms(ops=[{"type": "RandomPhotometricDistort", "p": 0.0}, {"type": "Resize", "size": 64}])
    always = DetectionTransforms(ops=[{"type": "RandomHorizontalFlip", "p": 1.0}, {"type": "Resize", "size": [64, 64]}],
                                 stop_epoch=2, policy_ops=["RandomHorizontalFlip"])
    for seed in range(5):
        torch.manual_seed(seed)
        assert_same_output(never(image, _copy(target)), plain, "p: 0")
        torch.manual_seed(seed)
        flipped = always(image, _copy(target))
        assert torch.equal(flipped[0], plain[0].flip(-1))
        cx = flipped[1]["boxes"][:, 0]
        assert torch.allclose(cx, 1 - plain[1]["boxes"][:, 0], atol=1e-6)
    always.set_epoch(2)
    assert always.active_ops() == ["Resize"]
    assert_same_output(always(image, _copy(target)), plain, "policy off")
    # dropping RandomIoUCrop from the published list removes it; adding RandomCrop adds it
    ops = [op for op in default_ops(64) if op["type"] != "RandomIoUCrop"]
    ops.insert(4, {"type": "RandomCrop", "size": [48, 48], "pad_if_needed": True})
    tr = DetectionTransforms(ops=ops)
    assert "RandomIoUCrop" not in tr.active_ops() and "RandomCrop" in tr.active_ops()
    out_image, out = tr(image, _copy(target))
    assert out_image.shape == (3, 64, 64) and ((out["boxes"] >= 0) & (out["boxes"] <= 1)).all()


# ------------------------------------------------------------------------------------------------
# Mosaic and MixUp on tiny synthetic images: black, with solid rectangles of one colour per label

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (255, 255, 255),
           (255, 128, 0)]


def _rect_item(width, height, rects, first_label, image_id=0):
    """A PIL image and its target; rect k (xyxy, even coordinates) has label first_label + k and its colour."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    for k, (x0, y0, x1, y1) in enumerate(rects):
        pixels[y0:y1, x0:x1] = COLOURS[first_label + k]
    boxes = torch.tensor(rects, dtype=torch.float32).reshape(-1, 4)
    return Image.fromarray(pixels), {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
        "labels": torch.arange(first_label, first_label + len(rects)),
        "image_id": torch.tensor(image_id),
        "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
        "iscrowd": torch.zeros(len(rects), dtype=torch.int64),
        "orig_size": torch.tensor([width, height]),
    }


# four source images, max side 64 (tiles of 32 halve them), 8 objects with distinct colours
SOURCE = [
    _rect_item(64, 64, [(4, 6, 28, 30), (36, 40, 60, 58)], 0, 0),
    _rect_item(64, 48, [(10, 10, 50, 40)], 2, 1),
    _rect_item(48, 64, [(2, 2, 22, 22), (26, 30, 46, 60)], 3, 2),
    _rect_item(64, 64, [(20, 8, 44, 56), (48, 48, 62, 62), (2, 50, 14, 62)], 5, 3),
]


def _bound(op):
    op.source, op.source_len = (lambda i: (SOURCE[i][0], _copy(SOURCE[i][1]))), len(SOURCE)
    return op


def _bound_to_the_other_three(op):
    """Whatever index it draws, the op gets SOURCE[1], [2], [3] in turn: with SOURCE[0] as the image, every
    colour appears once per mosaic."""
    calls = iter(range(10**6))
    op.source, op.source_len = (lambda i: (lambda k: (SOURCE[k][0], _copy(SOURCE[k][1])))(1 + next(calls) % 3)), 4
    return op


def _colour_extent(pixels: torch.Tensor, label: int):
    """xyxy extent of the pixels of a label's colour (the edges that resizing blends with black do not count), or None."""
    colour = torch.tensor(COLOURS[label]).view(3, 1, 1)
    mask = (pixels.to(torch.int32) - colour).abs().amax(0) <= 40
    if mask.sum() < 2:
        return None
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def _pixels(image):
    return v2.functional.to_image(image).as_subclass(torch.Tensor)


def test_mosaic_boxes_stay_on_the_canvas_and_on_their_pixels():
    mosaic = _bound_to_the_other_three(Mosaic(output_size=32, probability=1.0))
    kept = 0
    for seed in range(20):
        torch.manual_seed(seed)
        image, target = mosaic(SOURCE[0][0], _copy(SOURCE[0][1]))
        pixels = _pixels(image)
        assert pixels.shape == (3, 64, 64) and isinstance(image, Image.Image)
        boxes = target["boxes"]
        assert boxes.canvas_size == (64, 64) and boxes.format == tv_tensors.BoundingBoxFormat.XYXY
        assert ((boxes >= 0) & (boxes <= 64)).all() and (boxes[:, 2:] - boxes[:, :2] >= 1).all()
        n = boxes.shape[0]
        assert target["labels"].shape == target["area"].shape == target["iscrowd"].shape == (n,)
        assert target["image_id"] == SOURCE[0][1]["image_id"]
        for box, label in zip(boxes.tolist(), target["labels"].tolist()):
            extent = _colour_extent(pixels, label)
            assert extent is not None, f"seed {seed}: label {label} has a box but no pixels"
            assert box == pytest.approx(extent, abs=2.5), f"seed {seed}: label {label}"
            kept += 1
        for label in set(range(8)) - set(target["labels"].tolist()):  # a dropped object left (almost) no pixels
            extent = _colour_extent(pixels, label)
            assert extent is None or min(extent[2] - extent[0], extent[3] - extent[1]) <= 2.5, f"seed {seed}: {label}"
    assert kept >= 60  # most of the 4 x ~2 objects per mosaic stay in view


def test_mosaic_tiles_meet_at_the_centre_without_the_affine():
    mosaic = _bound_to_the_other_three(Mosaic(output_size=32, translation_range=[0, 0], scaling_range=[1, 1]))
    torch.manual_seed(0)
    image, target = mosaic(SOURCE[0][0], _copy(SOURCE[0][1]))
    boxes = dict(zip(target["labels"].tolist(), target["boxes"].tolist()))
    # tile 0 (top-left, 64x64 -> 32x32 at (0, 0)): rect (4, 6, 28, 30) -> (2, 3, 14, 15)
    assert boxes[0] == pytest.approx([2, 3, 14, 15])
    assert target["area"][0] == pytest.approx(24 * 24 / 4)
    pixels = _pixels(image)
    for label, box in boxes.items():
        assert box == pytest.approx(_colour_extent(pixels, label), abs=1.0), label


def test_mosaic_rotation_keeps_the_pixels_inside_their_boxes():
    mosaic = _bound_to_the_other_three(Mosaic(output_size=32, rotation_range=20))
    for seed in range(8):
        torch.manual_seed(seed)
        image, target = mosaic(SOURCE[0][0], _copy(SOURCE[0][1]))
        pixels = _pixels(image)
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            extent = _colour_extent(pixels, label)
            assert extent is not None
            assert extent[0] >= box[0] - 1.5 and extent[1] >= box[1] - 1.5
            assert extent[2] <= box[2] + 1.5 and extent[3] <= box[3] + 1.5


@pytest.mark.parametrize("op", [Mosaic(output_size=32, probability=0.3), MixUp(probability=0.3)],
                         ids=["Mosaic", "MixUp"])
def test_probability_is_respected_and_the_result_is_seeded(op):
    _bound(op)
    image, target = SOURCE[0]
    applied = 0
    for seed in range(120):
        torch.manual_seed(seed)
        out_image, out = op(image, _copy(target))
        if out_image is image:
            assert torch.equal(out["boxes"], target["boxes"])
        else:
            applied += 1
    assert 0.3 - 0.1 < applied / 120 < 0.3 + 0.1
    results = []
    for _ in range(2):
        torch.manual_seed(7)
        op.probability = 1.0
        results.append(op(image, _copy(target)))
    op.probability = 0.3
    assert torch.equal(_pixels(results[0][0]), _pixels(results[1][0]))
    assert torch.equal(results[0][1]["boxes"], results[1][1]["boxes"])
    torch.manual_seed(8)
    other = op(image, _copy(target))
    assert not (torch.equal(_pixels(other[0]), _pixels(results[0][0]))
                and torch.equal(other[1]["boxes"], results[0][1]["boxes"]))


def test_mixup_blends_two_images_and_keeps_both_sets_of_boxes():
    mixup = MixUp(probability=1.0, ratio_range=[0.4, 0.6])
    this = _rect_item(40, 30, [(8, 6, 24, 20)], 0)  # red
    partner = _rect_item(80, 60, [(40, 20, 72, 50)], 1)  # green, halved onto this image's 40x30 canvas
    mixup.source, mixup.source_len = (lambda i: (partner[0], _copy(partner[1]))), 1
    for seed in range(5):
        torch.manual_seed(seed)
        image, target = mixup(this[0], _copy(this[1]))
        torch.manual_seed(seed)  # the op draws: apply?, which partner, ratio
        torch.rand(1), torch.randint(1, (1,))
        ratio = 0.4 + torch.rand(1).item() * 0.2
        assert target["labels"].tolist() == [0, 1]
        assert target["boxes"].tolist() == [[8, 6, 24, 20], [20, 10, 36, 25]]
        assert target["boxes"].canvas_size == (30, 40)
        assert target["area"].tolist() == pytest.approx([16 * 14, 32 * 30 / 4])
        pixels = _pixels(image).to(torch.int32)
        assert pixels[0, 12, 12].item() == round(ratio * 255) and pixels[1, 12, 12].item() == 0
        assert pixels[1, 18, 30].item() == round((1 - ratio) * 255) and pixels[0, 18, 30].item() == 0
        red = torch.nonzero(pixels[0] > ratio * 255 / 2, as_tuple=True)
        green = torch.nonzero(pixels[1] > (1 - ratio) * 255 / 2, as_tuple=True)
        assert [red[1].min(), red[0].min(), red[1].max() + 1, red[0].max() + 1] == [8, 6, 24, 20]
        assert [v.item() for v in (green[1].min(), green[0].min(), green[1].max() + 1, green[0].max() + 1)] == \
            pytest.approx([20, 10, 36, 25], abs=1)


def test_mosaic_and_mixup_from_a_config_through_the_loader(synthetic):
    ops = ("[{type: Mosaic, output_size: 48, probability: 1.0}, {type: MixUp, probability: 0.5}, "
           "{type: RandomHorizontalFlip}, {type: Resize, size: [64, 64]}, {type: SanitizeBoundingBoxes, min_size: 1}, "
           "{type: ConvertPILImage, dtype: float32, scale: True}, {type: ConvertBoxes, fmt: cxcywh, normalize: True}]")
    cfg = dfine.load_config(REPO / "configs/dfine/dfine_hgnetv2_n_synthetic.yml", [
        f"train_dataloader.dataset.img_folder={synthetic['train_images']}",
        f"train_dataloader.dataset.ann_file={synthetic['train_annotations']}", f"{KEY}={ops}",
        "train_dataloader.dataset.transforms.policy.ops=[Mosaic, MixUp]", "train_dataloader.total_batch_size=3"])
    check_transforms(cfg)
    settings = loader_settings(cfg, "train", seed=2)
    assert settings["policy_ops"] == ["Mosaic", "MixUp"]
    runs = []
    for _ in range(2):
        loader = build_dataloader(settings)
        set_loader_epoch(loader, 0)
        runs.append(list(loader))
    assert len(runs[0]) == 2
    counts = []
    for (images, targets), (images2, targets2) in zip(*runs):
        assert images.shape == (3, 3, 64, 64) and torch.equal(images, images2)  # seeded per item
        for t, t2 in zip(targets, targets2):
            assert torch.equal(t["boxes"], t2["boxes"]) and ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()
            counts.append(len(t["labels"]))
    originals = [len(CocoDetection(synthetic["train_images"], synthetic["train_annotations"], warn=False)
                     .load_item(i)[1]["labels"]) for i in range(6)]
    assert sum(counts) > sum(originals)  # four images' objects per mosaic
    assert loader.dataset.transforms.active_ops()[:2] == ["Mosaic", "MixUp"]
    loader.dataset.transforms.set_epoch(settings["policy_epoch"])
    assert "Mosaic" not in loader.dataset.transforms.active_ops()
