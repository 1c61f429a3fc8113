"""Divergence on tiny data: the trainer sees non-finite losses (the criterion does not hide them), skips and
reports them, stops after max_nonfinite_steps in a row, and never writes a checkpoint with non-finite weights."""

import math

import pytest
import torch

from dfine.engine.trainer import NonFiniteLossError, NonFiniteWeightsError, Trainer, first_non_finite
from dfine.model.checkpoint import read_checkpoint
from tests.engine.test_train import tiny_config, tiny_data  # noqa: F401


def test_criterion_returns_non_finite_terms(tiny_data):  # noqa: F811
    trainer = Trainer(tiny_config(tiny_data), progress=False)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])}]
    trainer.model.train()
    outputs = trainer.model(torch.rand(1, 3, 128, 128), targets=targets)
    outputs["pred_logits"] = outputs["pred_logits"] * float("nan")
    losses = trainer.criterion(outputs, targets)
    assert math.isnan(float(losses["loss_vfl"].detach()))  # was silently 0 before


def test_divergence_is_skipped_reported_and_never_saved(tiny_data, tmp_path):  # noqa: F811
    trainer = Trainer(tiny_config(tiny_data, **{"optimizer.lr": 1e5, "max_nonfinite_steps": 3, "epochs": 4}),
                      output_dir=tmp_path, progress=False)
    with pytest.raises((NonFiniteLossError, NonFiniteWeightsError), match="last.pth"):
        trainer.fit()
    log = (tmp_path / "log.txt").read_text()
    assert "non-finite" in log and "step skipped" in log
    for name in ("last.pth", "best.pth", "best_stg1.pth"):
        if (tmp_path / name).exists():
            ckpt = read_checkpoint(tmp_path / name)
            assert first_non_finite({"model": ckpt["model"], "ema": (ckpt.get("ema") or {})}) is None, name


def test_no_checkpoint_with_non_finite_weights(tiny_data, tmp_path):  # noqa: F811
    trainer = Trainer(tiny_config(tiny_data), output_dir=tmp_path, progress=False)
    trainer.save("last.pth", 0)
    before = (tmp_path / "last.pth").read_bytes()
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteWeightsError, match="is not finite.*was not written"):
        trainer.save("last.pth", 1)
    assert (tmp_path / "last.pth").read_bytes() == before
