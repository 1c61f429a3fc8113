"""The training engine on a tiny synthetic dataset and a small D-FINE-N: schedule, checkpoints,
exact resume, fine-tuning, non-finite losses, AMP, --test-only, bad configs."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dfine
from dfine.model.checkpoint import load_checkpoint
from dfine.data.synthetic import make_synthetic_coco
from dfine.engine import LinearWarmup, ModelEMA, NonFiniteLossError, Trainer, build_optimizer, param_groups, save_atomic
from dfine.engine.optim import build_lr_scheduler

REPO = Path(__file__).resolve().parents[2]
SYNTH_CFG = REPO / "configs/dfine/dfine_hgnetv2_n_synthetic.yml"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("syn"), seed=0, num_train=12, num_val=6, image_size=128)


def tiny_overrides(data, **extra):
    """D-FINE-N at 128 px, 20 queries, 4 images per step, no workers."""
    # the published pipelines with another Resize size
    train_ops = ("[{type: RandomPhotometricDistort, p: 0.5}, {type: RandomZoomOut, fill: 0}, "
                 "{type: RandomIoUCrop, p: 0.8}, {type: SanitizeBoundingBoxes, min_size: 1}, "
                 "{type: RandomHorizontalFlip}, {type: Resize, size: [128, 128]}, "
                 "{type: SanitizeBoundingBoxes, min_size: 1}, {type: ConvertPILImage, dtype: float32, scale: True}, "
                 "{type: ConvertBoxes, fmt: cxcywh, normalize: True}]")
    val_ops = "[{type: Resize, size: [128, 128]}, {type: ConvertPILImage, dtype: float32, scale: True}]"
    items = {
        "eval_spatial_size": "[128, 128]",
        "DFINETransformer.num_queries": 20,
        "DFINETransformer.num_denoising": 20,
        "DFINEPostProcessor.num_top_queries": 20,
        "train_dataloader.dataset.img_folder": data["train_images"],
        "train_dataloader.dataset.ann_file": data["train_annotations"],
        "train_dataloader.dataset.transforms.ops": train_ops,
        "train_dataloader.total_batch_size": 4,
        "train_dataloader.num_workers": 0,
        "val_dataloader.dataset.img_folder": data["val_images"],
        "val_dataloader.dataset.ann_file": data["val_annotations"],
        "val_dataloader.dataset.transforms.ops": val_ops,
        "val_dataloader.total_batch_size": 6,
        "epochs": 2,
        "eval_freq": 1,
        "print_freq": 1,
        "lr_warmup_scheduler.warmup_duration": 3,
        "ema.warmups": 5,
        "train_dataloader.collate_fn.stop_epoch": 100,
        "train_dataloader.dataset.transforms.policy.epoch": 100,
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def tiny_config(data, **extra):
    return dfine.load_config(SYNTH_CFG, overrides=tiny_overrides(data, **extra))


def step_losses(output_dir):
    lines = (Path(output_dir) / "log.jsonl").read_text().splitlines()
    return [(r["epoch"], r["step"], r["loss"]) for r in map(json.loads, lines) if r["type"] == "step"]


# ------------------------------------------------------------------------------------------------
# optimizer groups, warm-up, EMA, atomic saving


def test_param_groups_follow_the_published_regexes():
    cfg = dfine.load_config(REPO / "configs/dfine/dfine_hgnetv2_n_coco.yml")
    model = dfine.build_model(cfg, backend="reference")
    groups = param_groups(model, cfg["optimizer"])
    names = [set(g["names"]) for g in groups]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set().union(*names) == trainable and sum(map(len, names)) == len(trainable)  # a partition
    backbone, backbone_norm, encdec_norm, rest = names
    assert backbone and all("backbone" in n and "norm" not in n for n in backbone)
    assert any(".bn." in n for n in backbone)  # the published regex quirk: backbone BN keeps weight decay
    assert all("backbone" in n and "norm" in n for n in backbone_norm)
    assert encdec_norm and all(("norm" in n or "bn" in n or "bias" in n) for n in encdec_norm)
    assert all("backbone" not in n for n in encdec_norm | rest)
    opt = build_optimizer(model, cfg)
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == [0.0004, 0.0008]
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.0001}


def test_overlapping_param_groups_are_an_error():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="matches both group 0 and group 1"):
        param_groups(model, {"params": [{"params": "weight"}, {"params": "0"}]})
    with pytest.raises(ValueError, match="invalid regex"):
        param_groups(model, {"params": [{"params": "("}]})


def test_linear_warmup_then_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = build_lr_scheduler(opt, {"lr_scheduler": {"type": "MultiStepLR", "milestones": [2], "gamma": 0.1}})
    warm = LinearWarmup(sched, 4)
    seen = []
    for epoch in range(3):
        for _ in range(3):
            warm.apply()
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            warm.step()
        sched.step()
    assert seen[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert seen[4:6] == pytest.approx([1.0, 1.0]) and seen[6:] == pytest.approx([0.1] * 3)
    restored = LinearWarmup(sched, 99)
    restored.load_state_dict(warm.state_dict())
    assert restored.step_count == 9 and restored.duration == 4


def test_ema_follows_the_published_formula():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    ema = ModelEMA(model, decay=0.9, warmups=2)
    before = ema.module[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(2.0)
    ema.update(model)
    d = 0.9 * (1 - math.exp(-1 / 2))
    torch.testing.assert_close(ema.module[0].weight, d * before + (1 - d) * model[0].weight)
    torch.testing.assert_close(ema.module[1].running_mean, torch.full((3,), (1 - d) * 2.0))
    assert ema.module[1].num_batches_tracked == model[1].num_batches_tracked  # integers are copied
    state = ema.state_dict()
    other = ModelEMA(model, decay=0.5)
    other.load_state_dict(state)
    assert other.updates == 1 and other.decay == 0.9


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_atomic({"epoch": 1, "w": torch.arange(10)}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temporary files left behind


def test_killed_while_saving_never_corrupts(tmp_path):
    """SIGKILL a process that rewrites last.pth (100 MB) in a loop: the file always loads."""
    path = tmp_path / "last.pth"
    script = (
        "import sys, torch; from dfine.engine import save_atomic\n"
        "x = torch.zeros(25_000_000)\n"
        "i = 0\n"
        "while True:\n"
        "    x[0] = i; save_atomic({'i': i, 'x': x}, sys.argv[1]); i += 1\n"
        "    print(i, flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1"  # one complete save exists
        time.sleep(0.3)  # now most likely in the middle of the next one
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpt = torch.load(path)
    assert ckpt["x"][0].item() == ckpt["i"] and ckpt["x"].numel() == 25_000_000


# ------------------------------------------------------------------------------------------------
# the trainer on tiny data


def test_fit_writes_checkpoints_logs_and_evaluates(tiny_data, tmp_path, device):
    trainer = Trainer(tiny_config(tiny_data), output_dir=tmp_path, device=device, progress=False)
    history = trainer.fit()
    assert [r["epoch"] for r in history] == [0, 1]
    for name in ("last.pth", "best.pth", "best_stg1.pth", "log.txt", "log.jsonl"):
        assert (tmp_path / name).exists(), name
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = torch.load(tmp_path / "last.pth", weights_only=False)
    assert {"model", "ema", "optimizer", "lr_scheduler", "lr_warmup_scheduler", "scaler", "last_epoch"} <= set(ckpt)
    assert ckpt["last_epoch"] == 1 and ckpt["global_step"] == 6  # 12 images / 4 per step x 2 epochs
    assert ckpt["ema"]["updates"] == 6
    stats = history[-1]["eval"]
    assert set(stats) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"} and all(0 <= v <= 1 or v == -1 for v in stats.values())  # -1: no GT of that size
    losses = step_losses(tmp_path)
    assert len(losses) == 6 and all(math.isfinite(l) for _, _, l in losses)
    # every evaluation logs the per-class results under the dataset's names; the last one draws the plots
    from dfine.data.synthetic import CATEGORIES

    per_class = history[-1]["per_class"]
    assert [(c["id"], c["name"]) for c in per_class["classes"]] == [(cid, name) for cid, name, _ in CATEGORIES]
    assert per_class["score_threshold"] == 0.5 and "per_class" in history[0]
    assert (tmp_path / "log.txt").read_text().count("per-class results") == 2
    analysis = json.loads((tmp_path / "eval" / "analysis.json").read_text())
    assert analysis["overall"] == stats and analysis["names"] == [name for _, name, _ in CATEGORIES]
    assert (tmp_path / "eval" / "pr_overall.png").exists() and (tmp_path / "eval" / "confusion.png").exists()
    # the released-checkpoint loader reads our checkpoints (EMA weights preferred)
    fresh = dfine.build_model(tiny_config(tiny_data), backend="reference")
    load_checkpoint(fresh, tmp_path / "last.pth")
    torch.testing.assert_close(fresh.state_dict(), {k: v.cpu() for k, v in trainer.ema.module.state_dict().items()})


def test_resume_continues_exactly(tiny_data, tmp_path):
    """Losses after resuming from last.pth equal the uninterrupted run's, bit for bit."""
    full = Trainer(tiny_config(tiny_data, epochs=3), output_dir=tmp_path / "full", progress=False)
    full.fit()
    first = Trainer(tiny_config(tiny_data, epochs=2), output_dir=tmp_path / "cut", progress=False)
    first.fit()
    resumed = Trainer(tiny_config(tiny_data, epochs=3), output_dir=tmp_path / "cut", progress=False)
    resumed.resume(tmp_path / "cut" / "last.pth")
    assert resumed.start_epoch == 2
    resumed.fit()
    assert step_losses(tmp_path / "cut") == step_losses(tmp_path / "full")
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_two_stage_schedule_reloads_best_stage1(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, epochs=3, **{"train_dataloader.collate_fn.stop_epoch": 2,
                                             "train_dataloader.collate_fn.ema_restart_decay": 0.95})
    trainer = Trainer(cfg, output_dir=tmp_path, progress=False)
    trainer.fit()
    log = (tmp_path / "log.txt").read_text()
    assert "stop epoch 2: augmentation off, restarting from" in log
    assert (tmp_path / "best_stg1.pth").exists()
    decay = trainer.ema.decay
    assert decay == pytest.approx(0.95) or decay == pytest.approx(0.9499)  # 2nd: no stage-2 improvement
    assert trainer.train_loader().dataset.transforms.epoch == 2
    assert trainer.train_loader().dataset.transforms.active_ops() == trainer.train_loader().dataset.transforms.active_ops()


def test_stop_epoch_before_any_evaluation_does_not_crash(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, epochs=2, eval_freq=5, **{"train_dataloader.collate_fn.stop_epoch": 1})
    Trainer(cfg, output_dir=tmp_path, progress=False).fit()
    assert "no best_stg1.pth yet" in (tmp_path / "log.txt").read_text()


def test_finetune_with_another_class_count(tiny_data, tmp_path):
    source = dfine.build_model(tiny_config(tiny_data, num_classes=7), backend="reference")
    torch.save({"model": source.state_dict()}, tmp_path / "released.pth")
    trainer = Trainer(tiny_config(tiny_data), output_dir=tmp_path / "run", progress=False)
    trainer.tune_from(tmp_path / "released.pth")
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "skipped" in log and "score_head" in log and "denoising_class_embed" in log
    own, src = trainer.model.state_dict(), source.state_dict()
    same = [k for k in own if own[k].shape == src[k].shape]
    assert len(same) > 0.9 * len(own)
    for k in same:
        torch.testing.assert_close(own[k], src[k], msg=k)
    assert trainer.model.decoder.dec_score_head[0].weight.shape[0] == 5


def test_non_finite_losses_are_skipped_then_stop_training(tiny_data, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tiny_data, max_nonfinite_steps=2), output_dir=tmp_path, progress=False)
    real = trainer.criterion.forward
    calls = {"n": 0}

    def sometimes_nan(outputs, targets):
        calls["n"] += 1
        losses = real(outputs, targets)
        if calls["n"] == 2 or calls["n"] >= 4:
            losses["loss_giou"] = losses["loss_giou"] * float("nan")
        return losses

    monkeypatch.setattr(trainer.criterion, "forward", sometimes_nan)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="2 consecutive non-finite losses"):
        trainer.fit()
    log = (tmp_path / "log.txt").read_text()
    assert log.count("non-finite loss, step skipped") == 3 and "loss_giou" in log
    assert trainer.global_step == 2  # steps 1 and 3 were taken, 2, 4 and 5 skipped
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values() if v.is_floating_point())
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def _amp_cases():
    """(device, amp_dtype, expected autocast dtype, GradScaler on): the default on every device present, and fp16
    with its GradScaler on CUDA (an H100/A100 defaults to bf16; a T4/V100 to fp16)."""
    cases = [pytest.param("cpu", None, torch.bfloat16, False, id="cpu-default")]
    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        cases += [pytest.param("cuda", None, torch.bfloat16 if bf16 else torch.float16, not bf16, id="cuda-default",
                               marks=pytest.mark.cuda),
                  pytest.param("cuda", "float16", torch.float16, True, id="cuda-float16", marks=pytest.mark.cuda)]
    return cases


@pytest.mark.parametrize("device, amp_dtype, dtype, scaled", _amp_cases())
def test_amp_trains_with_the_criterion_in_fp32(tiny_data, tmp_path, device, amp_dtype, dtype, scaled):
    extra = {"amp_dtype": amp_dtype} if amp_dtype else {}
    trainer = Trainer(tiny_config(tiny_data, epochs=1, **extra), output_dir=tmp_path, device=device, use_amp=True,
                      progress=False)
    assert trainer.amp_dtype == dtype and trainer.scaler.is_enabled() is scaled
    linear_dtypes, criterion_calls = set(), []
    for module in trainer.model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, i, o: linear_dtypes.add(o.dtype))
    criterion_forward = trainer.criterion.forward

    def spy(outputs, targets):  # what the criterion sees: autocast off, fp32 outputs
        criterion_calls.append((torch.is_autocast_enabled(device), outputs["pred_logits"].dtype,
                                outputs["pred_boxes"].dtype))
        return criterion_forward(outputs, targets)

    trainer.criterion.forward = spy
    history = trainer.fit()
    assert history[0]["train"]["steps"] == 3 and math.isfinite(history[0]["train"]["loss"])
    assert dtype in linear_dtypes  # the model ran under autocast
    assert criterion_calls and set(criterion_calls) == {(False, torch.float32, torch.float32)}


def test_num_classes_smaller_than_the_dataset_is_a_clear_error(tiny_data, tmp_path):
    trainer = Trainer(tiny_config(tiny_data, num_classes=3), output_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="num_classes is 3; set num_classes: 5"):
        trainer.train_loader()


def test_resume_from_a_broken_file_is_a_clear_error(tiny_data, tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    trainer = Trainer(tiny_config(tiny_data), output_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="could not be read"):
        trainer.resume(tmp_path / "bad.pth")
    torch.save({"w": torch.zeros(1)}, tmp_path / "weights.pth")
    with pytest.raises(ValueError, match="not a training checkpoint"):
        trainer.resume(tmp_path / "weights.pth")


def test_train_py_cli_trains_then_test_only(tiny_data, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    args = ["-c", str(SYNTH_CFG), "--no-progress", "--output-dir", str(tmp_path), "-u", *tiny_overrides(tiny_data, epochs=1)]
    run = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "last.pth").exists()
    shutil.rmtree(tmp_path / "eval")
    test = subprocess.run([sys.executable, "train.py", *args, "-r", str(tmp_path / "last.pth"), "--test-only",
                           "--confusion-threshold", "0.05"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert test.returncode == 0, test.stderr[-3000:]
    stats = json.loads(test.stdout[test.stdout.index("{"):])
    assert set(stats) >= {"AP", "AP50"}
    # the per-class table (dataset names), the confusion matrix at the chosen threshold, the plots
    from dfine.data.coco_analysis import read_analysis
    from dfine.data.synthetic import CATEGORIES

    assert "| id | class | boxes | AP | AP50 | AP75 | AR100 | R50 | TP | FP | FN |" in test.stdout
    assert "confusion matrix at score>=0.05, IoU>=0.5" in test.stdout
    analysis = read_analysis(tmp_path / "eval")
    assert analysis.score_threshold == 0.05 and analysis.names == [name for _, name, _ in CATEGORIES]
    confusion = analysis.confusion_array()
    assert confusion.shape == (len(CATEGORIES) + 1,) * 2
    assert confusion[:-1].sum(1).tolist() == analysis.num_gt  # every box once: matched or missed
    assert analysis.overall["AP"] == pytest.approx(stats["AP"])
    drawn = {p.name for p in (tmp_path / "eval" / "pr_per_class").glob("*.png")}
    assert len(drawn) == sum(n > 0 for n in analysis.num_gt)
    assert (tmp_path / "eval" / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run([sys.executable, "train.py", *args, "-r", str(tmp_path / "last.pth"), "--test-only",
                          "--confusion-threshold", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --confusion-threshold must be in [0, 1], got 2.0"]


def test_report_table_and_curve(tiny_data, tmp_path, capsys):
    from dfine.apps import report

    Trainer(tiny_config(tiny_data), output_dir=tmp_path, progress=False).fit()
    epochs = report.read_epochs(tmp_path)
    table = report.ap_table(epochs)
    assert table.count("\n") == 3 and f"{epochs[-1]['eval']['AP50']:.3f}" in table
    (tmp_path / "eval" / "confusion.png").unlink()  # as after a run with evaluator.plots: none
    assert report.main([str(tmp_path)]) == 0
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = capsys.readouterr().out
    assert "| id | class | boxes |" in shown and "confusion matrix at score>=0.5" in shown
    assert (tmp_path / "eval" / "confusion.png").exists()  # redrawn from eval/analysis.json
    assert isinstance(dfine.build_criterion(tiny_config(tiny_data)), dfine.loss.DFINECriterion)


def test_logged_lr_includes_warmup(tiny_data, tmp_path):
    Trainer(tiny_config(tiny_data, epochs=1), output_dir=tmp_path, progress=False).fit()
    lines = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in lines if r["type"] == "step"]
    assert lrs == pytest.approx([0.0006 / 3, 0.0006 * 2 / 3, 0.0006])  # warm-up of 3 steps
