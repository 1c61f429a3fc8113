"""How fast D-FINE runs on the CPU: process settings (train.py and `python -m dfine predict` use both) and
``optimize_for_cpu``, the one function that applies the CPU inference forms of a built model.

Measured on D-FINE-S, batch 4 x 640 x 640, 2 threads (`benchmarks/bench_train_step.py`), and for
inference on one 640 x 640 image (`benchmarks/bench_model.py`):

* glibc malloc serves every block above its mmap threshold (at most 32 MB) with a fresh mmap and
  unmaps it on free. A training step allocates and frees hundreds of activations that large, so every
  step faults all of their pages in again: a quarter of the step went to page faults and zeroing new
  pages. Best fix: run under jemalloc without decay (`LD_PRELOAD=libjemalloc.so.2
  MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1`, what scripts/main.sh does when the library is
  installed). Without it, `retain_freed_memory()` tells glibc to keep everything on the heap and never
  trim it, so the next step reuses what the previous one freed. It is almost as fast, but the heap
  fragments more: resident memory ends up higher (measured after 30 multi-scale D-FINE-N steps:
  6.2 GB vs 5.0 GB with glibc defaults and 4.0 GB under jemalloc).
  Inference pays the same toll per image: the encoder's 80 x 80 maps are 6-13 MB each. Retaining
  freed memory made the deployed model 5-25% faster per image (D-FINE-S 235 -> 195-227 ms,
  D-FINE-N 100-120 -> 85-92 ms, medians of alternating runs); `predict` turns it on for the CPU.
* oneDNN convolutions run natively on NHWC. Given NCHW tensors, every convolution (forward and both
  backward passes) reorders its input, weight and output. `channels_last` is the layout they want.

For inference, `optimize_for_cpu(model)` applies these, explicitly, to a built (deployed) model:
`prepack_linear_weights(model)` runs the model's nn.Linear layers through
oneDNN with their weights reordered once into its blocked layout, instead of MKL's sgemm on the plain
weight. On this machine's AMD CPU (2 threads) that is 1.05-1.6x faster per layer at D-FINE's shapes
(1.6x for the 8400-anchor query selection, 1.3-1.5x for the FFNs); the stem's 2x2 stride-1 max pool
as the maximum of four shifted views (ATen's pooling walks one window at a time: ~3 ms -> ~1 ms at
1x16x320x320 channels_last); the attention-weight softmax over 12 points as max/exp/sum/div (~3x
faster than ATen's softmax over so short a last dim); the ReLUs after convolutions in place.
The model itself has one numeric path; these forms give the same values (gradients may differ where
a pooling window holds ties), and exported graphs never contain them.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfine.model.conv_bn import FoldableConvBN
from dfine.ops._backend import symbolic_shapes

__all__ = [
    "OneDNNLinear", "ShiftedMaxPool2x2", "ShortSoftmax", "loaded_allocator", "optimize_for_cpu",
    "prepack_linear_weights", "retain_freed_memory", "resolve_channels_last", "to_memory_format",
]

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


def onednn_linear_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


# Below this many multiply-adds per call MKL's sgemm was as fast or faster (0.8-0.97x for oneDNN at
# 300 x 128 x {64, 96, 128}); above it oneDNN won (1.15-1.6x from 300 x 128 x 512 up).
ONEDNN_MIN_MACS = 8_000_000


class OneDNNLinear(nn.Linear):
    """nn.Linear whose inference on CPU float32 runs through oneDNN with a prepacked weight.

    The weight and bias stay ordinary parameters (same state_dict). The packed copy is rebuilt when
    the weight changes (in-place updates such as load_state_dict bump its version), so it is never
    stale. Anything else - autograd, other devices or dtypes, tracing for export, torch.compile -
    takes plain F.linear, so the module is a drop-in replacement.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        self._packed = None
        self._packed_key = None

    def __getstate__(self):
        # The packed weight is an opaque oneDNN tensor (no storage: it cannot be pickled or
        # deep-copied); copies rebuild it on their first call.
        state = self.__dict__.copy()
        state["_packed"] = None
        state["_packed_key"] = None
        return state

    def _packed_weight(self):
        key = (self.weight.data_ptr(), self.weight._version, self.weight.shape)
        if self._packed is None or self._packed_key != key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
            self._packed_key = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_onednn = (
            x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
            and x.dim() >= 2 and x.numel() // max(self.in_features, 1) * self.in_features * self.out_features
            >= ONEDNN_MIN_MACS
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
            and not torch.compiler.is_compiling() and not symbolic_shapes()
        )
        if not use_onednn:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), self.bias, "none", [], "")


def prepack_linear_weights(model: nn.Module) -> int:
    """Replace every nn.Linear of ``model`` (in place) by a :class:`OneDNNLinear`; returns how many.
    Linear layers owned by nn.MultiheadAttention are left alone (it reads their weights directly).
    Does nothing (returns 0) when this torch has no oneDNN linear ops."""
    if not onednn_linear_available():
        return 0
    count = 0
    for parent in model.modules():
        if isinstance(parent, nn.MultiheadAttention):
            continue
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, OneDNNLinear(child))
                count += 1
    return count


class ShiftedMaxPool2x2(nn.Module):
    """``nn.MaxPool2d(2, stride=1)`` as the maximum of four shifted views: the same values (NaN
    included). Their gradients differ where a window holds ties (``maximum`` splits it, pooling sends
    it to the first maximum): an inference form."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = torch.maximum(x[..., :-1, :-1], x[..., :-1, 1:])
        bottom = torch.maximum(x[..., 1:, :-1], x[..., 1:, 1:])
        return torch.maximum(top, bottom)


class ShortSoftmax(nn.Module):
    """``x.softmax(-1)`` as four ops, faster on the CPU for a short last dim (float32/float64)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = (x - x.detach().amax(-1, keepdim=True)).exp()
        return e / e.sum(-1, keepdim=True)


def _is_stem_pool(module: nn.Module) -> bool:
    return (type(module) is nn.MaxPool2d and module.kernel_size in (2, (2, 2)) and module.stride in (1, (1, 1))
            and module.padding in (0, (0, 0)) and module.dilation in (1, (1, 1)))


def optimize_for_cpu(model: nn.Module, channels_last: bool = True, prepack_linear: bool = True) -> dict:
    """Apply the CPU inference forms to ``model`` in place (see the module docstring) and return what
    was replaced, e.g. ``{"max_pool": 1, "softmax": 6, "relu_inplace": 80, "linear": 40}``.

    For an eval-mode model on the CPU, typically after ``model.deploy()``; ``dfine.deploy.load_detector``
    calls it for CPU detectors. The values stay those of the model's own modules."""
    counts = {"max_pool": 0, "softmax": 0, "relu_inplace": 0, "linear": 0}
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if _is_stem_pool(child):
                setattr(parent, name, ShiftedMaxPool2x2())
                counts["max_pool"] += 1
            elif type(child) is nn.Softmax and child.dim == -1:
                setattr(parent, name, ShortSoftmax())
                counts["softmax"] += 1
        act = getattr(parent, "act", None)
        if isinstance(parent, FoldableConvBN) and type(act) is nn.ReLU:
            act.inplace = True  # it follows a convolution whose output nothing else reads
            counts["relu_inplace"] += 1
    if prepack_linear:
        counts["linear"] = prepack_linear_weights(model)
    to_memory_format(model, channels_last)
    return counts
