"""Hungarian matching between predictions and ground truth (one image at a time, scipy's solver).

Cost = 5 * L1(cxcywh) + 2 * focal classification cost + 2 * (-GIoU), as in the published D-FINE.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

Indices = List[Tuple[torch.Tensor, torch.Tensor]]


class HungarianMatcher(nn.Module):
    def __init__(self, weight_dict: Dict[str, float] | None = None, alpha: float = 0.25, gamma: float = 2.0,
                 use_focal_loss: bool = True):
        super().__init__()
        weight_dict = weight_dict or {"cost_class": 2, "cost_bbox": 5, "cost_giou": 2}
        self.cost_class = float(weight_dict["cost_class"])
        self.cost_bbox = float(weight_dict["cost_bbox"])
        self.cost_giou = float(weight_dict["cost_giou"])
        self.alpha = alpha
        self.gamma = gamma
        self.use_focal_loss = use_focal_loss

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]) -> Dict[str, Indices]:
        """Returns ``{"indices": [(query_idx, target_idx) per image]}`` (int64 tensors on the CPU)."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        bs, num_queries = logits.shape[:2]
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            return {"indices": [(empty, empty) for _ in targets]}

        tgt_ids = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets])
        out_boxes = boxes.flatten(0, 1)
        if self.use_focal_loss:
            prob = logits.flatten(0, 1).sigmoid()[:, tgt_ids]
            neg = (1 - self.alpha) * prob**self.gamma * -(1 - prob + 1e-8).log()
            pos = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()
            cost_class = pos - neg
        else:
            cost_class = -logits.flatten(0, 1).softmax(-1)[:, tgt_ids]
        cost_bbox = torch.cdist(out_boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(
            box_convert(out_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
        )
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        cost = torch.nan_to_num(cost.view(bs, num_queries, -1).cpu(), nan=1.0)

        indices = []
        for i, c in enumerate(cost.split(sizes, -1)):
            rows, cols = linear_sum_assignment(c[i].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return {"indices": indices}
