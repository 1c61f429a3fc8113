"""Exponential moving average of the model weights (all float state_dict entries, BN buffers too)."""

from __future__ import annotations

import copy
import math

import torch

__all__ = ["ModelEMA"]


class ModelEMA:
    """ema = d * ema + (1 - d) * model after every optimizer step, with the published warm-up
    d = decay * (1 - exp(-updates / warmups)) (no warm-up when warmups == 0)."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmups: int = 1000, start: int = 0):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.warmups = int(warmups)
        self.start = int(start)
        self.updates = 0

    def current_decay(self) -> float:
        if self.warmups <= 0:
            return self.decay
        return self.decay * (1 - math.exp(-self.updates / self.warmups))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        if self.updates <= self.start:  # before `start` updates the EMA just follows the model
            d = 0.0
        else:
            d = self.current_decay()
        source = model.state_dict()
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(source[name].detach().to(value.dtype), alpha=1 - d)
            else:
                value.copy_(source[name])

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state.get("updates", 0))
        self.decay = float(state.get("decay", self.decay))
