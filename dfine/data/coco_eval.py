"""COCO bbox evaluation of post-processed detections (faster-coco-eval when importable, else pycocotools).

Input per image: a dict with "boxes" (xyxy, original image pixels), "scores" and "labels", as the
post-processor returns them, plus the image's id. Labels are either the model's contiguous labels
(default; mapped back to the JSON's category ids with `label_to_category_id`) or already category ids
(`labels_are_category_ids=True`, e.g. a post-processor run with the published remap to COCO ids).

Under torch.distributed every rank calls update() on its share and summarize() gathers all results
(all_gather_object); images seen twice (DistributedSampler padding) are counted once.
An evaluation with no detections at all returns 0 for every metric instead of failing.
After summarize(), analyze() gives the per-class results and the confusion matrix from the same
evaluation (dfine.data.coco_analysis).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os

import numpy as np
import torch

from dfine.data.coco import coco_api_from_dict, load_coco_json
from dfine.data.coco_analysis import EvalAnalysis, analyze_evaluation

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _backend():
    try:
        from faster_coco_eval import COCO, COCOeval_faster

        def make_eval(gt, dt):
            return COCOeval_faster(gt, dt, iouType="bbox", print_function=lambda *a, **k: None)

        return "faster_coco_eval", COCO, make_eval
    except ImportError:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return "pycocotools", COCO, lambda gt, dt: COCOeval(gt, dt, iouType="bbox")


def _gt_dict(coco_gt) -> dict:
    """The ground-truth annotation dict from a path, a dict, a pycocotools/faster COCO or a dataset."""
    if isinstance(coco_gt, (str, os.PathLike)):
        return load_coco_json(coco_gt)
    if isinstance(coco_gt, dict):
        return coco_gt
    if hasattr(coco_gt, "coco"):  # a CocoDetection
        coco_gt = coco_gt.coco
    if hasattr(coco_gt, "dataset"):
        return coco_gt.dataset
    raise TypeError(f"coco_gt must be a path, a dict, a COCO object or a CocoDetection, got {type(coco_gt).__name__}")


def results_to_coco_json(results, image_ids, label_to_category_id=None, labels_are_category_ids=False) -> list[dict]:
    """COCO result records [{image_id, category_id, bbox: [x, y, w, h], score}]."""
    if len(results) != len(image_ids):
        raise ValueError(f"results has {len(results)} entries but image_ids has {len(image_ids)}")
    if not labels_are_category_ids and label_to_category_id is None:
        raise ValueError("label_to_category_id is required unless labels_are_category_ids=True")
    records = []
    for result, image_id in zip(results, image_ids):
        boxes = torch.as_tensor(result["boxes"]).detach().to("cpu", torch.float64).reshape(-1, 4)
        scores = torch.as_tensor(result["scores"]).detach().to("cpu", torch.float64).reshape(-1)
        labels = torch.as_tensor(result["labels"]).detach().to("cpu", torch.int64).reshape(-1)
        if not (boxes.shape[0] == scores.shape[0] == labels.shape[0]):
            raise ValueError(
                f"image_id {int(image_id)}: boxes {tuple(boxes.shape)}, scores {tuple(scores.shape)} and "
                f"labels {tuple(labels.shape)} must have the same number of detections"
            )
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for box, score, label in zip(xywh, scores.tolist(), labels.tolist()):
            if labels_are_category_ids:
                category_id = label
            elif label in label_to_category_id:
                category_id = label_to_category_id[label]
            else:
                raise ValueError(f"image_id {int(image_id)}: predicted label {label} has no category id "
                                 f"(known labels 0..{max(label_to_category_id)})")
            records.append({"image_id": int(image_id), "category_id": int(category_id), "bbox": box, "score": score})
    return records


class CocoEvaluator:
    def __init__(self, coco_gt, label_to_category_id=None, labels_are_category_ids: bool = False):
        # a private copy: faster-coco-eval adds keys ("ignore") to the ground-truth records it is given
        self.gt = copy.deepcopy(_gt_dict(coco_gt))
        if label_to_category_id is None and hasattr(coco_gt, "label_to_category_id"):
            label_to_category_id = coco_gt.label_to_category_id
        self.label_to_category_id = label_to_category_id
        self.labels_are_category_ids = labels_are_category_ids
        self.backend_name, self._coco_cls, self._make_eval = _backend()
        self.reset()

    def reset(self) -> None:
        self.records: list[dict] = []
        self.image_ids: list[int] = []
        self._last = None  # (COCOeval or None, records, image ids, stats) of the last summarize()

    def update(self, results, image_ids) -> None:
        """results: list of {"boxes", "scores", "labels"} (or a dict image_id -> that); image_ids: the
        ids (ints or 0-d tensors) of those images, in the same order."""
        if isinstance(results, dict):
            image_ids, results = list(results.keys()), list(results.values())
        image_ids = [int(i) for i in image_ids]
        self.records.extend(
            results_to_coco_json(results, image_ids, self.label_to_category_id, self.labels_are_category_ids)
        )
        self.image_ids.extend(image_ids)

    def _gathered(self) -> tuple[list[dict], list[int]]:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            parts = [(self.records, self.image_ids)]
        else:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (self.records, self.image_ids))
        seen, records, image_ids = set(), [], []
        for part_records, part_ids in parts:
            fresh = {i for i in part_ids if i not in seen}
            records.extend(r for r in part_records if r["image_id"] in fresh)
            image_ids.extend(sorted(fresh))
            seen |= fresh
        return records, image_ids

    def summarize(self) -> dict:
        """Gathers (when distributed) and returns {AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl}
        (0..1). Every rank gets the same dict."""
        records, image_ids = self._gathered()
        if not records:
            stats = {name: 0.0 for name in STAT_NAMES}
            self._last = (None, records, image_ids, stats)
            return stats
        known_images = {img["id"] for img in self.gt["images"]}
        unknown = sorted(set(image_ids) - known_images)
        if unknown:
            raise ValueError(f"image ids {unknown[:10]} are not in the ground-truth annotations")
        records = [dict(r) for r in records]  # loadRes adds keys to the records it gets
        with contextlib.redirect_stdout(io.StringIO()):
            gt = self._coco_cls(self.gt) if self.backend_name == "faster_coco_eval" else self._pycoco_gt()
            dt = gt.loadRes(records)
            evaluator = self._make_eval(gt, dt)
            evaluator.params.imgIds = sorted(set(image_ids))
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = np.asarray(evaluator.stats, dtype=np.float64)[: len(STAT_NAMES)]
        stats = {name: float(v) for name, v in zip(STAT_NAMES, stats)}
        self._last = (evaluator, records, image_ids, stats)
        return stats

    def analyze(self, score_threshold: float = 0.5, iou_threshold: float = 0.5) -> EvalAnalysis:
        """Per-class AP / AP50 / AP75 / AR100 / R50, precision-recall curves and the confusion matrix at
        ``score_threshold`` (detections) and ``iou_threshold`` (matches) of the last summarize(), read from
        the COCO evaluator's own arrays and matches (dfine.data.coco_analysis)."""
        if self._last is None:
            raise RuntimeError("CocoEvaluator.analyze: call summarize() first")
        evaluator, records, image_ids, stats = self._last
        return analyze_evaluation(self.gt, evaluator, records, image_ids, score_threshold, iou_threshold,
                                  overall=stats)

    def _pycoco_gt(self):
        return coco_api_from_dict(self.gt)


def evaluate_detections(coco_gt, results, image_ids, label_to_category_id=None, labels_are_category_ids=False) -> dict:
    """One-shot form of CocoEvaluator: update with everything, then summarize."""
    evaluator = CocoEvaluator(coco_gt, label_to_category_id, labels_are_category_ids)
    evaluator.update(results, image_ids)
    return evaluator.summarize()
