"""Fine-grained Distribution Refinement math in plain PyTorch.

`fdr_decode` has the same semantics as the fused op `dfine.ops.fdr_decode(pred_corners, project,
ref_boxes, reg_scale, lqe_topk=4, backend=...)`, so the decoder can swap one for the other.
"""

from __future__ import annotations

import torch


def weighting_function(reg_max: int, up: torch.Tensor, reg_scale) -> torch.Tensor:
    """The reg_max+1 bin values W: 0 in the middle, +-2|up||reg_scale| at the ends, geometric between."""
    up = torch.as_tensor(up)
    reg_scale = torch.as_tensor(reg_scale, device=up.device)
    ub1 = (up.abs() * reg_scale.abs()).to(torch.float32).reshape(())
    ub2 = ub1 * 2
    step = (ub1 + 1) ** (2.0 / (reg_max - 2))
    half = reg_max // 2
    left = [-(step ** i) + 1 for i in range(half - 1, 0, -1)]
    right = [step ** i - 1 for i in range(1, half)]
    values = [-ub2] + left + [torch.zeros_like(ub1)] + right + [ub2]
    return torch.stack([v.reshape(()) for v in values]).to(up.dtype if up.is_floating_point() else torch.float32)


def distance2bbox(points: torch.Tensor, distance: torch.Tensor, reg_scale) -> torch.Tensor:
    """Reference boxes (cx,cy,w,h) moved by edge distances (l,t,r,b) in units of w/reg_scale -> cxcywh."""
    rs = abs(reg_scale) if not torch.is_tensor(reg_scale) else reg_scale.abs()
    x1 = points[..., 0] - (0.5 * rs + distance[..., 0]) * (points[..., 2] / rs)
    y1 = points[..., 1] - (0.5 * rs + distance[..., 1]) * (points[..., 3] / rs)
    x2 = points[..., 0] + (0.5 * rs + distance[..., 2]) * (points[..., 2] / rs)
    y2 = points[..., 1] + (0.5 * rs + distance[..., 3]) * (points[..., 3] / rs)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)


def fdr_decode(pred_corners: torch.Tensor, project: torch.Tensor, ref_boxes: torch.Tensor, reg_scale, lqe_topk: int = 4):
    """pred_corners [..., 4*(R+1)] logits, project [R+1], ref_boxes [..., 4] cxcywh.

    Returns (boxes [..., 4] cxcywh, lqe_stats [..., 4, lqe_topk+1]): per edge a softmax over the
    bins, the expectation with `project` moves the edge (distance2bbox), and the top-k bin
    probabilities plus their mean are the localization-quality statistics."""
    bins = project.shape[-1]
    probs = pred_corners.reshape(*pred_corners.shape[:-1], 4, bins).softmax(-1)
    distance = (probs * project.to(probs.dtype)).sum(-1)
    boxes = distance2bbox(ref_boxes, distance, reg_scale)
    top = probs.topk(lqe_topk, dim=-1).values
    stats = torch.cat([top, top.mean(-1, keepdim=True)], dim=-1)
    return boxes, stats
