"""Mixed precision of training: the autocast dtype (config ``amp_dtype``) and whether losses are scaled.

* ``amp_dtype: bfloat16`` - no loss scaling (bf16 has fp32's exponent range). The default where the device
  computes bf16 natively: the CPU, and GPUs with ``torch.cuda.is_bf16_supported(including_emulation=False)``
  (compute capability 8.0+: A100, RTX 30xx and later). It is the usual cure for fp16 overflow NaNs.
* ``amp_dtype: float16`` - with ``torch.amp.GradScaler`` (config ``scaler.enabled``); the default on GPUs
  without native bf16 (T4, V100).

The model runs under autocast; the criterion always runs in fp32 (the trainer disables autocast around it and
casts the outputs back to fp32).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from dfine.config import ConfigError

__all__ = ["AMP_DTYPES", "AmpPolicy", "amp_policy", "float_outputs"]

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class AmpPolicy:
    enabled: bool
    dtype: torch.dtype  # autocast dtype (float32 when disabled)
    scaler: bool  # GradScaler on: fp16 only

    @property
    def name(self) -> str:
        return str(self.dtype).replace("torch.", "") if self.enabled else "off"

    def autocast(self, device_type: str):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.dtype)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (not emulated)."""
    if device.type != "cuda":
        return True
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def amp_policy(use_amp: bool, amp_dtype: Optional[str], device, scaler_enabled: bool = True) -> AmpPolicy:
    """The mixed precision a run uses. ``amp_dtype`` None: bf16 where native, else fp16 (see the module doc)."""
    device = torch.device(device)
    if amp_dtype is not None and amp_dtype not in AMP_DTYPES:
        raise ConfigError(f"amp_dtype must be one of {sorted(AMP_DTYPES)} (or null for the device's default), "
                          f"got {amp_dtype!r}")
    if not use_amp:
        return AmpPolicy(False, torch.float32, False)
    if amp_dtype is None:
        amp_dtype = "bfloat16" if native_bf16(device) else "float16"
    elif amp_dtype == "bfloat16" and not native_bf16(device):
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"amp_dtype: bfloat16 needs a GPU with native bfloat16 (compute capability 8.0 or later); "
                          f"{name} has none: set amp_dtype: float16 (with the GradScaler) or leave it unset")
    dtype = AMP_DTYPES[amp_dtype]
    return AmpPolicy(True, dtype, scaler=dtype == torch.float16 and bool(scaler_enabled))


def float_outputs(outputs):
    """Autocast outputs back to fp32 (the criterion and post-processor run in fp32)."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {k: float_outputs(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(float_outputs(v) for v in outputs)
    return outputs
