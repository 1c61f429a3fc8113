"""--batch-size with learning-rate scaling, and gradient accumulation (accumulate_steps) in the trainer."""

import json
import math

import pytest
import torch

import dfine
import train
from dfine.config import ConfigError
from dfine.engine import Trainer
from dfine.engine.batch import rescale_for_batch_size, step_batch
from dfine.engine.data_config import loader_settings
from dfine.data.synthetic import make_synthetic_coco
from dfine.data.transforms import default_ops
from tests.engine.test_train import SYNTH_CFG, step_losses, tiny_config, tiny_overrides


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """8 training images: 2 steps of 4 per epoch."""
    return make_synthetic_coco(tmp_path_factory.mktemp("syn8"), seed=0, num_train=8, num_val=2, image_size=128)


@pytest.fixture(scope="module")
def four_images(tmp_path_factory):
    """4 training images, 1 validation image: one step per epoch, for the tests that run several epochs."""
    return make_synthetic_coco(tmp_path_factory.mktemp("syn4"), seed=0, num_train=4, num_val=1, image_size=128)


def small_overrides(data, **extra):
    """tiny_overrides at 64 px (the trainer's mechanics do not need more, and the steps are ~30 % cheaper)."""
    ops = {"train_dataloader": default_ops(64, True), "val_dataloader": default_ops(64, False)}
    sixty_four = {f"{k}.dataset.transforms.ops": str(v).replace("'", "") for k, v in ops.items()}
    return tiny_overrides(data, eval_spatial_size="[64, 64]", **sixty_four, **extra)


def small_config(data, **extra):
    return dfine.load_config(SYNTH_CFG, overrides=small_overrides(data, **extra))


def _lrs(cfg):
    opt = cfg["optimizer"]
    return [opt["lr"]] + [g.get("lr") for g in opt["params"]]


def test_rescaling_rules_change_lrs_and_warmups(tiny_data):
    cfg = tiny_config(tiny_data, **{"ema.start": 4})
    assert step_batch(cfg) == (4, 4, 1)
    before = _lrs(cfg)
    assert before == [0.0006, 0.0006, 0.0006, None]  # the synthetic config; group 2 takes optimizer.lr

    linear = tiny_config(tiny_data, **{"ema.start": 4})
    lines = rescale_for_batch_size(linear, 16, rule="linear")
    assert _lrs(linear)[:3] == pytest.approx([0.0024, 0.0024, 0.0024]) and _lrs(linear)[3] is None
    assert linear["train_dataloader"]["total_batch_size"] == 16 and step_batch(linear) == (16, 16, 1)
    # warm-ups in optimizer steps x 4/16, rounded, at least 1 when set
    assert linear["lr_warmup_scheduler"]["warmup_duration"] == 1  # 3 / 4 -> 0.75 -> 1
    assert linear["ema"]["warmups"] == 1 and linear["ema"]["start"] == 1  # 5 / 4, 4 / 4
    assert "learning rates x4 (linear rule" in lines[0] and "optimizer.lr 0.0006 -> 0.0024" in lines[0]
    assert "optimizer.params[1].lr 0.0006 -> 0.0024" in lines[0]
    assert "ema.warmups 5 -> 1" in lines[1] and "lr_warmup_scheduler.warmup_duration 3 -> 1" in lines[1]

    sqrt = tiny_config(tiny_data)
    rescale_for_batch_size(sqrt, 1, rule="sqrt")
    assert _lrs(sqrt)[:3] == pytest.approx([0.0003] * 3)  # x sqrt(1/4)
    assert sqrt["lr_warmup_scheduler"]["warmup_duration"] == 12 and sqrt["ema"]["warmups"] == 20

    same = tiny_config(tiny_data)
    assert "unchanged (--lr-scaling none)" in rescale_for_batch_size(same, 8, rule="none")[0]
    assert _lrs(same) == before and same["ema"]["warmups"] == 5 and step_batch(same)[0] == 8

    with pytest.raises(ConfigError, match="--batch-size 3 must be a positive multiple of the 1 process"):
        rescale_for_batch_size(tiny_config(tiny_data, accumulate_steps=2), 3)
    with pytest.raises(ConfigError, match="total_batch_size' \\(4\\) must be a multiple of .* 3 accumulation"):
        step_batch(tiny_config(tiny_data, accumulate_steps=3))


def test_the_trainer_uses_the_rescaled_values(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data)
    trainer = Trainer(cfg, output_dir=tmp_path, progress=False, batch_size=2)
    assert cfg["train_dataloader"]["total_batch_size"] == 4  # the caller's config is left alone
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([0.0003] * len(trainer.optimizer.param_groups))
    assert trainer.warmup.duration == 6 and trainer.ema.warmups == 10
    assert loader_settings(trainer.cfg, "train")["batch_size"] == 2
    assert "learning rates x0.5 (linear rule" in trainer.batch_notes[0]


def test_train_py_batch_size_prints_the_rule_and_trains_with_it(four_images, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["-c", str(SYNTH_CFG), "--no-progress", "--output-dir", str(out), "--batch-size", "4",
            "--accumulate-steps", "2", "-u", *small_overrides(four_images, epochs=1), "train_dataloader.total_batch_size=2"]
    assert train.main(argv) == 0
    printed = capsys.readouterr().out
    assert "batch: 4 images per optimizer step = 2 per batch x 1 process x 2 accumulation steps" in printed
    assert "batch size 4 instead of the config's 2: learning rates x2 (linear rule" in printed
    assert "optimizer.lr 0.0006 -> 0.0012" in printed and "lr_warmup_scheduler.warmup_duration 3 -> 2" in printed
    assert "ema.warmups 5 -> 2" in printed
    assert "batch size 4 instead of the config's 2" in (out / "log.txt").read_text()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "step"]
    # 4 images / 4 per step: one step, at the scaled lr times the first warm-up factor 1/2
    assert len(steps) == 1 and steps[0]["lr"] == pytest.approx(0.0012 / 2)
    assert [r for r in records if r["type"] == "epoch"][0]["train"]["steps"] == 1


# no denoising (its groups depend on the batch's largest image) and BatchNorm in eval mode (statistics of a
# batch depend on the batch); the data stream is seeded per image, so both runs see the same images
COMPARABLE = {"batchnorm_eval": True, "DFINETransformer.num_denoising": 0}


def _one_epoch(tiny_data, tmp_path, name, **extra):
    trainer = Trainer(small_config(tiny_data, epochs=1, **COMPARABLE, **extra), output_dir=tmp_path / name,
                      progress=False)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    stats = trainer.train_one_epoch(0)
    return trainer, stats, step_losses(tmp_path / name), initial


def test_accumulation_over_k_batches_equals_one_step_on_the_whole_batch(four_images, tmp_path):
    """VFL is normalised by box counts only, so 2 batches of 2 images must make the step of 4 images: the same
    loss, the same (clipped) gradient, and the same weights and EMA after the step."""
    vfl = {"DFINECriterion.losses": "[vfl]", "clip_max_norm": 0.1, "lr_warmup_scheduler.warmup_duration": 1}
    whole, whole_stats, whole_losses, initial = _one_epoch(four_images, tmp_path, "whole", **vfl)
    split, split_stats, split_losses, _ = _one_epoch(four_images, tmp_path, "split", accumulate_steps=2, **vfl)
    assert split.train_loader().batch_size == 2 and whole.train_loader().batch_size == 4
    assert whole_stats["steps"] == split_stats["steps"] == 1 and split.global_step == 1
    assert split.warmup.step_count == 1 and split.ema.updates == 1
    assert len(whole_losses) == len(split_losses) == 1
    assert split_losses[0][2] == pytest.approx(whole_losses[0][2], rel=1e-5)
    for key in whole_stats:
        if key.startswith("loss"):
            assert split_stats[key] == pytest.approx(whole_stats[key], rel=1e-5), key
    grads = {n: p.grad for n, p in whole.model.named_parameters() if p.grad is not None}  # the step's, kept after it
    assert len(grads) > 100
    scale = max(float(g.abs().max()) for g in grads.values())
    for name, p in split.model.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
        else:
            assert p.grad is None, name
    # AdamW's first step moves each weight by about lr (0.0006) in the gradient's direction; a weight whose
    # gradient is near zero (vs AdamW's eps) can move differently by summation-order noise
    for name, value in whole.model.state_dict().items():
        torch.testing.assert_close(split.model.state_dict()[name], value, rtol=1e-3, atol=1e-4, msg=name)
    for name, value in whole.ema.module.state_dict().items():
        torch.testing.assert_close(split.ema.module.state_dict()[name], value, rtol=1e-3, atol=1e-4, msg=name)
    moved = max(float((whole.model.state_dict()[k] - v).abs().max()) for k, v in initial.items()
                if v.is_floating_point())
    assert moved > 5e-4  # the weights moved well beyond the tolerance above


def test_split_batches_with_every_loss_term_add_up_to_about_the_whole_batch(tiny_data, tmp_path):
    """The GO-LSD box count and DDF are per batch (criterion.forward), so with the full loss the batches of a step
    only approximate the whole batch's loss; VFL alone adds up exactly. Forward passes only."""
    trainer = Trainer(small_config(tiny_data, **COMPARABLE), output_dir=tmp_path, progress=False)
    trainer.model.train()
    for m in trainer.model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    images, targets = next(iter(trainer.train_loader()))
    assert images.shape[0] == 4
    torch.manual_seed(0)
    with torch.no_grad():
        whole = trainer.criterion(trainer.model(images, targets=targets), targets)
        boxes = float(sum(len(t["labels"]) for t in targets))
        parts = [trainer.criterion(trainer.model(images[i:i + 2], targets=targets[i:i + 2]), targets[i:i + 2],
                                   step_num_boxes=boxes, share=0.5) for i in (0, 2)]
        alone = [trainer.criterion(trainer.model(images[i:i + 2], targets=targets[i:i + 2]), targets[i:i + 2])
                 for i in (0, 2)]
    vfl = [k for k in whole if k.startswith("loss_vfl")]
    for k in vfl:
        assert float(parts[0][k] + parts[1][k]) == pytest.approx(float(whole[k]), rel=1e-5), k
    total = float(sum(whole.values()))
    summed = float(sum(sum(p.values()) for p in parts))
    naive = float(sum(sum(p.values()) for p in alone)) / 2  # each batch on its own, averaged
    assert summed == pytest.approx(total, rel=0.03)
    assert abs(summed - total) < abs(naive - total) or naive == pytest.approx(total, rel=1e-3)


def test_accumulation_resumes_exactly_and_skips_a_whole_step_on_a_bad_batch(four_images, tmp_path, monkeypatch):
    common = dict(accumulate_steps=2, eval_freq=100, checkpoint_freq=1)  # 2 batches of 2 images per step
    full = Trainer(small_config(four_images, epochs=2, **common), output_dir=tmp_path / "full", progress=False)
    full.fit()
    # resume from the state after epoch 0 (the checkpoint written then) and train epoch 1 again
    resumed = Trainer(small_config(four_images, epochs=2, **common), output_dir=tmp_path / "resumed", progress=False)
    resumed.resume(tmp_path / "full" / "checkpoint0000.pth")
    assert resumed.start_epoch == 1 and resumed.global_step == 1
    resumed.fit()
    assert step_losses(tmp_path / "resumed") == step_losses(tmp_path / "full")[1:] and resumed.global_step == 2
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    for (k, a), b in zip(full.ema.module.state_dict().items(), resumed.ema.module.state_dict().values()):
        assert torch.equal(a, b), k

    # a non-finite loss in the second batch of a step skips the whole step: no update, no warm-up or EMA step
    real = resumed.criterion.forward
    calls = []

    def nan_in_batch_2(outputs, targets, **kwargs):
        calls.append(kwargs)
        losses = real(outputs, targets, **kwargs)
        if len(calls) == 2:
            losses["loss_vfl"] = losses["loss_vfl"] * float("nan")
        return losses

    monkeypatch.setattr(resumed.criterion, "forward", nan_in_batch_2)
    before = {k: p.detach().clone() for k, p in resumed.model.named_parameters()}
    stats = resumed.train_one_epoch(2)
    assert stats["skipped"] == 1 and stats["steps"] == 0 and resumed.global_step == 2
    assert resumed.warmup.step_count == 2 and resumed.ema.updates == 2
    assert len(calls) == 2 and all(math.isclose(c["share"], 0.5) for c in calls)
    assert all(torch.equal(before[k], p) for k, p in resumed.model.named_parameters())  # (BN statistics move)
    assert all(p.grad is None for p in resumed.model.parameters())  # the first batch's gradients were dropped
    assert "non-finite loss, step skipped" in (tmp_path / "resumed" / "log.txt").read_text()
