import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from dfine.data.transforms import POLICY_OPS, DetectionTransforms


def scene(width=80, height=60, box=(10, 15, 40, 45)):
    """Black image with a white rectangle filling `box` (xyxy, whole pixels), and its target."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = 255
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor([box], dtype=torch.float32), format="XYXY",
                                          canvas_size=(height, width)),
        "labels": torch.tensor([3]),
        "image_id": torch.tensor(1),
        "area": torch.tensor([float((x1 - x0) * (y1 - y0))]),
        "iscrowd": torch.tensor([0]),
        "orig_size": torch.tensor([width, height]),
    }
    return Image.fromarray(arr), target


def pixel_box(target, size_hw):
    h, w = size_hw
    cx, cy, bw, bh = (target["boxes"][0] * torch.tensor([w, h, w, h])).tolist()
    return [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]


def bright_extent(image):
    gray = image.mean(0)
    mask = gray > (gray.max() + gray.min()) / 2
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_flip_and_resize_keep_the_box_on_the_rectangle():
    # from the stop epoch on only sanitize / flip / resize remain: the box must follow the flip
    tr = DetectionTransforms((48, 64), train=True, stop_epoch=0)
    seen_flipped = seen_plain = False
    for seed in range(12):
        torch.manual_seed(seed)
        image, target = tr(*scene())
        assert image.shape == (3, 48, 64) and image.dtype == torch.float32
        box = pixel_box(target, (48, 64))
        assert box == pytest.approx(bright_extent(image), abs=1.0)
        # the rectangle spans x in [10, 40) of 80 -> [8, 32) of 64; flipped: [32, 56)
        seen_plain |= abs(box[0] - 8) < 1e-4
        seen_flipped |= abs(box[0] - 32) < 1e-4
    assert seen_plain and seen_flipped


def test_full_train_pipeline_keeps_boxes_on_the_object():
    tr = DetectionTransforms(64, train=True, stop_epoch=100)
    kept = 0
    for seed in range(25):
        torch.manual_seed(seed)
        image, target = tr(*scene())
        assert image.shape == (3, 64, 64)
        assert 0.0 <= image.min() and image.max() <= 1.0
        boxes = target["boxes"]
        assert boxes.shape[1] == 4 and boxes.shape[0] == target["labels"].shape[0] == target["area"].shape[0]
        assert boxes.shape[0] == target["iscrowd"].shape[0]
        if boxes.shape[0] == 0:
            continue
        kept += 1
        assert ((boxes >= 0) & (boxes <= 1)).all()
        assert target["labels"].tolist() == [3]
        # the photometric distortion may change the colours, but the rectangle stays the brightest thing
        assert pixel_box(target, (64, 64)) == pytest.approx(bright_extent(image), abs=1.5)
    assert kept >= 20


def test_sanitize_removes_tiny_boxes_with_their_labels():
    image, target = scene(width=100, height=100)
    target["boxes"] = tv_tensors.BoundingBoxes(
        torch.tensor([[10, 10, 10.5, 40], [20, 20, 60, 60], [70, 70, 90, 70.4]]), format="XYXY", canvas_size=(100, 100)
    )
    target["labels"] = torch.tensor([1, 2, 3])
    target["area"] = torch.tensor([15.0, 1600.0, 8.0])
    target["iscrowd"] = torch.tensor([0, 0, 0])
    tr = DetectionTransforms(50, train=True, stop_epoch=0)
    _, out = tr(image, target)
    assert out["labels"].tolist() == [2]
    assert out["area"].tolist() == [1600.0] and out["iscrowd"].tolist() == [0]
    cx, cy, w, h = out["boxes"][0].tolist()
    assert cy == pytest.approx(0.4) and w == pytest.approx(0.4) and h == pytest.approx(0.4)
    assert cx in (pytest.approx(0.4), pytest.approx(0.6))


def test_val_transform_is_resize_and_normalised_cxcywh():
    tr = DetectionTransforms((30, 40), train=False)
    image, target = tr(*scene(width=80, height=60, box=(10, 15, 40, 45)))
    assert image.shape == (3, 30, 40)
    assert target["boxes"].tolist() == [pytest.approx([25 / 80, 30 / 60, 30 / 80, 30 / 60])]
    assert type(target["boxes"]) is torch.Tensor
    assert target["orig_size"].tolist() == [80, 60]
    # deterministic
    image2, _ = tr(*scene(width=80, height=60, box=(10, 15, 40, 45)))
    assert torch.equal(image, image2)


def test_images_without_boxes_pass_every_op():
    image, target = scene()
    empty = {k: (v[:0] if k in ("labels", "area", "iscrowd") else v) for k, v in target.items()}
    empty["boxes"] = tv_tensors.wrap(target["boxes"][:0], like=target["boxes"])
    for train in (True, False):
        tr = DetectionTransforms(32, train=train, stop_epoch=10)
        for seed in range(15):
            torch.manual_seed(seed)
            out_image, out = tr(image, dict(empty))
            assert out_image.shape == (3, 32, 32)
            assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)


def test_stop_epoch_switches_the_policy_ops_off():
    tr = DetectionTransforms(64, train=True, stop_epoch=3)
    for epoch in range(3):
        tr.set_epoch(epoch)
        assert set(POLICY_OPS) <= set(tr.active_ops())
    for epoch in (3, 4, 10):
        tr.set_epoch(epoch)
        assert not set(POLICY_OPS) & set(tr.active_ops())
        assert "RandomHorizontalFlip" in tr.active_ops() and "Resize" in tr.active_ops()

    # behaviour: after the stop epoch every output is the plain or the mirrored resize of the input
    val = DetectionTransforms(64, train=False)
    image, target = scene()
    plain, _ = val(image, target)
    mirrored = plain.flip(-1)

    def is_plain_or_mirrored(out):
        return torch.equal(out, plain) or torch.equal(out, mirrored)

    tr.set_epoch(3)
    for seed in range(10):
        torch.manual_seed(seed)
        assert is_plain_or_mirrored(tr(image, target)[0])
    tr.set_epoch(2)
    changed = 0
    for seed in range(10):
        torch.manual_seed(seed)
        changed += not is_plain_or_mirrored(tr(image, target)[0])
    assert changed >= 5


def test_no_stop_epoch_means_always_augment():
    tr = DetectionTransforms(64, train=True, stop_epoch=None)
    tr.set_epoch(10_000)
    assert set(POLICY_OPS) <= set(tr.active_ops())
