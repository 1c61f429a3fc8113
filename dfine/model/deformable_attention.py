"""Multi-scale deformable cross-attention of D-FINE: per-level point counts, no value/output
projection; the sampling itself runs through the fused op `dfine.ops.ms_deform_attn` (method
"default", bilinear) or `dfine.ops.ms_deform_attn_discrete` (method "discrete", nearest cell)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from dfine.ops import ms_deform_attn, ms_deform_attn_discrete
from dfine.ops._backend import symbolic_shapes


class MSDeformableAttention(nn.Module):
    METHODS = ("default", "discrete")

    def __init__(self, embed_dim=256, num_heads=8, num_levels=3, num_points=(3, 6, 3), offset_scale=0.5,
                 backend="auto", method="default"):
        super().__init__()
        if method not in self.METHODS:
            raise ValueError(f"MSDeformableAttention: method must be one of {self.METHODS}, got {method!r}")
        if isinstance(num_points, int):
            num_points = [num_points] * num_levels
        if len(num_points) != num_levels:
            raise ValueError(f"MSDeformableAttention: num_points needs {num_levels} entries, got {num_points}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points_list = list(num_points)
        self.total_points = sum(self.num_points_list)
        self.offset_scale = offset_scale
        self.backend = backend
        self.method = method
        scale = [1.0 / p for p in self.num_points_list for _ in range(p)]
        self.register_buffer("num_points_scale", torch.tensor(scale, dtype=torch.float32))
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * self.total_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * self.total_points)
        # a module, so that dfine.deploy.optimize_for_cpu can swap in a faster CPU form
        self.weight_softmax = nn.Softmax(dim=-1)
        self.reset_parameters()
        if method == "discrete":
            # as published: rounded sampling points give the offsets no gradient, so they stay frozen
            self.sampling_offsets.requires_grad_(False)

    def reset_parameters(self):
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        dirs = torch.stack([angles.cos(), angles.sin()], -1)
        dirs = dirs / dirs.abs().max(-1, keepdim=True).values
        # point j of a level is pushed (j+1) steps along its head's direction
        steps = torch.cat([torch.arange(1, p + 1, dtype=torch.float32) for p in self.num_points_list])
        bias = dirs[:, None, :] * steps[None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)

    def forward(self, query, reference_points, value, spatial_shapes):
        """query [B,Q,C]; reference_points [B,Q,1,4] (cx,cy,w,h in [0,1]); value [B,S,C]
        (memory); spatial_shapes list of (H, W). Returns [B,Q,C]."""
        b, q, _ = query.shape
        m, p = self.num_heads, self.total_points
        offsets = self.sampling_offsets(query).reshape(b, q, m, p, 2)
        weights = self.weight_softmax(self.attention_weights(query).reshape(b, q, m, p))
        if not symbolic_shapes() and reference_points.shape[-1] != 4:
            raise ValueError(
                f"MSDeformableAttention: reference_points must end in 4 (cx, cy, w, h), got {tuple(reference_points.shape)}"
            )
        ref = reference_points.reshape(b, q, 1, 1, 4)
        step = self.num_points_scale.to(query.dtype)[:, None] * ref[..., 2:] * self.offset_scale
        locations = ref[..., :2] + offsets * step
        v = value.reshape(b, value.shape[1], m, self.embed_dim // m)
        if self.method == "discrete":
            return ms_deform_attn_discrete(v, spatial_shapes, locations, weights, self.num_points_list)
        return ms_deform_attn(v, spatial_shapes, locations, weights, self.num_points_list, backend=self.backend)
