"""Translate the published-style dataloader sections of a config into `build_dataloader` settings."""

from __future__ import annotations

__all__ = ["loader_settings"]


def _resize_size(ops):
    for op in ops or []:
        if isinstance(op, dict) and op.get("type") == "Resize":
            return op.get("size")
    return None


def loader_settings(cfg: dict, split: str, world_size: int = 1, seed: int = 0) -> dict:
    """Settings of `dfine.data.build_dataloader` for ``split`` ("train" or "val") from
    ``cfg[f"{split}_dataloader"]``: dataset paths, per-process batch size (``total_batch_size`` /
    world size), image size (the Resize op, else ``eval_spatial_size``), stop epoch, multi-scale
    repeat, workers, and how category ids map to labels (``dataset.category_map``, else "mscoco"
    when ``remap_mscoco_category`` is set, else "contiguous")."""
    key = f"{split}_dataloader"
    section = cfg.get(key)
    if not isinstance(section, dict):
        raise ValueError(f"config has no {key} section")
    dataset = section.get("dataset") or {}
    for field in ("img_folder", "ann_file"):
        if not dataset.get(field):
            raise ValueError(f"config {key}.dataset.{field} is not set")
    train = split == "train"
    transforms = dataset.get("transforms") or {}
    size = _resize_size(transforms.get("ops")) or cfg.get("eval_spatial_size") or 640
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = int(size[0])
    if "batch_size" in section:
        batch = int(section["batch_size"])
    else:
        total = int(section.get("total_batch_size", 8 * world_size))
        if total % world_size:
            raise ValueError(f"{key}.total_batch_size={total} is not divisible by the {world_size} processes")
        batch = total // world_size
    collate = section.get("collate_fn") or {}
    policy = transforms.get("policy") or {}
    stop_epoch = collate.get("stop_epoch", policy.get("epoch"))
    if dataset.get("category_map"):
        category_map = dataset["category_map"]
    else:
        category_map = "mscoco" if cfg.get("remap_mscoco_category") else "contiguous"
    return {
        "img_folder": dataset["img_folder"],
        "ann_file": dataset["ann_file"],
        "train": train,
        "augment": bool(section.get("augment", train)),
        "image_size": size,
        "category_map": category_map,
        "batch_size": batch,
        "shuffle": bool(section.get("shuffle", train)),
        "drop_last": bool(section.get("drop_last", train)),
        "num_workers": int(section.get("num_workers", 0)),
        "stop_epoch": stop_epoch if train else None,
        "base_size_repeat": collate.get("base_size_repeat") if train else None,
        "seed": seed,
    }
