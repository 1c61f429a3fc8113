"""Conv + BatchNorm pairs whose BN is folded into the conv by deploy() while the state_dict keeps the
published layout (`conv.weight`, `bn.*` / `norm.*`): the published *_deploy checkpoints keep these BNs
unfolded, so the folded weights live in non-persistent buffers and are refreshed on every load."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.Module):
    """Weight and bias of one conv equal to conv followed by BN (eval statistics); works for
    nn.BatchNorm2d and FrozenBatchNorm2d alike."""
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    weight = conv.weight * scale[:, None, None, None]
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return weight.detach(), bias.detach()


def _refold_after_load(module, incompatible_keys):
    if module.folded_weight is not None:
        module.fold_bn()


class FoldableConvBN(nn.Module):
    """Base of modules holding a conv (attribute `conv`) followed by a BN (attribute `norm_name`).
    `conv_bn(x)` runs the pair, or the single folded conv after `fold_bn()` / `convert_to_deploy()`."""

    norm_name = "norm"

    def __init__(self):
        super().__init__()
        self.register_buffer("folded_weight", None, persistent=False)
        self.register_buffer("folded_bias", None, persistent=False)
        self.register_load_state_dict_post_hook(_refold_after_load)

    def fold_bn(self):
        self.folded_weight, self.folded_bias = fuse_conv_bn(self.conv, getattr(self, self.norm_name))

    def convert_to_deploy(self):
        self.fold_bn()

    @property
    def folded(self) -> bool:
        return self.folded_weight is not None

    def conv_bn(self, x):
        c = self.conv
        if self.folded_weight is None:
            return getattr(self, self.norm_name)(c(x))
        return F.conv2d(x, self.folded_weight, self.folded_bias, c.stride, c.padding, c.dilation, c.groups)


class ConvBN(FoldableConvBN):
    """1x1 (or k x k) conv without bias, then BN: the input projections of the encoder and decoder
    (keys `conv.weight`, `norm.*`, as the published nn.Sequential(conv, norm))."""

    def __init__(self, cin, cout, k=1, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=(k - 1) // 2, bias=False)
        self.norm = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.conv_bn(x)
