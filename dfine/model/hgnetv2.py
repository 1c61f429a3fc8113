"""HGNetv2 backbone (B0-B6) with the published state-dict layout (`stem.*`, `stages.i.*`)."""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfine.model.checkpoint import read_checkpoint
from dfine.model.conv_bn import FoldableConvBN

# name -> (stem [in, mid, out], stages [in, mid, out, blocks, downsample, light, kernel, layer_num])
ARCHS = {
    "B0": ([3, 16, 16], [[16, 16, 64, 1, False, False, 3, 3], [64, 32, 256, 1, True, False, 3, 3],
                         [256, 64, 512, 2, True, True, 5, 3], [512, 128, 1024, 1, True, True, 5, 3]]),
    "B1": ([3, 24, 32], [[32, 32, 64, 1, False, False, 3, 3], [64, 48, 256, 1, True, False, 3, 3],
                         [256, 96, 512, 2, True, True, 5, 3], [512, 192, 1024, 1, True, True, 5, 3]]),
    "B2": ([3, 24, 32], [[32, 32, 96, 1, False, False, 3, 4], [96, 64, 384, 1, True, False, 3, 4],
                         [384, 128, 768, 3, True, True, 5, 4], [768, 256, 1536, 1, True, True, 5, 4]]),
    "B3": ([3, 24, 32], [[32, 32, 128, 1, False, False, 3, 5], [128, 64, 512, 1, True, False, 3, 5],
                         [512, 128, 1024, 3, True, True, 5, 5], [1024, 256, 2048, 1, True, True, 5, 5]]),
    "B4": ([3, 32, 48], [[48, 48, 128, 1, False, False, 3, 6], [128, 96, 512, 1, True, False, 3, 6],
                         [512, 192, 1024, 3, True, True, 5, 6], [1024, 384, 2048, 1, True, True, 5, 6]]),
    "B5": ([3, 32, 64], [[64, 64, 128, 1, False, False, 3, 6], [128, 128, 512, 2, True, False, 3, 6],
                         [512, 256, 1024, 5, True, True, 5, 6], [1024, 512, 2048, 2, True, True, 5, 6]]),
    "B6": ([3, 48, 96], [[96, 96, 192, 2, False, False, 3, 6], [192, 192, 512, 3, True, False, 3, 6],
                         [512, 384, 1024, 6, True, True, 5, 6], [1024, 768, 2048, 3, True, True, 5, 6]]),
}

PRETRAINED_URL = "https://github.com/Peterande/storage/releases/download/dfinev1.0/PPHGNetV2_{}_stage1.pth"


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine terms (buffers, not parameters)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


class LearnableAffineBlock(nn.Module):
    """y = scale * x + bias with two learnable scalars."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.scale * x + self.bias


class ConvBNAct(FoldableConvBN):
    """Conv + BN + optional ReLU + optional learnable affine; deploy() folds the BN into the conv."""

    norm_name = "bn"

    def __init__(self, cin, cout, k=3, stride=1, groups=1, use_act=True, use_lab=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=(k - 1) // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU() if use_act else nn.Identity()
        self.lab = LearnableAffineBlock() if (use_act and use_lab) else nn.Identity()

    def forward(self, x):
        return self.lab(self.act(self.conv_bn(x)))


class LightConvBNAct(nn.Module):
    """1x1 projection then depthwise k x k."""

    def __init__(self, cin, cout, k, use_lab=False):
        super().__init__()
        self.conv1 = ConvBNAct(cin, cout, 1, use_act=False, use_lab=use_lab)
        self.conv2 = ConvBNAct(cout, cout, k, groups=cout, use_act=True, use_lab=use_lab)

    def forward(self, x):
        return self.conv2(self.conv1(x))


class StemBlock(nn.Module):
    def __init__(self, cin, mid, cout, use_lab=False):
        super().__init__()
        self.stem1 = ConvBNAct(cin, mid, 3, 2, use_lab=use_lab)
        self.stem2a = ConvBNAct(mid, mid // 2, 2, 1, use_lab=use_lab)
        self.stem2b = ConvBNAct(mid // 2, mid, 2, 1, use_lab=use_lab)
        self.stem3 = ConvBNAct(mid * 2, mid, 3, 2, use_lab=use_lab)
        self.stem4 = ConvBNAct(mid, cout, 1, 1, use_lab=use_lab)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=1, ceil_mode=True)

    def forward(self, x):
        x = F.pad(self.stem1(x), (0, 1, 0, 1))
        branch = self.stem2b(F.pad(self.stem2a(x), (0, 1, 0, 1)))
        x = torch.cat([self.pool(x), branch], dim=1)
        return self.stem4(self.stem3(x))


class HGBlock(nn.Module):
    def __init__(self, cin, mid, cout, layer_num, k, residual, light, use_lab):
        super().__init__()
        self.residual = residual
        self.layers = nn.ModuleList()
        for i in range(layer_num):
            c = cin if i == 0 else mid
            if light:
                self.layers.append(LightConvBNAct(c, mid, k, use_lab=use_lab))
            else:
                self.layers.append(ConvBNAct(c, mid, k, use_lab=use_lab))
        total = cin + layer_num * mid
        # 'se' aggregation: squeeze to out/2 then excite to out (both 1x1 ConvBNAct).
        self.aggregation = nn.Sequential(
            ConvBNAct(total, cout // 2, 1, use_lab=use_lab), ConvBNAct(cout // 2, cout, 1, use_lab=use_lab)
        )

    def forward(self, x):
        feats = [x]
        y = x
        for layer in self.layers:
            y = layer(y)
            feats.append(y)
        y = self.aggregation(torch.cat(feats, dim=1))
        return y + x if self.residual else y


class HGStage(nn.Module):
    def __init__(self, cin, mid, cout, num_blocks, downsample, light, k, layer_num, use_lab):
        super().__init__()
        self.downsample = (
            ConvBNAct(cin, cin, 3, 2, groups=cin, use_act=False, use_lab=use_lab) if downsample else nn.Identity()
        )
        self.blocks = nn.Sequential(
            *[HGBlock(cin if i == 0 else cout, mid, cout, layer_num, k, i > 0, light, use_lab) for i in range(num_blocks)]
        )

    def forward(self, x):
        return self.blocks(self.downsample(x))


def _freeze_norms(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d below `module` by a FrozenBatchNorm2d (same statistics)."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, module.eps)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(frozen, name).copy_(getattr(module, name).detach())
        return frozen
    for name, child in module.named_children():
        new = _freeze_norms(child)
        if new is not child:
            setattr(module, name, new)
    return module


class HGNetv2(nn.Module):
    def __init__(self, name="B0", use_lab=False, return_idx=(1, 2, 3), freeze_stem_only=True, freeze_at=-1,
                 freeze_norm=False, pretrained=False, local_model_dir="weight/hgnetv2/"):
        super().__init__()
        if name not in ARCHS:
            raise ValueError(f"HGNetv2: name must be one of {sorted(ARCHS)}, got {name!r}")
        stem, stages = ARCHS[name]
        self.return_idx = list(return_idx)
        self.out_channels = [stages[i][2] for i in self.return_idx]
        self.out_strides = [[4, 8, 16, 32][i] for i in self.return_idx]
        self.stem = StemBlock(*stem, use_lab=use_lab)
        self.stages = nn.ModuleList([HGStage(*s, use_lab=use_lab) for s in stages])
        if pretrained:
            self._load_pretrained(name, local_model_dir)
        if freeze_at >= 0:
            self._freeze(self.stem)
            if not freeze_stem_only:
                for i in range(min(freeze_at + 1, len(self.stages))):
                    self._freeze(self.stages[i])
        if freeze_norm:
            _freeze_norms(self)

    @staticmethod
    def _freeze(m: nn.Module):
        for p in m.parameters():
            p.requires_grad_(False)

    def _load_pretrained(self, name, local_model_dir):
        path = os.path.join(local_model_dir, f"PPHGNetV2_{name}_stage1.pth")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"HGNetv2: pretrained=True but the ImageNet weights {path!r} do not exist. Download "
                f"{PRETRAINED_URL.format(name)} and put it at that path, or set HGNetv2.pretrained: False."
            )
        state = read_checkpoint(path, what="HGNetv2 ImageNet weights")
        if isinstance(state, dict) and "model" in state:
            state = state["model"]
        self.load_state_dict(state, strict=False)

    def forward(self, x):
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.return_idx:
                outs.append(x)
        return outs
