"""D-FINE: real-time DETR with Fine-grained Distribution Refinement, on fused kernels."""

from dfine import ops  # noqa: F401

__version__ = "0.1.0"
