"""The D-FINE training criterion: VFL, L1, GIoU, FGL and DDF with GO-LSD matching.

``criterion(outputs, targets)`` returns a dict of loss terms, each already multiplied by its weight
and named as in the published release (``loss_vfl``, ``loss_fgl_aux_0``, ``loss_ddf_dn_2``,
``loss_giou_pre``, ``loss_bbox_enc_0``, ...); the training loss is their plain sum.

Matching: every decoder layer, the pre-decoder head and the encoder head are Hungarian-matched on
their own. VFL uses each layer's own matches; the box (L1, GIoU) and localisation (FGL, DDF) losses
of *every* layer use the GO-LSD union of all those matches (``go_indices``). Denoising outputs use
the fixed matches of their groups. FGL and DDF run through the fused ops ``dfine.ops.fgl_loss`` and
``dfine.ops.ddf_loss`` (backend chosen by ``backend=``).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, box_iou, generalized_box_iou

from dfine.config import config_section, config_value
from dfine.loss.matcher import HungarianMatcher, Indices
from dfine.ops import ddf_loss, fdr_targets, fgl_loss, weighting_function

_DEFAULT_WEIGHTS = {"loss_vfl": 1, "loss_bbox": 5, "loss_giou": 2, "loss_fgl": 0.15, "loss_ddf": 1.5}


def _xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


def _paired_iou(boxes1_cxcywh: torch.Tensor, boxes2_cxcywh: torch.Tensor) -> torch.Tensor:
    """IoU of boxes1[i] with boxes2[i] (same arithmetic as the diagonal of the full IoU matrix)."""
    if boxes1_cxcywh.numel() == 0:
        return boxes1_cxcywh.new_zeros(0)
    return torch.diag(box_iou(_xyxy(boxes1_cxcywh), _xyxy(boxes2_cxcywh)))


def _world_mean_count(count: int, device) -> float:
    """Number of boxes averaged over processes (all-reduced when distributed), at least 1."""
    value = torch.as_tensor([float(count)], device=device)
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value)
        world = dist.get_world_size()
    return torch.clamp(value / world, min=1).item()


class DFINECriterion(nn.Module):
    def __init__(
        self,
        matcher: HungarianMatcher,
        weight_dict: Optional[Dict[str, float]] = None,
        losses: Tuple[str, ...] = ("vfl", "boxes", "local"),
        alpha: float = 0.75,
        gamma: float = 2.0,
        num_classes: int = 80,
        reg_max: int = 32,
        temperature: float = 5.0,
        backend: str = "auto",
    ):
        super().__init__()
        self.matcher = matcher
        self.weight_dict = dict(weight_dict or _DEFAULT_WEIGHTS)
        self.losses = list(losses)
        self.alpha = alpha
        self.gamma = gamma
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.temperature = temperature
        self.backend = backend
        self._reset_cache()

    def _reset_cache(self):
        # FGL targets depend only on the fixed layer-0 reference and the GO matches, so they are
        # computed once per forward (one cache for the matching queries, one for denoising).
        self._fgl_targets = None
        self._fgl_targets_dn = None
        self._num_pos = None
        self._num_neg = None
        self._share = 1.0

    # ----------------------------------------------------------------------------------------
    # Individual losses. Each returns unweighted terms; ``forward`` applies the weights.

    @staticmethod
    def _matched(indices: Indices) -> Tuple[torch.Tensor, torch.Tensor]:
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        query_idx = torch.cat([src for src, _ in indices])
        return batch_idx, query_idx

    @staticmethod
    def _matched_targets(targets, indices, key: str) -> torch.Tensor:
        return torch.cat([t[key][j] for t, (_, j) in zip(targets, indices)], dim=0)

    def loss_vfl(self, outputs, targets, indices: Indices, num_boxes: float) -> Dict[str, torch.Tensor]:
        logits = outputs["pred_logits"]
        idx = self._matched(indices)
        matched_boxes = outputs["pred_boxes"][idx]
        gt_boxes = self._matched_targets(targets, indices, "boxes")
        ious = _paired_iou(matched_boxes, gt_boxes).detach()

        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[idx] = self._matched_targets(targets, indices, "labels")
        onehot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1]
        score = torch.zeros(logits.shape[:2], dtype=logits.dtype, device=logits.device)
        score[idx] = ious.to(score.dtype)
        target = score.unsqueeze(-1) * onehot
        weight = self.alpha * logits.sigmoid().detach().pow(self.gamma) * (1 - onehot) + target
        loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none")
        return {"loss_vfl": loss.mean(1).sum() * logits.shape[1] / num_boxes}

    def loss_boxes(self, outputs, targets, indices: Indices, num_boxes: float) -> Dict[str, torch.Tensor]:
        idx = self._matched(indices)
        pred = outputs["pred_boxes"][idx]
        gt = self._matched_targets(targets, indices, "boxes")
        loss_bbox = F.l1_loss(pred, gt, reduction="none").sum() / num_boxes
        if pred.numel() == 0:
            loss_giou = pred.sum() * 0
        else:
            loss_giou = (1 - torch.diag(generalized_box_iou(_xyxy(pred), _xyxy(gt)))).sum() / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def loss_local(self, outputs, targets, indices: Indices, num_boxes: float) -> Dict[str, torch.Tensor]:
        """FGL on the matched queries and DDF (GO-LSD distillation) over all queries."""
        if "pred_corners" not in outputs:
            return {}
        bins = self.reg_max + 1
        is_dn = outputs.get("is_dn", False)
        idx = self._matched(indices)
        gt_boxes = self._matched_targets(targets, indices, "boxes")
        pred_corners = outputs["pred_corners"][idx].reshape(-1, bins)

        cache = self._fgl_targets_dn if is_dn else self._fgl_targets
        if cache is None:
            project = weighting_function(self.reg_max, outputs["up"], outputs["reg_scale"])
            cache = fdr_targets(
                outputs["ref_points"][idx].detach(), _xyxy(gt_boxes), project, outputs["reg_scale"], self.reg_max
            )
            if is_dn:
                self._fgl_targets_dn = cache
            else:
                self._fgl_targets = cache
        target_bins, weight_left, weight_right = cache

        ious = _paired_iou(outputs["pred_boxes"][idx], gt_boxes).detach()
        iou_per_edge = ious.unsqueeze(-1).repeat(1, 4).reshape(-1)
        losses = {
            "loss_fgl": fgl_loss(
                pred_corners, target_bins.reshape(-1), weight_left.reshape(-1), weight_right.reshape(-1),
                weight=iou_per_edge, reduction="sum", backend=self.backend,
            ) / num_boxes
        }

        if "teacher_corners" in outputs:
            student = outputs["pred_corners"].reshape(-1, bins)
            teacher = outputs["teacher_corners"].reshape(-1, bins)
            if torch.equal(student, teacher):  # the last layer is its own teacher
                losses["loss_ddf"] = student.sum() * 0
                return losses
            # Per-query weight: the teacher's confidence, or for matched queries the IoU of this
            # layer's box with its ground truth.
            query_weight = outputs["teacher_logits"].sigmoid().max(dim=-1)[0]
            matched = torch.zeros_like(query_weight, dtype=torch.bool)
            matched[idx] = True
            query_weight[idx] = ious.to(query_weight.dtype)
            edge_weight = query_weight.unsqueeze(-1).repeat(1, 1, 4).reshape(-1).detach()
            matched = matched.unsqueeze(-1).repeat(1, 1, 4).reshape(-1)
            kl = ddf_loss(student, teacher, weight=edge_weight, temperature=self.temperature,
                          reduction="none", backend=self.backend)
            if not is_dn:
                batch_scale = 8 / outputs["pred_boxes"].shape[0]  # keeps the balance independent of batch size
                self._num_pos = (matched.sum() * batch_scale) ** 0.5
                self._num_neg = ((~matched).sum() * batch_scale) ** 0.5
            pos = kl[matched].mean() if matched.any() else 0
            neg = kl[~matched].mean() if (~matched).any() else 0
            losses["loss_ddf"] = (pos * self._num_pos + neg * self._num_neg) / (self._num_pos + self._num_neg)
            if self._share != 1.0:  # a mean over this batch's queries: its share of the optimizer step
                losses["loss_ddf"] = losses["loss_ddf"] * self._share
        return losses

    def _get_loss(self, name, outputs, targets, indices, num_boxes):
        fn = {"vfl": self.loss_vfl, "boxes": self.loss_boxes, "local": self.loss_local}.get(name)
        if fn is None:
            raise ValueError(f"DFINECriterion: unknown loss {name!r}; expected one of vfl, boxes, local")
        return fn(outputs, targets, indices, num_boxes)

    def _weighted(self, terms: Dict[str, torch.Tensor], suffix: str = "") -> Dict[str, torch.Tensor]:
        return {k + suffix: v * self.weight_dict[k] for k, v in terms.items() if k in self.weight_dict}

    # ----------------------------------------------------------------------------------------

    @staticmethod
    def go_indices(indices: Indices, indices_aux_list: List[Indices]) -> Indices:
        """GO-LSD union of matches: per image, every (query, gt) pair proposed by any layer, keeping
        for each query the gt it was matched to most often (ties: the smaller gt index)."""
        merged = indices
        for aux in indices_aux_list:
            merged = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(merged, aux)]
        results = []
        for rows, cols in merged:
            pairs = torch.stack([rows, cols], dim=1)
            if pairs.numel() == 0:
                results.append((rows.new_zeros(0), cols.new_zeros(0)))
                continue
            unique, counts = torch.unique(pairs, return_counts=True, dim=0)
            order = torch.argsort(counts, descending=True, stable=True)
            chosen: Dict[int, int] = {}
            for row, col in unique[order].tolist():
                chosen.setdefault(row, col)
            results.append(
                (torch.tensor(list(chosen.keys()), dtype=torch.int64), torch.tensor(list(chosen.values()), dtype=torch.int64))
            )
        return results

    @staticmethod
    def denoising_indices(dn_meta, targets) -> Indices:
        positive_idx, num_group = dn_meta["dn_positive_idx"], dn_meta["dn_num_group"]
        indices = []
        for i, t in enumerate(targets):
            n = len(t["labels"])
            if n > 0:
                gt_idx = torch.arange(n, dtype=torch.int64, device=t["labels"].device).tile(num_group)
                if len(positive_idx[i]) != len(gt_idx):
                    raise ValueError(
                        f"DFINECriterion: image {i} has {len(positive_idx[i])} denoising positives but "
                        f"{n} targets x {num_group} groups"
                    )
                indices.append((positive_idx[i], gt_idx))
            else:
                empty = torch.zeros(0, dtype=torch.int64, device=t["labels"].device)
                indices.append((empty, empty))
        return indices

    def forward(self, outputs: Dict, targets: List[Dict[str, torch.Tensor]], step_num_boxes: Optional[float] = None,
                share: float = 1.0) -> Dict[str, torch.Tensor]:
        """Loss terms of one batch. With gradient accumulation the batch is one of several whose summed gradients
        make one optimizer step, as processes do under DDP: `step_num_boxes` is then the step's box count (world
        mean, over all its batches) that normalises the terms summed over boxes (VFL, L1, GIoU, FGL), so the
        batches' losses add up to the step's; the GO-LSD box count is this batch's, scaled by the same factor; the
        DDF term, a mean over this batch's queries, is weighted by `share` (its fraction of the step's images)."""
        self._reset_cache()
        self._share = float(share)
        device = outputs["pred_logits"].device
        main = {k: v for k, v in outputs.items() if "aux" not in k}
        indices = self.matcher(main, targets)["indices"]
        indices = [(i.to(device), j.to(device)) for i, j in indices]

        layer_indices, enc_indices = [], []
        indices_go, num_boxes_go = indices, None
        if "aux_outputs" in outputs:
            for aux in outputs["aux_outputs"] + [outputs["pre_outputs"]]:
                layer_indices.append([(i.to(device), j.to(device)) for i, j in self.matcher(aux, targets)["indices"]])
            for aux in outputs.get("enc_aux_outputs", []):
                enc_indices.append([(i.to(device), j.to(device)) for i, j in self.matcher(aux, targets)["indices"]])
            indices_go = self.go_indices(indices, layer_indices + enc_indices)
            indices_go = [(i.to(device), j.to(device)) for i, j in indices_go]
            num_boxes_go = _world_mean_count(sum(len(i) for i, _ in indices_go), device)
        num_boxes = _world_mean_count(sum(len(t["labels"]) for t in targets), device)
        if step_num_boxes is not None:
            if num_boxes_go is not None:
                num_boxes_go = num_boxes_go * step_num_boxes / num_boxes
            num_boxes = max(float(step_num_boxes), 1.0)
        if num_boxes_go is None:
            num_boxes_go = num_boxes

        def pick(loss, own):
            return (indices_go, num_boxes_go) if loss in ("boxes", "local") else (own, num_boxes)

        losses: Dict[str, torch.Tensor] = {}
        for loss in self.losses:
            idx, n = pick(loss, indices)
            losses.update(self._weighted(self._get_loss(loss, outputs, targets, idx, n)))

        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            aux = dict(aux, up=outputs["up"], reg_scale=outputs["reg_scale"])
            for loss in self.losses:
                idx, n = pick(loss, layer_indices[i])
                losses.update(self._weighted(self._get_loss(loss, aux, targets, idx, n), f"_aux_{i}"))

        if "pre_outputs" in outputs:
            for loss in self.losses:
                idx, n = pick(loss, layer_indices[-1])
                losses.update(self._weighted(self._get_loss(loss, outputs["pre_outputs"], targets, idx, n), "_pre"))

        if "enc_aux_outputs" in outputs:
            class_agnostic = outputs.get("enc_meta", {}).get("class_agnostic", False)
            enc_targets = targets
            saved_classes = self.num_classes
            if class_agnostic:
                self.num_classes = 1
                enc_targets = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
            try:
                for i, aux in enumerate(outputs["enc_aux_outputs"]):
                    for loss in self.losses:
                        idx, n = (indices_go, num_boxes_go) if loss == "boxes" else (enc_indices[i], num_boxes)
                        terms = self._get_loss(loss, aux, enc_targets, idx, n)
                        losses.update(self._weighted(terms, f"_enc_{i}"))
            finally:
                self.num_classes = saved_classes

        if "dn_outputs" in outputs:
            dn_indices = self.denoising_indices(outputs["dn_meta"], targets)
            dn_num_boxes = num_boxes * outputs["dn_meta"]["dn_num_group"]
            dn_num_boxes = dn_num_boxes if dn_num_boxes > 0 else 1
            for i, aux in enumerate(outputs["dn_outputs"]):
                aux = dict(aux, is_dn=True, up=outputs["up"], reg_scale=outputs["reg_scale"])
                for loss in self.losses:
                    losses.update(self._weighted(self._get_loss(loss, aux, targets, dn_indices, dn_num_boxes), f"_dn_{i}"))
            if "dn_pre_outputs" in outputs:
                for loss in self.losses:
                    terms = self._get_loss(loss, outputs["dn_pre_outputs"], targets, dn_indices, dn_num_boxes)
                    losses.update(self._weighted(terms, "_dn_pre"))

        # non-finite terms are returned as they are: the trainer's guard must see them (and skip the step)
        return losses


def build_criterion(cfg: Dict, backend: Optional[str] = None) -> DFINECriterion:
    """Build the criterion from a loaded config (section ``DFINECriterion`` and its ``matcher``; defaults from
    `dfine.config.schema`)."""
    section = config_section(cfg, "DFINECriterion")
    matcher_cfg = section["matcher"]
    matcher = HungarianMatcher(weight_dict=matcher_cfg["weight_dict"], alpha=matcher_cfg["alpha"],
                               gamma=matcher_cfg["gamma"], use_focal_loss=matcher_cfg["use_focal_loss"])
    if backend is None:
        backend = config_value(cfg, "ops_backend")
    return DFINECriterion(
        matcher,
        weight_dict=section["weight_dict"],
        losses=tuple(section["losses"]),
        alpha=section["alpha"],
        gamma=section["gamma"],
        num_classes=section["num_classes"],
        reg_max=section["reg_max"],
        backend=backend,
    )
