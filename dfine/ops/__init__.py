"""Fused ops of D-FINE. Each op has a plain-PyTorch reference (the truth) and fused backends.

Pick a backend per call with ``backend=`` ("auto", "reference", "cpp", "triton"); see
``dfine.ops._backend``. ``python -m dfine.ops.compare`` checks every backend against its reference.
"""

from dfine.ops._backend import BACKENDS, extension_available, extension_has_cuda, triton_available
from dfine.ops.ms_deform_attn import ms_deform_attn, ms_deform_attn_reference

__all__ = [
    "BACKENDS",
    "extension_available",
    "extension_has_cuda",
    "triton_available",
    "ms_deform_attn",
    "ms_deform_attn_reference",
]
