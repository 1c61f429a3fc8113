"""HybridEncoder: AIFI (transformer on the coarsest map) + CCFF (FPN then PAN with RepNCSPELAN4)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfine.model.conv_bn import ConvBN, fuse_conv_bn
from dfine.ops._backend import symbolic_shapes


class ConvNormLayer(nn.Module):
    """Conv (no bias) + BN + optional activation; deploy() folds BN into `conv_bn_fused`."""

    def __init__(self, cin, cout, k, stride=1, groups=1, act=None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=(k - 1) // 2, groups=groups, bias=False)
        self.norm = nn.BatchNorm2d(cout)
        self.act = nn.SiLU() if act == "silu" else (nn.ReLU() if act == "relu" else nn.Identity())

    def forward(self, x):
        if hasattr(self, "conv_bn_fused"):
            return self.act(self.conv_bn_fused(x))
        return self.act(self.norm(self.conv(x)))

    def convert_to_deploy(self):
        if hasattr(self, "conv_bn_fused"):
            return
        c = self.conv
        fused = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, groups=c.groups, bias=True,
                          device=c.weight.device, dtype=c.weight.dtype)  # on the model's device (a GPU model too)
        w, b = fuse_conv_bn(c, self.norm)
        fused.weight.data.copy_(w)
        fused.bias.data.copy_(b)
        self.conv_bn_fused = fused
        del self.conv
        del self.norm


class VGGBlock(nn.Module):
    """3x3+BN plus 1x1+BN, summed, then SiLU (no identity branch); deploy() -> one 3x3 `conv`."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = ConvNormLayer(cin, cout, 3)
        self.conv2 = ConvNormLayer(cin, cout, 1)
        self.act = nn.SiLU()

    def forward(self, x):
        if hasattr(self, "conv"):
            return self.act(self.conv(x))
        return self.act(self.conv1(x) + self.conv2(x))

    def convert_to_deploy(self):
        if hasattr(self, "conv"):
            return
        w3, b3 = fuse_conv_bn(self.conv1.conv, self.conv1.norm)
        w1, b1 = fuse_conv_bn(self.conv2.conv, self.conv2.norm)
        conv = nn.Conv2d(w3.shape[1], w3.shape[0], 3, 1, 1, bias=True, device=w3.device, dtype=w3.dtype)
        conv.weight.data.copy_(w3 + F.pad(w1, [1, 1, 1, 1]))
        conv.bias.data.copy_(b3 + b1)
        self.conv = conv
        del self.conv1
        del self.conv2


class CSPLayer(nn.Module):
    def __init__(self, cin, cout, num_blocks):
        super().__init__()
        self.conv1 = ConvNormLayer(cin, cout, 1, act="silu")
        self.conv2 = ConvNormLayer(cin, cout, 1, act="silu")
        self.bottlenecks = nn.Sequential(*[VGGBlock(cout, cout) for _ in range(num_blocks)])
        self.conv3 = nn.Identity()

    def forward(self, x):
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


class RepNCSPELAN4(nn.Module):
    def __init__(self, c1, c2, c3, c4, n):
        super().__init__()
        self.half = c3 // 2
        self.cv1 = ConvNormLayer(c1, c3, 1, act="silu")
        self.cv2 = nn.Sequential(CSPLayer(c3 // 2, c4, n), ConvNormLayer(c4, c4, 3, act="silu"))
        self.cv3 = nn.Sequential(CSPLayer(c4, c4, n), ConvNormLayer(c4, c4, 3, act="silu"))
        self.cv4 = ConvNormLayer(c3 + 2 * c4, c2, 1, act="silu")

    def forward(self, x):
        y01 = self.cv1(x)
        y2 = self.cv2(y01[:, self.half:])
        y3 = self.cv3(y2)
        # cat([y0, y1, y2, y3]) with y0, y1 the halves of y01, concatenated as the whole: in channels_last
        # the halves are strided views, and a cat of mixed layouts runs ~4x slower (6 ms at 80x80 for S)
        return self.cv4(torch.cat([y01, y2, y3], dim=1))


class SCDown(nn.Module):
    """Pointwise conv then depthwise stride-2 conv (no activations)."""

    def __init__(self, cin, cout, k, stride):
        super().__init__()
        self.cv1 = ConvNormLayer(cin, cout, 1)
        self.cv2 = ConvNormLayer(cout, cout, k, stride, groups=cout)

    def forward(self, x):
        return self.cv2(self.cv1(x))


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer; position embedding added to queries and keys."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout=0.0, activation="gelu"):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = nn.GELU() if activation == "gelu" else nn.ReLU()

    def forward(self, src, pos):
        q = k = src + pos
        attn, _ = self.self_attn(q, k, value=src, need_weights=False)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout2(ffn))


class TransformerEncoder(nn.Module):
    def __init__(self, layer_args, num_layers):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(*layer_args) for _ in range(num_layers)])

    def forward(self, src, pos):
        for layer in self.layers:
            src = layer(src, pos)
        return src


def sincos_position_embedding(w: int, h: int, dim: int, temperature: float = 10000.0, device=None):
    """[1, h*w, dim] 2-D sin-cos embedding for a row-major h x w map: [sin(r w), cos(r w), sin(c w),
    cos(c w)] with r the row and c the column. For square maps this is exactly the published
    embedding; for non-square maps it stays the (row, column) embedding the model was trained with."""
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float32, device=device),
        torch.arange(w, dtype=torch.float32, device=device),
        indexing="ij",
    )
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
    a = rows.flatten()[:, None] * omega[None]
    b = cols.flatten()[:, None] * omega[None]
    return torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1)[None]


class HybridEncoder(nn.Module):
    def __init__(self, in_channels=(512, 1024, 2048), feat_strides=(8, 16, 32), hidden_dim=256, nhead=8,
                 dim_feedforward=1024, dropout=0.0, enc_act="gelu", use_encoder_idx=(2,), num_encoder_layers=1,
                 pe_temperature=10000, expansion=1.0, depth_mult=1.0, act="silu", eval_spatial_size=None):
        super().__init__()
        self.in_channels = list(in_channels)
        self.feat_strides = list(feat_strides)
        self.hidden_dim = hidden_dim
        self.use_encoder_idx = list(use_encoder_idx)
        self.pe_temperature = pe_temperature
        self.out_channels = [hidden_dim] * len(self.in_channels)
        self.out_strides = self.feat_strides
        self._pos_cache = {}

        self.input_proj = nn.ModuleList()
        for c in self.in_channels:
            self.input_proj.append(ConvBN(c, hidden_dim))

        layer_args = (hidden_dim, nhead, dim_feedforward, dropout, enc_act)
        self.encoder = nn.ModuleList(
            [TransformerEncoder(layer_args, num_encoder_layers) for _ in range(len(self.use_encoder_idx))]
        )

        c4 = round(expansion * hidden_dim // 2)
        n = round(3 * depth_mult)
        levels = len(self.in_channels)
        self.lateral_convs = nn.ModuleList()
        self.fpn_blocks = nn.ModuleList()
        for _ in range(levels - 1):
            self.lateral_convs.append(ConvNormLayer(hidden_dim, hidden_dim, 1))
            self.fpn_blocks.append(RepNCSPELAN4(hidden_dim * 2, hidden_dim, hidden_dim * 2, c4, n))
        self.downsample_convs = nn.ModuleList()
        self.pan_blocks = nn.ModuleList()
        for _ in range(levels - 1):
            self.downsample_convs.append(nn.Sequential(SCDown(hidden_dim, hidden_dim, 3, 2)))
            self.pan_blocks.append(RepNCSPELAN4(hidden_dim * 2, hidden_dim, hidden_dim * 2, c4, n))

    def position_embedding(self, h, w, device):
        if symbolic_shapes():  # export: computed in the graph from the traced map size, not cached
            return sincos_position_embedding(w, h, self.hidden_dim, self.pe_temperature, device)
        key = (h, w, str(device))
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_position_embedding(w, h, self.hidden_dim, self.pe_temperature, device)
        return self._pos_cache[key]

    def forward(self, feats):
        if len(feats) != len(self.in_channels):
            raise ValueError(f"HybridEncoder: expected {len(self.in_channels)} feature maps, got {len(feats)}")
        proj = [self.input_proj[i](f) for i, f in enumerate(feats)]
        for i, idx in enumerate(self.use_encoder_idx):
            b, c, h, w = proj[idx].shape
            src = proj[idx].flatten(2).permute(0, 2, 1)
            pos = self.position_embedding(h, w, src.device).to(src.dtype)
            out = self.encoder[i](src, pos)
            proj[idx] = out.permute(0, 2, 1).reshape(b, c, h, w).contiguous()

        levels = len(self.in_channels)
        inner = [proj[-1]]
        for idx in range(levels - 1, 0, -1):
            high = self.lateral_convs[levels - 1 - idx](inner[0])
            inner[0] = high
            # nearest x2; sizing to the finer map also covers inputs that are not multiples of 32
            up = F.interpolate(high, size=proj[idx - 1].shape[-2:], mode="nearest")
            inner.insert(0, self.fpn_blocks[levels - 1 - idx](torch.cat([up, proj[idx - 1]], dim=1)))
        outs = [inner[0]]
        for idx in range(levels - 1):
            down = self.downsample_convs[idx](outs[-1])
            outs.append(self.pan_blocks[idx](torch.cat([down, inner[idx + 1]], dim=1)))
        return outs
