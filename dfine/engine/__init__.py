"""Training engine: optimizer/schedules, EMA, atomic checkpoints, the training loop and evaluation."""

from dfine.engine.checkpoint_io import save_atomic
from dfine.engine.ema import ModelEMA
from dfine.engine.optim import LinearWarmup, build_lr_scheduler, build_optimizer, param_groups
from dfine.engine.trainer import NonFiniteLossError, Trainer

__all__ = ["Trainer", "NonFiniteLossError", "ModelEMA", "LinearWarmup", "build_optimizer", "build_lr_scheduler",
           "param_groups", "save_atomic"]
