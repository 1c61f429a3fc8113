"""Translate the published-style dataloader sections of a config into `build_dataloader` settings."""

from __future__ import annotations

import copy

from dfine.config import ConfigError, config_section, config_value
from dfine.data.collate import build_split_transforms

__all__ = ["loader_settings", "check_transforms"]


def _resize_size(ops):
    for op in ops or []:
        if isinstance(op, dict) and op.get("type") == "Resize":
            return op.get("size")
    return None


def loader_settings(cfg: dict, split: str, world_size: int = 1, seed: int = 0) -> dict:
    """Settings of `dfine.data.build_dataloader` for ``split`` ("train" or "val") from
    ``cfg[f"{split}_dataloader"]``: dataset paths, per-process batch size (``batch_size``, else
    ``total_batch_size`` / (world size x ``accumulate_steps`` for train), else 8), image size (the Resize op,
    else ``eval_spatial_size``, else 640), the augmentation stop epoch (``transforms.policy.epoch``) and the
    multi-scale one (``collate_fn.stop_epoch``; each defaults to the other), multi-scale base size and repeat,
    workers, how category ids map to labels (``dataset.category_map``, else "mscoco" when
    ``remap_mscoco_category`` is set, else "contiguous"), the transforms ``ops`` list (None: the published one)
    and the policy's op types. `load_config` has checked the section."""
    key = f"{split}_dataloader"
    if not isinstance(cfg.get(key), dict):
        raise ValueError(f"config has no {key} section")
    section = config_section(cfg, key)
    dataset = section["dataset"]
    for field in ("img_folder", "ann_file"):
        if not dataset[field]:
            raise ValueError(f"config {key}.dataset.{field} is not set")
    train = split == "train"
    transforms = dataset["transforms"]
    size = _resize_size(transforms["ops"]) or config_value(cfg, "eval_spatial_size") or 640
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = int(size[0])
    accumulate = int(config_value(cfg, "accumulate_steps")) if train else 1
    if section["batch_size"] is not None:
        batch = int(section["batch_size"])
    else:
        total = section["total_batch_size"]
        total = int(total) if total is not None else 8 * world_size * accumulate
        if total % (world_size * accumulate):
            raise ValueError(f"{key}.total_batch_size={total} is not divisible by the {world_size} process(es) x "
                             f"{accumulate} accumulation step(s)")
        batch = total // (world_size * accumulate)
    settings = {
        "img_folder": dataset["img_folder"],
        "ann_file": dataset["ann_file"],
        "train": train,
        "augment": section["augment"],
        "image_size": size,
        "category_map": dataset["category_map"] or ("mscoco" if config_value(cfg, "remap_mscoco_category")
                                                    else "contiguous"),
        "batch_size": batch,
        "shuffle": section["shuffle"],
        "drop_last": section["drop_last"],
        "num_workers": section["num_workers"],
        "pin_memory": section["pin_memory"],
        "stop_epoch": None,
        "base_size_repeat": None,
        "seed": seed,
        "ops": copy.deepcopy(transforms["ops"]),
    }
    if train:
        collate, policy = section["collate_fn"], transforms["policy"]
        stop = collate["stop_epoch"] if collate["stop_epoch"] is not None else policy["epoch"]
        settings.update(
            stop_epoch=stop,
            policy_epoch=policy["epoch"] if policy["epoch"] is not None else stop,
            base_size=collate["base_size"] if collate["base_size"] is not None else size,
            base_size_repeat=collate["base_size_repeat"],
            policy_ops=list(policy["ops"]),
        )
    return settings


def check_transforms(cfg: dict) -> None:
    """Build both splits' transform pipelines once, so that what `load_config` cannot see (the order of the ops,
    a policy op missing from the list, a parameter value an op refuses) is a ConfigError before training starts,
    naming the config key."""
    for split in ("train", "val"):
        if not isinstance(cfg.get(f"{split}_dataloader"), dict):
            continue
        section = config_section(cfg, f"{split}_dataloader")
        transforms = section["dataset"]["transforms"]
        settings = {"train": split == "train", "augment": section["augment"], "ops": transforms["ops"],
                    "image_size": _resize_size(transforms["ops"]) or config_value(cfg, "eval_spatial_size") or 640}
        if split == "train":
            settings["policy_ops"] = transforms["policy"]["ops"]
        try:
            build_split_transforms(settings)
        except ValueError as err:  # messages start with the place in the section: "ops[2].p: ..."
            where, _, message = str(err).partition(": ")
            raise ConfigError(f"config key '{split}_dataloader.dataset.transforms.{where}': {message}") from None
