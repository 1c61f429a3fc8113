"""Per-class evaluation, precision-recall curves and the confusion matrix, read from the COCO
evaluator's own results (no matcher of our own).

* Per-class AP / AP50 / AP75 / AR100 / R50 and the precision-recall curves come from the arrays that
  ``COCOeval.accumulate()`` fills (pycocotools or faster-coco-eval: ``eval["precision"]`` [T, R, K, A, M]
  and ``eval["recall"]`` [T, K, A, M]), area "all", the largest maxDets (100).
* The confusion matrix at a score threshold comes from pycocotools' ``COCOeval.evaluateImg`` run
  class-agnostically (``params.useCats = 0``, one IoU threshold, area "all"): its ``evalImgs``
  ``gtMatches`` / ``dtMatches`` pair each ground-truth box with at most one detection of any class
  (greedy by score, as COCO matches). Rows are the ground-truth class, columns the predicted class;
  the last row and column are "background": a missed box (row = its class, column background) or a
  detection matching no box (row background). Crowd boxes and the detections they absorb are left out,
  as COCO ignores them.

`write_analysis` writes ``per_class.md``, ``confusion.md``, ``confusion.csv``, ``analysis.json`` and the
PNGs (``pr_overall.png``, ``pr_per_class/<id>_<name>.png``, ``confusion.png``) to a folder;
`read_analysis` reads ``analysis.json`` back (``python -m dfine report``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from dfine.data.coco import coco_api_from_dict

__all__ = ["EvalAnalysis", "analyze_evaluation", "per_class_metrics", "confusion_matrix", "per_class_table",
           "confusion_table", "top_confusions", "write_analysis", "read_analysis", "ANALYSIS_FILE"]

ANALYSIS_FILE = "analysis.json"
METRICS = ("AP", "AP50", "AP75", "AR100", "R50")
# the precision-recall curves kept per class: IoU 0.50, IoU 0.75 and the mean over 0.50:0.95
CURVES = ("IoU=0.50", "IoU=0.75", "IoU=0.50:0.95")


@dataclass
class EvalAnalysis:
    """Per-class results of one evaluation. Lists run over the ground truth's categories (sorted ids);
    a metric is None for a category without ground-truth boxes (COCO's -1)."""

    category_ids: List[int]
    names: List[str]
    num_gt: List[int]  # non-crowd ground-truth boxes per category
    metrics: Dict[str, List[Optional[float]]]  # METRICS -> per category
    recall_thresholds: List[float]
    pr_curves: Dict[str, List[Optional[List[float]]]]  # CURVES -> per category: precision at each recall threshold
    score_threshold: float
    iou_threshold: float
    confusion: List[List[int]]  # (K + 1) x (K + 1): ground truth (rows) x predicted (columns), last = background
    overall: Dict[str, float] = field(default_factory=dict)  # the COCO summary (AP, AP50, ...), for the report

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EvalAnalysis":
        return cls(**data)

    def confusion_array(self) -> np.ndarray:
        return np.asarray(self.confusion, dtype=np.int64)

    def counts_at_threshold(self) -> Dict[str, List[int]]:
        """TP / FP / FN per category at the confusion matrix's thresholds: a detection of class c on a box
        of another class is a false positive of c and a false negative of the box's class."""
        m = self.confusion_array()
        k = len(self.category_ids)
        tp = np.diag(m)[:k]
        return {"TP": tp.tolist(), "FP": (m[:, :k].sum(0) - tp).tolist(), "FN": (m[:k, :].sum(1) - tp).tolist()}


def _index_of(values, target: float) -> int:
    values = np.asarray(values, dtype=np.float64)
    hits = np.flatnonzero(np.isclose(values, target))
    if not hits.size:
        raise ValueError(f"the evaluation's IoU thresholds {values.tolist()} do not include {target}")
    return int(hits[0])


def per_class_metrics(coco_eval) -> dict:
    """{"category_ids", "metrics", "recall_thresholds", "pr_curves"} from an accumulated COCOeval
    (pycocotools or faster-coco-eval), area "all", the largest maxDets."""
    p = coco_eval.params
    precision = np.asarray(coco_eval.eval["precision"], dtype=np.float64)  # [T, R, K, A, M]
    recall = np.asarray(coco_eval.eval["recall"], dtype=np.float64)  # [T, K, A, M]
    area = list(p.areaRngLbl).index("all")
    max_dets = int(np.argmax(p.maxDets))
    t50, t75 = _index_of(p.iouThrs, 0.5), _index_of(p.iouThrs, 0.75)
    pr = precision[:, :, :, area, max_dets]  # [T, R, K]
    rc = recall[:, :, area, max_dets]  # [T, K]
    metrics: Dict[str, List[Optional[float]]] = {name: [] for name in METRICS}
    curves: Dict[str, List[Optional[List[float]]]] = {name: [] for name in CURVES}

    def mean(a):
        valid = a[a > -1]
        return float(valid.mean()) if valid.size else None

    for k in range(pr.shape[2]):
        if not (pr[:, :, k] > -1).any():  # no ground truth of this category: COCO leaves -1
            for name in METRICS:
                metrics[name].append(None)
            for name in CURVES:
                curves[name].append(None)
            continue
        metrics["AP"].append(mean(pr[:, :, k]))
        metrics["AP50"].append(mean(pr[t50, :, k]))
        metrics["AP75"].append(mean(pr[t75, :, k]))
        metrics["AR100"].append(mean(rc[:, k]))
        metrics["R50"].append(mean(rc[t50, k : k + 1]))
        curves["IoU=0.50"].append(np.round(pr[t50, :, k], 5).tolist())
        curves["IoU=0.75"].append(np.round(pr[t75, :, k], 5).tolist())
        curves["IoU=0.50:0.95"].append(np.round(pr[:, :, k].mean(0), 5).tolist())
    return {"category_ids": [int(c) for c in p.catIds], "metrics": metrics,
            "recall_thresholds": np.round(np.asarray(p.recThrs, dtype=np.float64), 5).tolist(), "pr_curves": curves}


def confusion_matrix(gt: dict, records: Sequence[dict], image_ids: Sequence[int], category_ids: Sequence[int],
                     score_threshold: float = 0.5, iou_threshold: float = 0.5) -> np.ndarray:
    """(K + 1) x (K + 1) counts (module docstring) from pycocotools' class-agnostic ``evaluateImg``.

    gt: the ground-truth dict (a private copy: pycocotools writes an "ignore" flag into its records);
    records: COCO result records; only those with ``score >= score_threshold`` count."""
    from pycocotools.cocoeval import COCOeval

    index = {int(c): i for i, c in enumerate(category_ids)}
    background = len(index)
    matrix = np.zeros((background + 1, background + 1), dtype=np.int64)
    kept = [dict(r) for r in records if r["score"] >= score_threshold and int(r["category_id"]) in index]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco_api_from_dict(gt)
        if kept:
            coco_dt = coco_gt.loadRes(kept)
        else:  # loadRes refuses an empty list; an empty result set is still a valid evaluation
            coco_dt = coco_api_from_dict({"images": gt["images"], "categories": gt["categories"], "annotations": []})
        per_image: Dict[int, int] = {}
        for r in kept:
            per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        p = evaluator.params
        p.imgIds = sorted(set(int(i) for i in image_ids))
        p.useCats = 0
        p.iouThrs = np.array([float(iou_threshold)])
        p.areaRng, p.areaRngLbl = [[0.0, 1e10]], ["all"]
        p.maxDets = [max(per_image.values(), default=1)]  # every kept detection takes part
        evaluator.evaluate()
    for e in evaluator.evalImgs:
        if e is None:  # neither boxes nor detections in this image
            continue
        for gt_id, dt_id, ignored in zip(e["gtIds"], e["gtMatches"][0], e["gtIgnore"]):
            if ignored:
                continue
            row = index[coco_gt.anns[gt_id]["category_id"]]
            col = index[coco_dt.anns[int(dt_id)]["category_id"]] if dt_id else background
            matrix[row, col] += 1
        for dt_id, gt_id, ignored in zip(e["dtIds"], e["dtMatches"][0], e["dtIgnore"][0]):
            if not ignored and not gt_id:
                matrix[background, index[coco_dt.anns[dt_id]["category_id"]]] += 1
    return matrix


def analyze_evaluation(gt: dict, coco_eval, records: Sequence[dict], image_ids: Sequence[int],
                       score_threshold: float = 0.5, iou_threshold: float = 0.5,
                       overall: Optional[Dict[str, float]] = None) -> EvalAnalysis:
    """The analysis of one evaluation. ``coco_eval``: the accumulated COCOeval of ``records`` (None when
    there were no detections: every category with boxes then has AP 0 and recall 0)."""
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    categories = sorted(gt["categories"], key=lambda c: int(c["id"]))
    category_ids = [int(c["id"]) for c in categories]
    names = [str(c.get("name", c["id"])) for c in categories]
    evaluated = set(int(i) for i in image_ids)
    num_gt = {c: 0 for c in category_ids}
    for ann in gt["annotations"]:
        if ann["image_id"] in evaluated and not ann.get("iscrowd", 0) and ann["category_id"] in num_gt:
            num_gt[ann["category_id"]] += 1
    if coco_eval is not None:
        per_class = per_class_metrics(coco_eval)
        if per_class["category_ids"] != category_ids:
            raise ValueError(f"the evaluation's categories {per_class['category_ids']} are not the ground truth's "
                             f"{category_ids}")
    else:  # no detections: COCO would give 0 precision and recall wherever there are boxes
        recall_thresholds = np.round(np.linspace(0.0, 1.0, 101), 5).tolist()
        has_gt = [num_gt[c] > 0 for c in category_ids]
        per_class = {
            "metrics": {name: [0.0 if g else None for g in has_gt] for name in METRICS},
            "recall_thresholds": recall_thresholds,
            "pr_curves": {name: [[0.0] * 101 if g else None for g in has_gt] for name in CURVES},
        }
    matrix = confusion_matrix(gt, records, image_ids, category_ids, score_threshold, iou_threshold)
    return EvalAnalysis(category_ids=category_ids, names=names, num_gt=[num_gt[c] for c in category_ids],
                        metrics=per_class["metrics"], recall_thresholds=per_class["recall_thresholds"],
                        pr_curves=per_class["pr_curves"], score_threshold=float(score_threshold),
                        iou_threshold=float(iou_threshold), confusion=matrix.tolist(), overall=dict(overall or {}))


# ------------------------------------------------------------------------------------------------
# text


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _cell(name: str) -> str:
    return name.replace("|", "\\|")


def per_class_table(analysis: EvalAnalysis) -> str:
    """Markdown: one row per category (AP, AP50, AP75, AR100, R50 and TP/FP/FN at the confusion
    thresholds), then the mean over the categories that have boxes (= the COCO AP)."""
    counts = analysis.counts_at_threshold()
    at = f"score>={analysis.score_threshold:g}, IoU>={analysis.iou_threshold:g}"
    rows = [f"| id | class | boxes | {' | '.join(METRICS)} | TP | FP | FN |",
            "|---:|---|---:|" + "---:|" * (len(METRICS) + 3)]
    for i, (cid, name) in enumerate(zip(analysis.category_ids, analysis.names)):
        values = " | ".join(_fmt(analysis.metrics[m][i]) for m in METRICS)
        rows.append(f"| {cid} | {_cell(name)} | {analysis.num_gt[i]} | {values} | {counts['TP'][i]} | "
                    f"{counts['FP'][i]} | {counts['FN'][i]} |")
    means = []
    for m in METRICS:
        valid = [v for v in analysis.metrics[m] if v is not None]
        means.append(_fmt(float(np.mean(valid)) if valid else None))
    rows.append(f"| | **mean** | {sum(analysis.num_gt)} | {' | '.join(means)} | {sum(counts['TP'])} | "
                f"{sum(counts['FP'])} | {sum(counts['FN'])} |")
    note = (f"AP: IoU 0.50:0.95; AR100, R50: recall with 100 detections per image (R50 at IoU 0.50); "
            f"TP/FP/FN at {at}; n/a: no boxes of that class.")
    return "\n".join(rows) + "\n\n" + note


def confusion_table(analysis: EvalAnalysis) -> str:
    """Markdown confusion matrix, ground truth down, predictions across."""
    labels = [_cell(n) for n in analysis.names] + ["background"]
    rows = ["| ground truth \\ predicted | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for label, counts in zip(labels, analysis.confusion):
        rows.append(f"| {label} | " + " | ".join(str(c) for c in counts) + " |")
    return "\n".join(rows)


def top_confusions(analysis: EvalAnalysis, n: int = 10) -> List[tuple]:
    """The n largest off-diagonal cells: (ground-truth name, predicted name, count), largest first."""
    labels = list(analysis.names) + ["background"]
    m = analysis.confusion_array()
    cells = [(int(m[i, j]), i, j) for i in range(m.shape[0]) for j in range(m.shape[1]) if i != j and m[i, j] > 0]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [(labels[i], labels[j], count) for count, i, j in cells[:n]]


def summary_text(analysis: EvalAnalysis, max_matrix_classes: int = 20) -> str:
    """The per-class table and the confusion matrix (or its largest cells when there are many classes)."""
    head = (f"confusion matrix at score>={analysis.score_threshold:g}, IoU>={analysis.iou_threshold:g} "
            "(rows: ground truth, columns: predicted)")
    if len(analysis.category_ids) <= max_matrix_classes:
        confusion = head + "\n" + confusion_table(analysis)
    else:
        lines = [f"  {gt} -> {pred}: {count}" for gt, pred, count in top_confusions(analysis)]
        confusion = head + ", largest off-diagonal cells (full matrix in confusion.csv):\n" + "\n".join(lines)
    return "per-class results\n" + per_class_table(analysis) + "\n\n" + confusion


# ------------------------------------------------------------------------------------------------
# files


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "class"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pr_curves(analysis: EvalAnalysis, directory) -> List[Path]:
    """``pr_overall.png`` (mean over the categories that have boxes) and one PNG per such category in
    ``pr_per_class/`` (curves at IoU 0.50, 0.75 and their mean over 0.50:0.95); returns the paths."""
    plt = _pyplot()
    directory = Path(directory)
    (directory / "pr_per_class").mkdir(parents=True, exist_ok=True)
    recall = np.asarray(analysis.recall_thresholds)
    # one figure redrawn for every class: building a figure per class costs ~10x more
    fig, ax = plt.subplots(figsize=(4.5, 4))
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.12, top=0.88)
    lines = [ax.plot(recall, np.zeros_like(recall), label=name)[0] for name in CURVES]
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    paths = []

    def draw(curves: List[np.ndarray], title: str, path: Path):
        for line, precision in zip(lines, curves):
            line.set_ydata(precision)
        aps = ", ".join(f"{name.split('=')[1]}: {c.mean():.3f}" for name, c in zip(CURVES, curves))
        ax.set_title(f"{title}\nAP at IoU {aps}", fontsize=9)
        fig.savefig(path, dpi=80)
        paths.append(path)

    try:
        with_gt = [i for i, c in enumerate(analysis.pr_curves[CURVES[0]]) if c is not None]
        overall = [np.mean([analysis.pr_curves[name][i] for i in with_gt], 0) if with_gt else np.zeros_like(recall)
                   for name in CURVES]
        draw(overall, f"all classes ({len(with_gt)} with boxes)", directory / "pr_overall.png")
        for i in with_gt:
            name = analysis.names[i]
            draw([np.asarray(analysis.pr_curves[c][i]) for c in CURVES],
                 f"{name} (id {analysis.category_ids[i]}, {analysis.num_gt[i]} boxes)",
                 directory / "pr_per_class" / f"{analysis.category_ids[i]}_{_safe(name)}.png")
    finally:
        plt.close(fig)
    return paths


def plot_confusion(analysis: EvalAnalysis, path) -> Path:
    """Heat map of the confusion matrix, each ground-truth row normalised to 1 (counts written in the cells
    when there are few classes)."""
    plt = _pyplot()
    m = analysis.confusion_array().astype(np.float64)
    rows = m / np.maximum(m.sum(1, keepdims=True), 1)
    labels = list(analysis.names) + ["background"]
    size = min(4 + 0.35 * len(labels), 30)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set(xlabel="predicted", ylabel="ground truth",
           title=f"confusion (score>={analysis.score_threshold:g}, IoU>={analysis.iou_threshold:g}), rows normalised")
    if len(labels) <= 25:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if m[i, j]:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rows[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def write_analysis(analysis: EvalAnalysis, directory, plots: bool = True) -> List[Path]:
    """Write the analysis files (module docstring) to ``directory``; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    (directory / ANALYSIS_FILE).write_text(json.dumps(analysis.to_dict()))
    (directory / "per_class.md").write_text(per_class_table(analysis) + "\n")
    (directory / "confusion.md").write_text(confusion_table(analysis) + "\n")
    with open(directory / "confusion.csv", "w", newline="") as f:
        writer = csv.writer(f)
        labels = list(analysis.names) + ["background"]
        writer.writerow(["ground truth \\ predicted", *labels])
        for label, counts in zip(labels, analysis.confusion):
            writer.writerow([label, *counts])
    written += [directory / n for n in (ANALYSIS_FILE, "per_class.md", "confusion.md", "confusion.csv")]
    if plots:
        for stale in (directory / "pr_per_class").glob("*.png"):  # classes of an earlier evaluation
            stale.unlink()
        written += plot_pr_curves(analysis, directory)
        written.append(plot_confusion(analysis, directory / "confusion.png"))
    return written


def read_analysis(directory) -> EvalAnalysis:
    path = Path(directory) / ANALYSIS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (written by train.py at each evaluation and by --test-only)")
    return EvalAnalysis.from_dict(json.loads(path.read_text()))
