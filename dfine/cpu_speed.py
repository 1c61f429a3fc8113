"""Two settings that decide how fast D-FINE runs on the CPU (train.py uses both, predict the second).

Measured on D-FINE-S, batch 4 x 640 x 640, 2 threads (`benchmarks/bench_train_step.py`):

* glibc malloc serves every block above its mmap threshold (at most 32 MB) with a fresh mmap and
  unmaps it on free. A training step allocates and frees hundreds of activations that large, so every
  step faults all of their pages in again: a quarter of the step went to page faults and zeroing new
  pages. Best fix: run under jemalloc without decay (`LD_PRELOAD=libjemalloc.so.2
  MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1`, what scripts/main.sh does when the library is
  installed). Without it, `retain_freed_memory()` tells glibc to keep everything on the heap and never
  trim it, so the next step reuses what the previous one freed. It is almost as fast, but the heap
  fragments more: resident memory ends up higher (measured after 30 multi-scale D-FINE-N steps:
  6.2 GB vs 5.0 GB with glibc defaults and 4.0 GB under jemalloc).
* oneDNN convolutions run natively on NHWC. Given NCHW tensors, every convolution (forward and both
  backward passes) reorders its input, weight and output. `channels_last` is the layout they want.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Optional

import torch

__all__ = ["loaded_allocator", "retain_freed_memory", "resolve_channels_last", "to_memory_format"]

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's <malloc.h>
_M_MMAP_MAX = -4
_retained = False


def loaded_allocator() -> str:
    """"jemalloc" or "tcmalloc" when one is loaded into this process (LD_PRELOAD), else "system"."""
    try:
        maps = open("/proc/self/maps").read()
    except OSError:
        return "system"
    for name in ("jemalloc", "tcmalloc"):
        if f"lib{name}" in maps:
            return name
    return "system"


def retain_freed_memory() -> bool:
    """Tell glibc malloc never to use mmap for large blocks and never to return the heap top to the
    OS. Applies to the whole process (and to forked data-loader workers). Returns True once the
    setting is in effect; False where it cannot apply (not Linux/glibc), and then nothing changes."""
    global _retained
    if _retained:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no glibc mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # If brk cannot grow, glibc still falls back to mmap, so this never makes an allocation fail.
    _retained = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _retained


def resolve_channels_last(setting, device) -> bool:
    """The config key `channels_last`: true/false, or null/"auto" = on for the CPU (oneDNN prefers
    NHWC there), off for CUDA (where fp32 convolutions do not always gain from it)."""
    if setting is None or (isinstance(setting, str) and setting.lower() == "auto"):
        return torch.device(device).type == "cpu"
    if isinstance(setting, str):
        if setting.lower() in ("true", "1", "yes", "on"):
            return True
        if setting.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"channels_last must be true, false or auto, got {setting!r}")
    return bool(setting)


def to_memory_format(x, channels_last: Optional[bool]):
    """A module (in place) or a 4-d tensor in channels_last layout when asked; anything else unchanged."""
    if not channels_last:
        return x
    if isinstance(x, torch.nn.Module):
        return x.to(memory_format=torch.channels_last)
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x
