"""D-FINE: real-time DETR with Fine-grained Distribution Refinement, on fused kernels.

Layers (imports go one way, checked by import-linter, see setup.cfg): ops -> config -> model -> loss | data
-> deploy -> engine -> apps. This file only re-exports the public API.
"""

from dfine import ops  # noqa: F401
from dfine.config import ConfigError, load_config
from dfine.deploy import load_detector
from dfine.loss import build_criterion
from dfine.model import build_model, build_postprocessor, set_backend

__version__ = "0.1.0"

__all__ = ["ops", "ConfigError", "load_config", "build_model", "build_postprocessor", "build_criterion",
           "load_detector", "set_backend"]
