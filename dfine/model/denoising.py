"""Contrastive denoising groups for training: noised copies of the ground truth as extra queries."""

from __future__ import annotations

import torch


def _cxcywh_to_xyxy(b):
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def _xyxy_to_cxcywh(b):
    x1, y1, x2, y2 = b.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)


def _inverse_sigmoid(x, eps=1e-5):
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def contrastive_denoising_group(targets, num_classes, num_queries, class_embed, num_denoising=100,
                                label_noise_ratio=0.5, box_noise_scale=1.0):
    """Build the denoising queries.

    Each group holds every ground truth twice: a positive copy (box noise < half the size) and a
    negative copy (noise between one and two half-sizes). Returns (content [B, N, C], reference
    logits [B, N, 4], attn_mask [N+Q, N+Q] bool (True = blocked), dn_meta) or four Nones when no
    image has a ground truth."""
    if num_denoising <= 0:
        return None, None, None, None
    counts = [len(t["labels"]) for t in targets]
    max_gt = max(counts) if counts else 0
    if max_gt == 0:
        return None, None, None, None
    device = class_embed.weight.device
    num_group = max(1, num_denoising // max_gt)
    bs = len(targets)

    labels = torch.full((bs, max_gt), num_classes, dtype=torch.int64, device=device)
    boxes = torch.zeros((bs, max_gt, 4), device=device)
    pad = torch.zeros((bs, max_gt), dtype=torch.bool, device=device)
    for i, (t, n) in enumerate(zip(targets, counts)):
        if n:
            labels[i, :n] = t["labels"].to(device)
            boxes[i, :n] = t["boxes"].to(device)
            pad[i, :n] = True

    # per group: positives (first max_gt) then negatives (next max_gt)
    labels = labels.repeat(1, 2 * num_group)
    boxes = boxes.repeat(1, 2 * num_group, 1)
    pad = pad.repeat(1, 2 * num_group)
    negative = torch.zeros(bs, 2 * max_gt, 1, device=device)
    negative[:, max_gt:] = 1
    negative = negative.repeat(1, num_group, 1)
    num_dn = max_gt * 2 * num_group

    if label_noise_ratio > 0:
        flip = torch.rand_like(labels, dtype=torch.float) < (label_noise_ratio * 0.5)
        random_labels = torch.randint_like(labels, 0, num_classes)
        labels = torch.where(flip & pad, random_labels, labels)

    if box_noise_scale > 0:
        xyxy = _cxcywh_to_xyxy(boxes)
        half = boxes[..., 2:].repeat(1, 1, 2) * 0.5 * box_noise_scale
        sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
        magnitude = torch.rand_like(boxes) + negative  # [0,1) positives, [1,2) negatives
        xyxy = (xyxy + sign * magnitude * half).clip(0.0, 1.0)
        boxes = _xyxy_to_cxcywh(xyxy).abs()
    ref_unact = _inverse_sigmoid(boxes)
    content = class_embed(labels)

    total = num_dn + num_queries
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    mask[num_dn:, :num_dn] = True  # matching queries never see denoising queries
    group = 2 * max_gt
    for g in range(num_group):
        lo, hi = group * g, group * (g + 1)
        mask[lo:hi, :lo] = True
        mask[lo:hi, hi:num_dn] = True

    positive_idx = []
    for n in counts:
        base = torch.arange(n, dtype=torch.int64, device=device)
        positive_idx.append(torch.cat([base + group * g for g in range(num_group)]) if n else base)
    dn_meta = {"dn_positive_idx": positive_idx, "dn_num_group": num_group, "dn_num_split": [num_dn, num_queries]}
    return content, ref_unact, mask, dn_meta
