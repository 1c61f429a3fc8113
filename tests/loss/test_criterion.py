"""The D-FINE criterion: matcher, GO-LSD union, loss terms, golden parity, fused vs reference."""

import itertools
import math
import os
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_convert

from dfine.loss.criterion import DFINECriterion, build_criterion
from dfine.loss.matcher import HungarianMatcher
from tests.conftest import IN_CI, require_backend
from tests.model_helpers import match_queries

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(os.environ.get("DFINE_SHARED_DIR", REPO.parent / "shared")) / "reference" / "golden"


def _random_boxes(n, generator):
    cxcy = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
    return torch.cat([cxcy, wh], 1)


def _targets(sizes, num_classes, generator):
    return [
        {"labels": torch.randint(0, num_classes, (n,), generator=generator), "boxes": _random_boxes(n, generator)}
        for n in sizes
    ]


def _fake_outputs(B=2, Q=12, C=5, layers=3, reg_max=32, seed=0, requires_grad=False):
    """Outputs with the structure of the D-FINE decoder in training mode (no denoising)."""
    g = torch.Generator().manual_seed(seed)
    bins = 4 * (reg_max + 1)

    def layer(with_corners=True):
        out = {
            "pred_logits": torch.randn(B, Q, C, generator=g),
            "pred_boxes": _random_boxes(B * Q, g).reshape(B, Q, 4),
        }
        if with_corners:
            out["pred_corners"] = torch.randn(B, Q, bins, generator=g) * 2
            out["ref_points"] = ref
        return out

    ref = _random_boxes(B * Q, g).reshape(B, Q, 4)
    layers_out = [layer() for _ in range(layers)]
    if requires_grad:
        for lo in layers_out:
            for k in ("pred_logits", "pred_boxes", "pred_corners"):
                lo[k].requires_grad_(True)
    final = layers_out[-1]
    outputs = dict(final)
    outputs["up"] = torch.tensor([0.5])
    outputs["reg_scale"] = torch.tensor([4])
    outputs["aux_outputs"] = [
        dict(lo, teacher_corners=final["pred_corners"], teacher_logits=final["pred_logits"]) for lo in layers_out[:-1]
    ]
    outputs["pre_outputs"] = layer(with_corners=False)
    outputs["enc_aux_outputs"] = [layer(with_corners=False)]
    outputs["enc_meta"] = {"class_agnostic": False}
    return outputs


def test_matcher_finds_the_minimum_cost_assignment():
    g = torch.Generator().manual_seed(1)
    matcher = HungarianMatcher()
    outputs = {"pred_logits": torch.randn(1, 5, 3, generator=g), "pred_boxes": _random_boxes(5, g)[None]}
    targets = _targets([3], 3, g)
    rows, cols = matcher(outputs, targets)["indices"][0]
    assert len(rows) == 3 and len(set(rows.tolist())) == 3

    # brute force over every injective assignment of the 3 targets to the 5 queries
    from torchvision.ops import generalized_box_iou

    prob = outputs["pred_logits"][0].sigmoid()[:, targets[0]["labels"]]
    cls = 0.25 * (1 - prob) ** 2 * -(prob + 1e-8).log() - 0.75 * prob**2 * -(1 - prob + 1e-8).log()
    l1 = torch.cdist(outputs["pred_boxes"][0], targets[0]["boxes"], p=1)
    giou = generalized_box_iou(
        box_convert(outputs["pred_boxes"][0], "cxcywh", "xyxy"), box_convert(targets[0]["boxes"], "cxcywh", "xyxy")
    )
    cost = 5 * l1 + 2 * cls - 2 * giou
    best = min(
        sum(cost[q, t].item() for t, q in enumerate(perm)) for perm in itertools.permutations(range(5), 3)
    )
    found = sum(cost[r, c].item() for r, c in zip(rows.tolist(), cols.tolist()))
    assert found == pytest.approx(best, abs=1e-5)


def test_matcher_handles_images_without_targets_and_nan_predictions():
    matcher = HungarianMatcher()
    outputs = {"pred_logits": torch.randn(2, 4, 3), "pred_boxes": torch.rand(2, 4, 4)}
    outputs["pred_boxes"][0, 0] = float("nan")
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    indices = matcher(outputs, targets)["indices"]
    assert len(indices[0][0]) == 1 and len(indices[1][0]) == 0


def test_go_indices_keep_the_most_frequent_match_per_query():
    final = [(torch.tensor([0, 1]), torch.tensor([0, 1]))]
    layer_a = [(torch.tensor([0, 2]), torch.tensor([1, 1]))]
    layer_b = [(torch.tensor([0, 2]), torch.tensor([1, 0]))]
    rows, cols = DFINECriterion.go_indices(final, [layer_a, layer_b])[0]
    pairs = dict(zip(rows.tolist(), cols.tolist()))
    # query 0: gt1 twice, gt0 once -> gt1; query 1 -> gt1; query 2: gt1 once, gt0 once -> tie -> gt0
    assert pairs == {0: 1, 1: 1, 2: 0}


def _criterion(backend="reference", num_classes=5):
    return DFINECriterion(HungarianMatcher(), num_classes=num_classes, backend=backend)


def test_loss_terms_are_named_as_published():
    g = torch.Generator().manual_seed(0)
    losses = _criterion()(_fake_outputs(layers=3), _targets([3, 2], 5, g))
    expected = {f"loss_{t}" for t in ("vfl", "bbox", "giou", "fgl")}
    expected |= {f"loss_{t}_aux_{i}" for t in ("vfl", "bbox", "giou", "fgl", "ddf") for i in range(2)}
    expected |= {f"loss_{t}_pre" for t in ("vfl", "bbox", "giou")}
    expected |= {f"loss_{t}_enc_0" for t in ("vfl", "bbox", "giou")}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())


def test_vfl_matches_the_formula_written_out():
    g = torch.Generator().manual_seed(3)
    crit = _criterion()
    logits = torch.randn(1, 4, 5, generator=g)
    boxes = _random_boxes(4, g)[None]
    targets = _targets([2], 5, g)
    indices = [(torch.tensor([2, 0]), torch.tensor([0, 1]))]
    got = crit.loss_vfl({"pred_logits": logits, "pred_boxes": boxes}, targets, indices, num_boxes=2.0)["loss_vfl"]

    from torchvision.ops import box_iou

    total = 0.0
    for q in range(4):
        for c in range(5):
            x = logits[0, q, c].item()
            t = 0.0
            for (qq, gg) in zip(indices[0][0].tolist(), indices[0][1].tolist()):
                if qq == q and targets[0]["labels"][gg].item() == c:
                    t = box_iou(box_convert(boxes[0, q:q + 1], "cxcywh", "xyxy"),
                                box_convert(targets[0]["boxes"][gg:gg + 1], "cxcywh", "xyxy")).item()
            is_pos = any(qq == q and targets[0]["labels"][gg].item() == c
                         for qq, gg in zip(indices[0][0].tolist(), indices[0][1].tolist()))
            p = 1 / (1 + math.exp(-x))
            w = 0.75 * p**2 * (0 if is_pos else 1) + t
            bce = max(x, 0) - x * t + math.log1p(math.exp(-abs(x)))
            total += w * bce
    expected = total / 4 * 4 / 2.0  # published loss.mean(1).sum() * Q / num_boxes: mean over queries, x Q
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_no_targets_gives_finite_losses_and_gradients():
    outputs = _fake_outputs(requires_grad=True)
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(2)]
    losses = _criterion()(outputs, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all()


def test_degenerate_boxes_give_finite_losses_and_nan_boxes_are_not_hidden():
    g = torch.Generator().manual_seed(5)
    targets = _targets([2, 3], 5, g)
    outputs = _fake_outputs()
    outputs["aux_outputs"][0]["pred_boxes"][1, :2, 2:] = 0.0  # zero-size boxes
    losses = _criterion()(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    # NaN predictions: no crash (matching copes), and the box terms say NaN instead of a silent 0, so the
    # trainer's guard skips the step
    outputs["pred_boxes"][0, :3] = float("nan")
    losses = _criterion()(outputs, targets)
    assert not torch.isfinite(losses["loss_bbox"]) and not torch.isfinite(losses["loss_giou"])


def test_fused_and_reference_losses_and_gradients_agree(fused_backend):
    g = torch.Generator().manual_seed(11)
    targets = _targets([4, 3], 5, g)
    results = {}
    for backend in ("reference", fused_backend):
        outputs = _fake_outputs(requires_grad=True, seed=2)
        losses = _criterion(backend)(outputs, targets)
        sum(losses.values()).backward()
        results[backend] = (losses, outputs["aux_outputs"][0]["pred_corners"].grad.clone(),
                            outputs["pred_corners"].grad.clone())
    ref, fused = results["reference"], results[fused_backend]
    for k in ref[0]:
        torch.testing.assert_close(fused[0][k], ref[0][k], rtol=1e-5, atol=1e-7, msg=k)
    torch.testing.assert_close(fused[1], ref[1], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fused[2], ref[2], rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Golden parity: the published D-FINE-N criterion on the published model's train-mode outputs.


def _golden(name):
    path = GOLDEN / name
    if not path.exists():
        if IN_CI:
            pytest.fail(f"golden file {path} is missing (shared/ must sit beside the repository)")
        pytest.skip(f"{path} not found")
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_golden_dfine_n_losses(backend):
    if backend == "cpp":
        require_backend("cpp")
    import dfine

    golden = _golden("dfine_n_losses.pt")
    state = _golden("dfine_n_state_dict.pt")
    cfg = dfine.load_config(REPO / "configs/dfine/dfine_hgnetv2_n_coco.yml")
    model = dfine.build_model(cfg, backend=backend)
    model.load_state_dict(state, strict=True)
    model.decoder.num_denoising = 0  # as the golden run: no denoising groups, deterministic
    model.train()
    criterion = build_criterion(cfg, backend=backend)
    outputs = model(golden["input"], targets=golden["targets"])
    # near-tied encoder scores may list a few queries in another order: compare matched queries
    for b in range(golden["input"].shape[0]):
        idx = match_queries(golden["train_pred_boxes"][b], outputs["pred_boxes"][b].detach())
        torch.testing.assert_close(outputs["pred_boxes"][b, idx], golden["train_pred_boxes"][b], rtol=0, atol=1e-5)
        torch.testing.assert_close(outputs["pred_logits"][b, idx], golden["train_pred_logits"][b], rtol=0, atol=1e-4)
    losses = criterion(outputs, golden["targets"])
    assert set(losses) == set(golden["losses"])
    # Per-term tolerance: some terms are ill-conditioned with these random weights (noise of 1e-6 on
    # the input image moves loss_vfl_enc_0 and loss_vfl_aux_0 by 1.2e-5 relative), so fp32 rounding
    # alone gives ~1e-5; a real mismatch (a wrong formula, a wrong normaliser) is >= 1e-3.
    for name, value in golden["losses"].items():
        assert losses[name].item() == pytest.approx(float(value), rel=5e-5, abs=1e-7), name
    total = sum(losses.values())
    assert total.item() == pytest.approx(float(golden["total_loss"]), rel=1e-5)
