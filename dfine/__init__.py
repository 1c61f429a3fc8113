"""D-FINE: real-time DETR with Fine-grained Distribution Refinement, on fused kernels."""

from dfine import ops  # noqa: F401
from dfine.config import build_model, build_postprocessor, load_config, set_backend

__version__ = "0.1.0"

__all__ = ["ops", "load_config", "build_model", "build_postprocessor", "set_backend"]
