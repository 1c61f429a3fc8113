import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dfine.data import coco_eval
from dfine.data.coco import CocoDetection
from dfine.data.coco_eval import STAT_NAMES, CocoEvaluator, evaluate_detections, results_to_coco_json
from dfine.data.synthetic import make_synthetic_coco


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    paths = make_synthetic_coco(tmp_path_factory.mktemp("syn"), seed=1, num_train=0, num_val=6, image_size=96)
    return CocoDetection(paths["val_images"], paths["val_annotations"])


def ground_truth_as_predictions(ds, shift=0.0):
    results, ids = [], []
    for i in range(len(ds)):
        _, t = ds[i]
        boxes = t["boxes"].as_subclass(torch.Tensor) + shift
        results.append({"boxes": boxes, "scores": torch.ones(len(boxes)), "labels": t["labels"]})
        ids.append(t["image_id"])
    return results, ids


@pytest.fixture(params=["faster_coco_eval", "pycocotools"])
def backend(request, monkeypatch):
    if request.param == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        monkeypatch.setattr(coco_eval, "_backend", lambda: ("pycocotools", COCO, lambda g, d: COCOeval(g, d, "bbox")))
    return request.param


def test_ground_truth_scores_perfectly(val_set, backend):
    results, ids = ground_truth_as_predictions(val_set)
    ev = CocoEvaluator(val_set)
    assert ev.backend_name == backend
    before = json.dumps(val_set.coco.dataset, sort_keys=True)
    ev.update(results, ids)
    stats = ev.summarize()
    assert ev.summarize() == stats  # repeatable
    assert json.dumps(val_set.coco.dataset, sort_keys=True) == before  # the dataset's annotations untouched
    assert set(stats) == set(STAT_NAMES)
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
    assert stats["AP75"] == pytest.approx(1.0) and stats["AR100"] == pytest.approx(1.0)


def test_shifted_boxes_score_lower(val_set, backend):
    perfect = evaluate_detections(val_set, *ground_truth_as_predictions(val_set), val_set.label_to_category_id)
    shifted = evaluate_detections(val_set, *ground_truth_as_predictions(val_set, shift=5.0),
                                  val_set.label_to_category_id)
    far = evaluate_detections(val_set, *ground_truth_as_predictions(val_set, shift=200.0), val_set.label_to_category_id)
    assert 0.0 < shifted["AP"] < perfect["AP"]
    assert shifted["AP75"] < shifted["AP50"] <= 1.0
    assert far["AP"] == 0.0


def test_wrong_labels_score_zero_and_category_ids_path_matches(val_set):
    results, ids = ground_truth_as_predictions(val_set)
    wrong = [dict(r, labels=(r["labels"] + 1) % val_set.num_classes) for r in results]
    assert evaluate_detections(val_set, wrong, ids)["AP"] == 0.0
    # labels given as category ids directly give the same result as contiguous labels + mapping
    as_ids = [dict(r, labels=torch.tensor([val_set.label_to_category_id[int(x)] for x in r["labels"]],
                                           dtype=torch.int64)) for r in results]
    direct = evaluate_detections(val_set, as_ids, ids, labels_are_category_ids=True)
    mapped = evaluate_detections(val_set, results, ids)
    assert direct == mapped and direct["AP"] == pytest.approx(1.0)


def test_empty_predictions_give_zero(val_set, backend):
    ev = CocoEvaluator(val_set)
    assert ev.summarize() == {name: 0.0 for name in STAT_NAMES}
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    ev.update([empty, empty], [1, 2])
    assert ev.summarize()["AP"] == 0.0


def test_result_records_and_bad_inputs(val_set):
    records = results_to_coco_json(
        [{"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]), "scores": torch.tensor([0.5]), "labels": torch.tensor([2])}],
        [torch.tensor(4)], label_to_category_id={2: 5},
    )
    assert records == [{"image_id": 4, "category_id": 5, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.5}]
    with pytest.raises(ValueError, match="label 7"):
        results_to_coco_json([{"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([7])}],
                             [1], {0: 1})
    with pytest.raises(ValueError, match="same number"):
        results_to_coco_json([{"boxes": torch.zeros(2, 4), "scores": torch.ones(1), "labels": torch.tensor([0])}],
                             [1], {0: 1})
    with pytest.raises(ValueError, match="image ids"):
        evaluate_detections(val_set, [{"boxes": torch.zeros(1, 4), "scores": torch.ones(1),
                                       "labels": torch.tensor([0])}], [999])


def mixed_predictions(ds):
    """Exact boxes for the first three images, shifted ones for the rest: subsets score differently."""
    exact, ids = ground_truth_as_predictions(ds)
    shifted, _ = ground_truth_as_predictions(ds, shift=6.0)
    return exact[:3] + shifted[3:], ids


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank, world, port, ann_file, img_folder, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ds = CocoDetection(img_folder, ann_file)
        results, ids = mixed_predictions(ds)
        # rank 0 takes images 0..3, rank 1 images 3..5: image index 3 is seen twice (sampler padding)
        part = slice(0, 4) if rank == 0 else slice(3, 6)
        ev = CocoEvaluator(ds)
        ev.update(results[part], ids[part])
        torch.save(ev.summarize(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_results_are_gathered_across_processes(val_set, tmp_path):
    mp.start_processes(_gather_worker, args=(2, _free_port(), val_set.ann_file, val_set.img_folder, str(tmp_path)),
                       nprocs=2, start_method="spawn")
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    results, ids = mixed_predictions(val_set)
    single = evaluate_detections(val_set, results, ids)
    assert r0 == r1 == single
    # what rank 0 alone would report differs, so the equality above needs the gather
    assert evaluate_detections(val_set, results[:4], ids[:4]) != single
