"""D-FINE: real-time DETR with Fine-grained Distribution Refinement, on fused kernels."""

from dfine import ops  # noqa: F401
from dfine.config import build_model, build_postprocessor, load_config, set_backend


def build_criterion(cfg, backend=None):
    """The D-FINE training criterion of a loaded config (see dfine.criterion.build_criterion)."""
    from dfine.criterion import build_criterion as _build

    return _build(cfg, backend=backend)


__version__ = "0.1.0"

__all__ = ["ops", "load_config", "build_model", "build_postprocessor", "build_criterion", "set_backend"]
