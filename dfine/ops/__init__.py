"""Fused ops of D-FINE. Each op has a plain-PyTorch reference (the truth) and fused backends.

Pick a backend per call with ``backend=`` ("auto", "reference", "cpp", "triton"); see
``dfine.ops._backend``. ``python -m dfine.ops.compare`` checks every backend against its reference.
"""

from dfine.ops._backend import BACKENDS, extension_available, extension_has_cuda, triton_available
from dfine.ops.fdr import fdr_decode, fdr_decode_reference, fdr_targets, weighting_function
from dfine.ops.golsd_losses import ddf_loss, ddf_loss_reference, fgl_loss, fgl_loss_reference
from dfine.ops.ms_deform_attn import ms_deform_attn, ms_deform_attn_discrete, ms_deform_attn_reference

__all__ = [
    "BACKENDS",
    "extension_available",
    "extension_has_cuda",
    "triton_available",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "ms_deform_attn_discrete",
    "weighting_function",
    "fdr_decode",
    "fdr_decode_reference",
    "fdr_targets",
    "fgl_loss",
    "fgl_loss_reference",
    "ddf_loss",
    "ddf_loss_reference",
]
