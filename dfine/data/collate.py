"""Batch collation with the published multi-scale training, and a DataLoader builder.

Multi-scale: for base 640 the scales are [480, 512, 544, 576, 608] + [640] * base_size_repeat +
[800, 768, 736, 704, 672]; each batch is resized with F.interpolate (nearest, the published default)
to one scale drawn at random, until the stop epoch. Boxes are normalised, so they do not change.
Other base sizes scale those numbers by base/640 and round to multiples of 32 (the model's largest
stride); the base size itself is kept exactly.

The scale of a batch is drawn from a generator seeded by (seed, epoch, image ids of the batch), so
it is the same whichever worker process or rank collates the batch, and after resuming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.data as tud

from dfine.data.coco import CocoDetection
from dfine.data.epoch import SharedEpoch, mix_seed
from dfine.data.transforms import POLICY_OPS, DetectionTransforms

PUBLISHED_BASE = 640
PUBLISHED_SMALL_SCALES = (480, 512, 544, 576, 608)
PUBLISHED_LARGE_SCALES = (800, 768, 736, 704, 672)


def _round32(x: float) -> int:
    return max(32, int(math.floor(x / 32 + 0.5)) * 32)


def multiscale_sizes(base_size=640, base_size_repeat: int | None = 3) -> list[tuple[int, int]]:
    """List of (H, W) batch sizes; [] when base_size_repeat is None (multi-scale off, as for D-FINE-N)."""
    if base_size_repeat is None:
        return []
    base_h, base_w = (base_size, base_size) if isinstance(base_size, int) else (int(base_size[0]), int(base_size[1]))

    def scaled(s: int) -> tuple[int, int]:
        f = s / PUBLISHED_BASE
        return (_round32(base_h * f), _round32(base_w * f))

    return (
        [scaled(s) for s in PUBLISHED_SMALL_SCALES]
        + [(base_h, base_w)] * int(base_size_repeat)
        + [scaled(s) for s in PUBLISHED_LARGE_SCALES]
    )


class BatchCollator:
    """batch of (image [3,H,W], target) -> (images [B,3,h,w], list of targets).

    base_size_repeat None disables multi-scale; stop_epoch None never stops it.
    """

    def __init__(self, base_size=640, base_size_repeat: int | None = None, stop_epoch: int | None = None, seed: int = 0):
        self.base_size = base_size
        self.base_size_repeat = base_size_repeat
        self.stop_epoch = stop_epoch
        self.seed = seed
        self.sizes = multiscale_sizes(base_size, base_size_repeat)
        self._epoch = SharedEpoch(0)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.set(epoch)

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def multiscale_active(self) -> bool:
        return bool(self.sizes) and (self.stop_epoch is None or self.epoch < self.stop_epoch)

    def pick_size(self, image_ids: list[int]) -> tuple[int, int]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, *image_ids))
        return self.sizes[int(torch.randint(len(self.sizes), (1,), generator=g))]

    def __call__(self, batch):
        images = torch.stack([torch.as_tensor(item[0]) for item in batch])
        targets = [item[1] for item in batch]
        if self.multiscale_active():
            ids = [int(t["image_id"]) for t in targets]
            size = self.pick_size(ids)
            if tuple(images.shape[-2:]) != size:
                images = F.interpolate(images, size=size)
        return images, targets


def _distributed() -> tuple[bool, int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True, dist.get_world_size(), dist.get_rank()
    return False, 1, 0


def build_split_transforms(cfg: dict) -> DetectionTransforms:
    """The transforms `build_dataloader` gives its dataset, from the same settings (see there)."""
    train = bool(cfg.get("train", True))
    augment = bool(cfg.get("augment", train))
    return DetectionTransforms(cfg.get("image_size", 640), train=augment,
                               stop_epoch=cfg.get("policy_epoch", cfg.get("stop_epoch")),
                               policy_ops=cfg.get("policy_ops", POLICY_OPS),
                               ops=cfg.get("ops") if augment == train else None)


def build_dataloader(cfg: dict, dataset=None, distributed: bool | None = None, seed: int | None = None):
    """DataLoader for one split from a config section.

    Keys (defaults in brackets): img_folder, ann_file (unless `dataset` is given), train [True],
    image_size [640] (int or [H, W]), category_map ["contiguous"], batch_size [per process, 8],
    shuffle [=train], drop_last [=train], num_workers [0], stop_epoch [None: multi-scale and the policy
    augmentations never stop], policy_epoch [=stop_epoch: when the policy augmentations stop], base_size
    [=image_size: the multi-scale base], base_size_repeat [None = no multi-scale], augment [=train], seed [0],
    pin_memory [False], ops [None: the published train / val list at image_size; see dfine.data.transforms; not
    used when augment differs from train], policy_ops [the published three: op types skipped from policy_epoch on].

    The sampler is always a DistributedSampler (num_replicas 1 when not distributed), so shuffling is
    a function of (seed, epoch) only; call `set_loader_epoch(loader, epoch)` before each epoch.
    """
    train = bool(cfg.get("train", True))
    seed = int(cfg.get("seed", 0) if seed is None else seed)
    image_size = cfg.get("image_size", 640)
    stop_epoch = cfg.get("stop_epoch")
    if dataset is None:
        transforms = build_split_transforms(cfg)
        dataset = CocoDetection(
            cfg["img_folder"],
            cfg["ann_file"],
            transforms=transforms,
            category_map=cfg.get("category_map", "contiguous"),
            aug_seed=seed,
        )
    is_dist, world, rank = _distributed()
    if distributed is not None and distributed and not is_dist:
        raise RuntimeError("build_dataloader(distributed=True) needs torch.distributed to be initialised")
    if distributed is False:
        world, rank = 1, 0
    shuffle = bool(cfg.get("shuffle", train))
    drop_last = bool(cfg.get("drop_last", train))
    sampler = tud.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
    base = cfg.get("base_size", image_size)
    base = base if isinstance(base, int) else tuple(base)
    collate = BatchCollator(base, cfg.get("base_size_repeat") if train else None, stop_epoch, seed)
    num_workers = int(cfg.get("num_workers", 0))
    # own generator: creating an iterator must not consume the global torch RNG
    generator = torch.Generator().manual_seed(seed)
    return tud.DataLoader(
        dataset,
        batch_size=int(cfg.get("batch_size", 8)),
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=num_workers > 0,
        generator=generator,
        pin_memory=bool(cfg.get("pin_memory", False)),
    )


def set_loader_epoch(loader, epoch: int) -> None:
    """Tell the sampler (shuffle order), the dataset (augmentation seeds, stop-epoch policy) and the
    collator (multi-scale, stop epoch) which epoch starts."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    if hasattr(loader.collate_fn, "set_epoch"):
        loader.collate_fn.set_epoch(epoch)
