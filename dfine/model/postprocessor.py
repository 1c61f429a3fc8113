"""Post-processing: top-k over queries x classes, boxes to pixels of the original image."""

from __future__ import annotations

import torch
import torch.nn as nn

from dfine.ops._backend import symbolic_shapes

# COCO category ids of the 80 contiguous training labels
MSCOCO_CATEGORY_IDS = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
    33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
    60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
]


def box_cxcywh_to_xyxy(b):
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


class DFINEPostProcessor(nn.Module):
    def __init__(self, num_classes=80, use_focal_loss=True, num_top_queries=300, remap_mscoco_category=False):
        super().__init__()
        if not use_focal_loss:
            raise ValueError("DFINEPostProcessor: only use_focal_loss=True (sigmoid scores) is supported")
        self.num_classes = num_classes
        self.num_top_queries = num_top_queries
        self.remap_mscoco_category = remap_mscoco_category
        self.deploy_mode = False

    def deploy(self):
        self.deploy_mode = True
        return self

    def forward(self, outputs, orig_target_sizes):
        """orig_target_sizes [B, 2] as (w, h). Returns a list of {labels, boxes, scores} per image
        (deploy mode: the tuple (labels, boxes, scores))."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if isinstance(orig_target_sizes, torch.Tensor):
            sizes = orig_target_sizes.to(boxes.device)
        else:
            sizes = torch.as_tensor(orig_target_sizes, device=boxes.device)
        if not symbolic_shapes() and (sizes.dim() != 2 or sizes.shape[-1] != 2):
            raise ValueError(f"DFINEPostProcessor: orig_target_sizes must be [B, 2] (w, h), got {tuple(sizes.shape)}")
        boxes = box_cxcywh_to_xyxy(boxes) * sizes.repeat(1, 2).unsqueeze(1).to(boxes.dtype)
        scores = torch.sigmoid(logits)
        scores, index = scores.flatten(1).topk(self.num_top_queries, dim=-1)
        labels = index % self.num_classes
        query = index // self.num_classes
        boxes = boxes.gather(1, query.unsqueeze(-1).expand(-1, -1, 4))
        if self.deploy_mode:
            return labels, boxes, scores
        if self.remap_mscoco_category:
            table = torch.tensor(MSCOCO_CATEGORY_IDS, device=labels.device)
            labels = table[labels]
        return [{"labels": l, "boxes": b, "scores": s} for l, b, s in zip(labels, boxes, scores)]
