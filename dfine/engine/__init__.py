"""Training engine: optimizer/schedules, EMA, the training loop and evaluation (layer `engine`)."""

from dfine.engine.ema import ModelEMA
from dfine.engine.optim import LinearWarmup, build_lr_scheduler, build_optimizer, param_groups
from dfine.engine.trainer import NonFiniteLossError, Trainer
from dfine.model.checkpoint import save_atomic

__all__ = ["Trainer", "NonFiniteLossError", "ModelEMA", "LinearWarmup", "build_optimizer", "build_lr_scheduler",
           "param_groups", "save_atomic"]
