"""Per-class results, precision-recall curves and the confusion matrix (dfine.data.coco_analysis) on tiny
hand-made ground truth and detections whose answers are known by construction."""

import json

import numpy as np
import pytest
import torch

from dfine.data import coco_eval
from dfine.data.coco_analysis import (ANALYSIS_FILE, EvalAnalysis, confusion_matrix, per_class_table, read_analysis,
                                      summary_text, top_confusions, write_analysis)
from dfine.data.coco_eval import CocoEvaluator

CAT, DOG, BIRD, FISH = 1, 2, 5, 7  # non-contiguous ids; FISH has no boxes


def _gt():
    def box(i, image, cat, xywh, crowd=0):
        return {"id": i, "image_id": image, "category_id": cat, "bbox": xywh, "area": xywh[2] * xywh[3],
                "iscrowd": crowd}

    return {
        "images": [{"id": i, "width": 200, "height": 200, "file_name": f"{i}.jpg"} for i in (1, 2, 3, 4)],
        "categories": [{"id": CAT, "name": "cat"}, {"id": DOG, "name": "dog"}, {"id": BIRD, "name": "bird"},
                       {"id": FISH, "name": "fish"}],
        "annotations": [
            box(1, 1, CAT, [10, 10, 40, 40]),
            box(2, 2, CAT, [100, 100, 50, 30]),
            box(3, 1, DOG, [120, 20, 30, 60]),  # never detected
            box(4, 2, BIRD, [10, 120, 40, 40]),  # detected as a dog
            box(5, 3, CAT, [0, 0, 100, 100], crowd=1),  # a crowd region: COCO ignores it and what it absorbs
        ],
    }


def _det(image, cat, xywh, score):
    x, y, w, h = xywh
    return image, {"boxes": torch.tensor([[x, y, x + w, y + h]], dtype=torch.float64),
                   "scores": torch.tensor([score]), "labels": torch.tensor([cat])}


DETECTIONS = [
    _det(1, CAT, [10, 10, 40, 40], 0.9),  # exact
    _det(2, CAT, [100, 100, 50, 30], 0.9),  # exact
    _det(2, CAT, [100, 101, 50, 30], 0.85),  # duplicate of the box above: a false positive
    _det(2, DOG, [10, 120, 40, 40], 0.8),  # the bird, called a dog
    _det(3, DOG, [150, 150, 20, 20], 0.95),  # nothing there
    _det(3, CAT, [5, 5, 50, 50], 0.9),  # inside the crowd region: ignored
    _det(1, CAT, [160, 160, 20, 20], 0.3),  # nothing there, below the 0.5 threshold
]
# rows: ground truth cat, dog, bird, fish, background; columns: predicted, same order
EXPECTED_AT_05 = [[2, 0, 0, 0, 0],
                  [0, 0, 0, 0, 1],
                  [0, 1, 0, 0, 0],
                  [0, 0, 0, 0, 0],
                  [1, 1, 0, 0, 0]]


@pytest.fixture(params=["faster_coco_eval", "pycocotools"])
def backend(request, monkeypatch):
    if request.param == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        monkeypatch.setattr(coco_eval, "_backend", lambda: ("pycocotools", COCO, lambda g, d: COCOeval(g, d, "bbox")))
    return request.param


def _evaluated(detections=DETECTIONS, image_ids=(1, 2, 3, 4)):
    ev = CocoEvaluator(_gt(), labels_are_category_ids=True)
    ev.update([d for _, d in detections], [i for i, _ in detections])
    ev.image_ids.extend(i for i in image_ids if i not in ev.image_ids)  # images without detections count too
    return ev, ev.summarize()


def test_per_class_results_and_confusion_known_by_construction(backend):
    ev, stats = _evaluated()
    assert ev.backend_name == backend
    a = ev.analyze(score_threshold=0.5)
    assert a.category_ids == [CAT, DOG, BIRD, FISH] and a.names == ["cat", "dog", "bird", "fish"]
    assert a.num_gt == [2, 1, 1, 0]  # the crowd box is not counted
    # cat: both boxes found first (the duplicate and the low-score one rank after them): AP 1
    assert a.metrics["AP"] == [pytest.approx(1.0), 0.0, 0.0, None]
    assert a.metrics["AP50"] == [pytest.approx(1.0), 0.0, 0.0, None]
    assert a.metrics["AR100"] == [pytest.approx(1.0), 0.0, 0.0, None]
    # the COCO AP is the mean over the classes that have boxes
    assert stats["AP"] == pytest.approx(np.mean([1.0, 0.0, 0.0]))
    assert a.pr_curves["IoU=0.50"][0] == [1.0] * 101 and a.pr_curves["IoU=0.50"][3] is None
    assert a.confusion == EXPECTED_AT_05
    assert a.counts_at_threshold() == {"TP": [2, 0, 0, 0], "FP": [1, 2, 0, 0], "FN": [0, 1, 1, 0]}
    assert a.overall == stats
    # a lower threshold lets the 0.3 detection in: one more background -> cat
    low = ev.analyze(score_threshold=0.2)
    expected = [row[:] for row in EXPECTED_AT_05]
    expected[4][0] += 1
    assert low.confusion == expected
    # nothing passes 0.99: every box is missed
    assert ev.analyze(score_threshold=0.99).confusion == [[0, 0, 0, 0, 2], [0, 0, 0, 0, 1], [0, 0, 0, 0, 1],
                                                          [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]


def test_iou_threshold_of_the_confusion_matrix():
    # a cat box shifted by 10 of 40 px: IoU 30*40 / (2*1600 - 1200) = 0.6
    ev, _ = _evaluated([_det(1, CAT, [20, 10, 40, 40], 0.9)])
    # (the cat of image 2 has no detection: missed either way)
    assert ev.analyze(iou_threshold=0.5).confusion[0] == [1, 0, 0, 0, 1]
    missed = ev.analyze(iou_threshold=0.7).confusion
    assert missed[0] == [0, 0, 0, 0, 2] and missed[4] == [1, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="score_threshold must be in"):
        ev.analyze(score_threshold=1.5)


def test_no_detections_at_all(backend):
    ev = CocoEvaluator(_gt(), labels_are_category_ids=True)
    ev.image_ids = [1, 2, 3, 4]
    assert ev.summarize()["AP"] == 0.0
    a = ev.analyze()
    assert a.metrics["AP"] == [0.0, 0.0, 0.0, None]
    assert [row[-1] for row in a.confusion] == [2, 1, 1, 0, 0] and sum(map(sum, a.confusion)) == 4
    with pytest.raises(RuntimeError, match="summarize"):
        CocoEvaluator(_gt(), labels_are_category_ids=True).analyze()


def test_confusion_matrix_of_records_directly():
    gt = _gt()
    records = [{"image_id": 2, "category_id": DOG, "bbox": [10, 120, 40, 40], "score": 0.7}]
    m = confusion_matrix(gt, records, [1, 2], [CAT, DOG, BIRD, FISH])
    assert m[2, 1] == 1 and m[0, 4] == 2 and m[1, 4] == 1 and m.sum() == 4  # image 3 not evaluated


def test_tables_files_and_round_trip(tmp_path):
    ev, _ = _evaluated()
    a = ev.analyze()
    table = per_class_table(a)
    assert "| 1 | cat | 2 | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | 2 | 1 | 0 |" in table
    assert "| 7 | fish | 0 | n/a |" in table
    assert "| | **mean** | 4 | 0.333 |" in table
    assert "| bird | 0 | 1 | 0 | 0 | 0 |" in summary_text(a)
    assert top_confusions(a) == [("dog", "background", 1), ("bird", "dog", 1), ("background", "cat", 1),
                                 ("background", "dog", 1)]  # ties in row order
    paths = write_analysis(a, tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in paths}
    assert names == {ANALYSIS_FILE, "per_class.md", "confusion.md", "confusion.csv", "pr_overall.png",
                     "confusion.png", "pr_per_class/1_cat.png", "pr_per_class/2_dog.png", "pr_per_class/5_bird.png"}
    for p in paths:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "confusion.csv").read_text().splitlines()[3] == "bird,0,1,0,0,0"
    back = read_analysis(tmp_path)
    assert isinstance(back, EvalAnalysis) and back == EvalAnalysis.from_dict(json.loads(json.dumps(a.to_dict())))
    assert back.confusion == EXPECTED_AT_05
    with pytest.raises(FileNotFoundError, match=ANALYSIS_FILE):
        read_analysis(tmp_path / "missing")


def test_report_shows_a_test_only_analysis(tmp_path, capsys):
    """`python -m dfine report DIR` on an output folder holding only eval/ (a --test-only run)."""
    from dfine.apps import report

    ev, _ = _evaluated()
    write_analysis(ev.analyze(), tmp_path / "eval", plots=False)
    assert report.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| 5 | bird | 1 | 0.000 |" in out and "| background | 1 | 1 | 0 | 0 | 0 |" in out
    assert (tmp_path / "eval" / "pr_per_class" / "5_bird.png").exists()  # the missing plots are drawn
    assert report.main([str(tmp_path / "empty")]) == 1
    assert capsys.readouterr().err.startswith("error: ")
