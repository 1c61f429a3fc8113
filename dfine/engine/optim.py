"""Optimizer, LR warm-up and LR schedule built from the published config sections."""

from __future__ import annotations

import re
from typing import Dict, List

import torch

from dfine.config import config_section

__all__ = ["param_groups", "build_optimizer", "build_lr_scheduler", "LinearWarmup"]


def param_groups(model: torch.nn.Module, optimizer_cfg: dict) -> List[Dict]:
    """One group per regex of ``optimizer_cfg["params"]`` (trainable params whose name the regex
    finds, ``re.search``), in config order, plus a last default group with every other trainable
    param. The group's other keys (lr, weight_decay, ...) override the optimizer defaults.
    A param claimed by two regexes is an error (the published configs never overlap)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    claimed: Dict[str, int] = {}
    groups = []
    for i, spec in enumerate(optimizer_cfg.get("params") or []):
        spec = dict(spec)
        pattern = spec.pop("params")
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"optimizer.params[{i}].params: invalid regex {pattern!r}: {e}") from None
        names = [n for n, _ in named if regex.search(n)]
        for n in names:
            if n in claimed:
                raise ValueError(
                    f"optimizer.params: parameter {n!r} matches both group {claimed[n]} and group {i} ({pattern!r})"
                )
            claimed[n] = i
        groups.append(dict(spec, params=[p for n, p in named if n in names and claimed[n] == i], names=names))
    rest = [n for n, _ in named if n not in claimed]
    groups.append({"params": [p for n, p in named if n in rest], "names": rest})
    return groups


def build_optimizer(model: torch.nn.Module, cfg: dict) -> torch.optim.Optimizer:
    opt_cfg = config_section(cfg, "optimizer")
    if opt_cfg["type"] != "AdamW":
        raise ValueError(f"optimizer.type: only AdamW is supported, got {opt_cfg['type']!r}")
    groups = param_groups(model, opt_cfg)
    for g in groups:
        g.pop("names")
        for k in [k for k, v in g.items() if v is None]:  # declared group keys left unset: optimizer defaults
            g.pop(k)
    groups = [g for g in groups if g["params"]]  # empty groups (e.g. backbone norms of N/S/M) are dropped
    return torch.optim.AdamW(
        groups,
        lr=float(opt_cfg["lr"]),
        betas=tuple(opt_cfg["betas"]),
        weight_decay=float(opt_cfg["weight_decay"]),
    )


def build_lr_scheduler(optimizer, cfg: dict):
    sched = config_section(cfg, "lr_scheduler")
    if sched["type"] != "MultiStepLR":
        raise ValueError(f"lr_scheduler.type: only MultiStepLR is supported, got {sched['type']!r}")
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(sched["milestones"]),
                                                gamma=float(sched["gamma"]))


class LinearWarmup:
    """Per-iteration warm-up: lr = scheduled_lr * (step + 1) / duration for the first ``duration``
    optimizer steps, then the schedule's lr untouched."""

    def __init__(self, lr_scheduler, warmup_duration: int):
        self.lr_scheduler = lr_scheduler
        self.duration = int(warmup_duration)
        self.step_count = 0

    def factor(self) -> float:
        return min(1.0, (self.step_count + 1) / self.duration) if self.duration > 0 else 1.0

    def finished(self) -> bool:
        return self.step_count >= self.duration

    def apply(self) -> None:
        """Scale every group's lr for the coming optimizer step (no-op once warm-up is over)."""
        if self.finished():
            return
        f = self.factor()
        for group, lr in zip(self.lr_scheduler.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
            group["lr"] = lr * f

    def step(self) -> None:
        """After the optimizer step: put the schedule's own lr back, so the epoch scheduler (which
        derives the next lr from the current one) never sees a warmed-down value."""
        if not self.finished():
            for group, lr in zip(self.lr_scheduler.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
                group["lr"] = lr
        self.step_count += 1

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "duration": self.duration}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.duration = int(state.get("duration", self.duration))


def build_warmup(lr_scheduler, cfg: dict) -> LinearWarmup:
    section = config_section(cfg, "lr_warmup_scheduler")
    if section["type"] != "LinearWarmup":
        raise ValueError(f"lr_warmup_scheduler.type: only LinearWarmup is supported, got {section['type']!r}")
    return LinearWarmup(lr_scheduler, int(section["warmup_duration"]))
