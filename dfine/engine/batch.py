"""The batch of one optimizer step, and what changes with it when `train.py --batch-size N` overrides the config's.

A config's learning rates and warm-ups are tuned for its total batch (images per optimizer step, over all
processes and gradient-accumulation steps). Given another total, `rescale_for_batch_size` rewrites the config:

* every learning rate (``optimizer.lr`` and each ``optimizer.params[i].lr``) times new/old ("linear", the default:
  the same average update per image; Goyal et al. 2017), or times sqrt(new/old) ("sqrt", often preferred for
  Adam-type optimizers at large ratios), or unchanged ("none");
* the warm-ups counted in optimizer steps - ``lr_warmup_scheduler.warmup_duration``, ``ema.warmups`` and
  ``ema.start`` - times old/new (rounded, at least 1 when they were set), so that they span the same number of
  images (unchanged with "none");
* the EMA decay is kept: the published configs use 0.9999 at 32 (S-X) and at 128 images per step (N).

Epoch-based settings (``lr_scheduler.milestones``, the stop epoch) need no change.
"""

from __future__ import annotations

import math

from dfine.config import ConfigError, config_section, config_value

__all__ = ["LR_SCALING_RULES", "step_batch", "rescale_for_batch_size", "describe_step_batch"]

LR_SCALING_RULES = ("linear", "sqrt", "none")


def step_batch(cfg: dict, world_size: int = 1) -> tuple[int, int, int]:
    """(images per optimizer step over all processes, per process and batch, accumulate_steps) of a config."""
    section = config_section(cfg, "train_dataloader")
    accumulate = int(config_value(cfg, "accumulate_steps"))
    if accumulate < 1:
        raise ConfigError(f"config key 'accumulate_steps' must be at least 1, got {accumulate}")
    if section["batch_size"] is not None:
        per_process = int(section["batch_size"])
        return per_process * world_size * accumulate, per_process, accumulate
    total = section["total_batch_size"]
    if total is None:
        return 8 * world_size * accumulate, 8, accumulate
    if int(total) % (world_size * accumulate):
        raise ConfigError(f"config key 'train_dataloader.total_batch_size' ({total}) must be a multiple of the "
                          f"{world_size} process(es) x {accumulate} accumulation step(s)")
    return int(total), int(total) // (world_size * accumulate), accumulate


def describe_step_batch(cfg: dict, world_size: int = 1) -> str:
    total, per_process, accumulate = step_batch(cfg, world_size)
    return (f"batch: {total} images per optimizer step = {per_process} per batch x {world_size} "
            f"process{'es' if world_size > 1 else ''} x {accumulate} accumulation step{'s' if accumulate > 1 else ''}")


def _own_section(cfg: dict, key: str) -> dict:
    if not isinstance(cfg.get(key), dict):  # absent or null: an empty section (defaults)
        cfg[key] = {}
    return cfg[key]


def _scaled_steps(value: int, factor: float) -> int:
    return max(1, round(value * factor)) if value > 0 else value


def rescale_for_batch_size(cfg: dict, batch_size: int, world_size: int = 1, rule: str = "linear") -> list[str]:
    """Set the config's total batch to `batch_size` (images per optimizer step) and rescale its learning rates and
    step-counted warm-ups by `rule` (module docstring). Modifies `cfg` in place; returns the lines to log."""
    if rule not in LR_SCALING_RULES:
        raise ConfigError(f"lr scaling rule must be one of {', '.join(LR_SCALING_RULES)}, got {rule!r}")
    old, _, accumulate = step_batch(cfg, world_size)
    if batch_size < 1 or batch_size % (world_size * accumulate):
        raise ConfigError(f"--batch-size {batch_size} must be a positive multiple of the {world_size} process(es) x "
                          f"{accumulate} accumulation step(s)")
    loader = _own_section(cfg, "train_dataloader")
    loader["total_batch_size"] = int(batch_size)
    loader["batch_size"] = None
    lines = []
    if batch_size == old or rule == "none":
        why = "the same as the config's" if batch_size == old else "--lr-scaling none"
        lines.append(f"batch size {batch_size} (config: {old}): learning rates and warm-ups unchanged ({why})")
        return lines

    ratio = batch_size / old
    lr_factor = ratio if rule == "linear" else math.sqrt(ratio)
    optimizer = _own_section(cfg, "optimizer")
    changes = []
    base = float(config_value(cfg, "optimizer.lr"))
    optimizer["lr"] = base * lr_factor
    changes.append(f"optimizer.lr {base:g} -> {optimizer['lr']:g}")
    for i, group in enumerate(optimizer.get("params") or []):
        if group.get("lr") is not None:
            before = float(group["lr"])
            group["lr"] = before * lr_factor
            changes.append(f"optimizer.params[{i}].lr {before:g} -> {group['lr']:g}")
    formula = "new/old batch" if rule == "linear" else "sqrt(new/old batch)"
    lines.append(f"batch size {batch_size} instead of the config's {old}: learning rates x{lr_factor:.4g} ({rule} rule, "
                 f"{formula} = {'' if rule == 'linear' else 'sqrt'}({batch_size}/{old})): " + ", ".join(changes))

    steps = []
    warmup = _own_section(cfg, "lr_warmup_scheduler")
    before = int(config_value(cfg, "lr_warmup_scheduler.warmup_duration"))
    warmup["warmup_duration"] = _scaled_steps(before, 1 / ratio)
    steps.append(f"lr_warmup_scheduler.warmup_duration {before} -> {warmup['warmup_duration']}")
    ema = _own_section(cfg, "ema")
    for key in ("warmups", "start"):
        before = int(config_value(cfg, f"ema.{key}"))
        ema[key] = _scaled_steps(before, 1 / ratio)
        steps.append(f"ema.{key} {before} -> {ema[key]}")
    lines.append(f"warm-ups counted in optimizer steps x{1 / ratio:.4g} (old/new batch: the same number of images): "
                 + ", ".join(steps) + "; EMA decay unchanged")
    return lines
