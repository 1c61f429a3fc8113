"""Training and evaluation of D-FINE: the loop, the two-stage schedule, checkpoints, resume.

One `Trainer` owns everything a training run has state for (model, EMA, optimizer, LR schedule and
warm-up, AMP scaler, epoch, best scores) and writes all of it into every checkpoint, so ``-r`` resumes
exactly: runtime randomness (denoising noise, dropout) is reseeded from (seed, epoch, rank) at each
epoch start and the data stream is a function of (seed, epoch), so the losses after a resume equal the
uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from dfine.config import ConfigError, config_section, config_value
from dfine.data import CocoEvaluator, build_dataloader, set_loader_epoch
from dfine.data.coco_analysis import METRICS, summary_text, write_analysis
from dfine.data.epoch import mix_seed
from dfine.deploy.cpu import loaded_allocator, resolve_channels_last, retain_freed_memory, to_memory_format
from dfine.engine import distributed as du
from dfine.engine.amp import amp_policy, float_outputs
from dfine.engine.batch import describe_step_batch, rescale_for_batch_size, step_batch
from dfine.engine.data_config import check_transforms, loader_settings
from dfine.engine.ema import ModelEMA
from dfine.engine.optim import build_lr_scheduler, build_optimizer, build_warmup
from dfine.loss import build_criterion
from dfine.model import build_model, build_postprocessor, load_checkpoint
from dfine.model.checkpoint import load_training_checkpoint, remove_stale_temporaries, save_atomic
from dfine.model.classes import class_metadata as make_class_metadata

__all__ = ["Trainer", "NonFiniteLossError", "NonFiniteWeightsError", "NothingToTrainError", "PartialLoadError", "first_non_finite", "seed_everything"]

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class NonFiniteLossError(RuntimeError):
    """Training stopped after too many consecutive non-finite losses or gradients."""


class PartialLoadError(RuntimeError):
    """-t weights that leave part of the backbone or encoder at its random initialisation."""


def load_table(own: dict, report) -> tuple:
    """(markdown table of tensors per model part: loaded, shape mismatch, missing in the checkpoint; the parts
    among backbone/encoder that did not load completely)."""
    mismatched = {k for k, _, _ in report.shape_mismatches}
    missing = set(report.missing_keys)
    rows = ["| part | tensors | loaded | re-initialised (shape differs) | re-initialised (not in checkpoint) |",
            "|---|---|---|---|---|"]
    incomplete = []
    for part in sorted({k.split(".")[0] for k in own}):
        keys = [k for k in own if k.split(".")[0] == part]
        bad_shape = sum(k in mismatched for k in keys)
        absent = sum(k in missing for k in keys)
        rows.append(f"| {part} | {len(keys)} | {len(keys) - bad_shape - absent} | {bad_shape} | {absent} |")
        if part in ("backbone", "encoder") and (bad_shape or absent):
            incomplete.append(part)
    if report.unexpected_keys:
        rows.append(f"\n{len(report.unexpected_keys)} checkpoint tensor(s) not in this model: "
                    f"{', '.join(report.unexpected_keys[:5])}{', ...' if len(report.unexpected_keys) > 5 else ''}")
    return "\n".join(rows), incomplete


class NothingToTrainError(RuntimeError):
    """fit() was asked to continue a run that already reached its last epoch."""


class NonFiniteWeightsError(RuntimeError):
    """The weights became non-finite; no checkpoint was written over the last good one."""


def first_non_finite(state: dict, prefix: str = "") -> Optional[str]:
    """The name of the first floating-point tensor of a (nested) state dict holding NaN or inf, else None."""
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found = first_non_finite(value, name + ".")
            if found:
                return found
        elif isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _mix(*parts: int) -> int:
    return mix_seed(*parts)


def _unwrap(model):
    return model.module if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _to_device(targets, device):
    return [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in targets]


class Trainer:
    """Build from a loaded config; `fit()` trains, `evaluate()` computes COCO AP.

    Config keys used (published names; every key and its default is declared in `dfine.config.schema`):
    epochs, clip_max_norm, use_amp, amp_dtype, scaler.enabled, use_ema, ema.{decay,warmups,start}, optimizer,
    lr_scheduler, lr_warmup_scheduler, train_dataloader / val_dataloader (see
    `loader_settings`), collate_fn.stop_epoch / ema_restart_decay, checkpoint_freq, print_freq,
    output_dir, sync_bn, find_unused_parameters, ops_backend; ours: eval_freq (epochs between
    evaluations, default 1), max_nonfinite_steps (default 20), batchnorm_eval (default False),
    accumulate_steps (default 1: batches per optimizer step, `train_one_epoch`), seed,
    device, channels_last (default auto: on for the CPU) and cpu_retain_freed_memory (default True);
    the last two are explained in `dfine.deploy.cpu`.
    """

    def __init__(self, cfg: dict, output_dir=None, device=None, seed: Optional[int] = None, use_amp=None,
                 backend: Optional[str] = None, deterministic: bool = False, progress: bool = True,
                 batch_size: Optional[int] = None, lr_scaling: str = "linear"):
        cfg = self.cfg = copy.deepcopy(cfg)  # --batch-size rewrites learning rates and warm-ups in it
        self.device = torch.device(device or config_value(cfg, "device")
                                   or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.distributed = du.init_distributed(self.device)
        self.rank, self.world = du.rank(), du.world_size()
        # batch_size: images per optimizer step that replace the config's, with its lrs and warm-ups rescaled
        self.batch_notes = rescale_for_batch_size(cfg, batch_size, self.world, lr_scaling) if batch_size else []
        self.step_batch = step_batch(cfg, self.world)  # (total, per process and batch, accumulate_steps)
        self.accumulate_steps = self.step_batch[2]
        check_transforms(cfg)  # an op order the data layer refuses fails now, not at the first epoch
        self.seed = int(config_value(cfg, "seed") if seed is None else seed)
        self.output_dir = Path(output_dir or config_value(cfg, "output_dir") or "./output")
        self.use_amp = bool(config_value(cfg, "use_amp") if use_amp is None else use_amp)
        self.progress = progress
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(self.seed)  # same initial weights on every rank

        model = build_model(cfg, backend=backend)
        if self.distributed and config_value(cfg, "sync_bn"):
            if self.device.type == "cuda":
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                self.log_text("sync_bn: SyncBatchNorm needs CUDA; BatchNorm statistics stay per process on CPU")
        self.channels_last = resolve_channels_last(config_value(cfg, "channels_last"), self.device)
        self.allocator = loaded_allocator()
        if self.device.type == "cpu" and self.allocator == "system" and config_value(cfg, "cpu_retain_freed_memory"):
            if retain_freed_memory():
                self.allocator = "system, retaining freed memory"
        self.model = to_memory_format(model.to(self.device), self.channels_last)
        self.criterion = build_criterion(cfg, backend=backend).to(self.device)
        self.postprocessor = build_postprocessor(dict(cfg, remap_mscoco_category=False))

        self.epochs = int(config_value(cfg, "epochs"))
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        self.clip_max_norm = float(config_value(cfg, "clip_max_norm") or 0.0)
        self.optimizer = build_optimizer(self.model, cfg)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg)
        self.warmup = build_warmup(self.lr_scheduler, cfg)
        # autocast dtype: config amp_dtype, else bf16 where native; loss scaling only for fp16 (dfine.engine.amp)
        self.amp = amp_policy(self.use_amp, config_value(cfg, "amp_dtype"), self.device,
                              config_section(cfg, "scaler")["enabled"])
        self.amp_dtype = self.amp.dtype
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp.scaler)
        ema_cfg = config_section(cfg, "ema")
        self.ema = (ModelEMA(self.model, float(ema_cfg["decay"]), int(ema_cfg["warmups"]), int(ema_cfg["start"]))
                    if config_value(cfg, "use_ema") else None)
        collate = config_section(cfg, "train_dataloader.collate_fn")
        stop = collate["stop_epoch"] if collate["stop_epoch"] is not None else \
            config_value(cfg, "train_dataloader.dataset.transforms.policy.epoch")
        self.stop_epoch = int(stop) if stop is not None else self.epochs
        restart = collate["ema_restart_decay"]
        self.ema_restart_decay = float(restart if restart is not None else ema_cfg["decay"])
        self.checkpoint_freq = int(config_value(cfg, "checkpoint_freq") or 0)
        self.print_freq = int(config_value(cfg, "print_freq") or 1)
        self.eval_freq = int(config_value(cfg, "eval_freq") or 1)
        self.max_nonfinite = int(config_value(cfg, "max_nonfinite_steps"))
        # BatchNorm in eval mode while training (fixed statistics): for tiny per-process batches, and
        # what makes N processes x b images train exactly like 1 process x N*b images on CPU
        self.batchnorm_eval = bool(config_value(cfg, "batchnorm_eval"))
        evaluator_cfg = config_section(cfg, "evaluator")
        self.confusion_score_threshold = float(evaluator_cfg["confusion_score_threshold"])
        self.confusion_iou_threshold = float(evaluator_cfg["confusion_iou_threshold"])
        if not 0.0 <= self.confusion_score_threshold <= 1.0:
            raise ConfigError("evaluator.confusion_score_threshold must be in [0, 1], "
                              f"got {self.confusion_score_threshold}")
        if not 0.0 < self.confusion_iou_threshold <= 1.0:
            raise ConfigError(f"evaluator.confusion_iou_threshold must be in (0, 1], got {self.confusion_iou_threshold}")
        self.eval_plots = evaluator_cfg["plots"]
        self.last_analysis = None  # the EvalAnalysis of the last evaluate(analysis_dir=...), main process

        self.net = self.model
        if self.distributed:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(config_value(cfg, "find_unused_parameters")))

        self.start_epoch = 0
        self.global_step = 0
        self.best = {"stage1": None, "stage2": None, "overall": None}  # {"epoch", "AP"} each
        self.history: List[dict] = []
        self._train_loader = self._val_loader = None
        self._writer = None
        self._classes = None

    # -------------------------------------------------------------------------------------------
    # data

    def train_loader(self):
        if self._train_loader is None:
            settings = loader_settings(self.cfg, "train", self.world, self.seed)
            self._train_loader = build_dataloader(settings)
            self._check_classes(self._train_loader.dataset, "train")
        return self._train_loader

    def val_loader(self):
        if self._val_loader is None:
            settings = loader_settings(self.cfg, "val", self.world, self.seed)
            self._val_loader = build_dataloader(settings)
            self._check_classes(self._val_loader.dataset, "val")
        return self._val_loader

    def _check_classes(self, dataset, split):
        k = int(config_value(self.cfg, "num_classes"))
        if dataset.num_classes > k:
            raise ValueError(
                f"{split} dataset has labels up to {dataset.num_classes - 1} (category_map="
                f"{dataset.category_map!r}) but the config's num_classes is {k}; set num_classes: {dataset.num_classes}"
            )

    def class_metadata(self) -> dict:
        """What the labels mean (names, dataset category ids; `dfine.model.classes`), from the training set's
        annotation file and category mapping; written into every checkpoint."""
        if self._classes is None:
            dataset = self.train_loader().dataset
            self._classes = make_class_metadata(int(config_value(self.cfg, "num_classes")),
                                                dataset.label_to_category_id, dataset.category_names,
                                                dataset.category_map, dataset.ann_file)
        return self._classes

    def config_record(self) -> dict:
        """The merged config this run trains with, as plain JSON values (loads under weights_only=True)."""
        return json.loads(json.dumps(self.cfg, default=str))

    # -------------------------------------------------------------------------------------------
    # logging

    def log_text(self, message: str) -> None:
        if du.is_main():
            print(message, flush=True)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "log.txt", "a") as f:
                f.write(message + "\n")

    def log_json(self, record: dict) -> None:
        if du.is_main():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def scalar(self, tag: str, value: float, step: int) -> None:
        if not du.is_main():
            return
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: JSON lines only
                self._writer = False
            else:
                self._writer = SummaryWriter(str(self.output_dir / "tensorboard"))
        if self._writer:
            self._writer.add_scalar(tag, value, step)

    # -------------------------------------------------------------------------------------------
    # one epoch

    def _autocast(self):
        return self.amp.autocast(self.device.type)

    def train_one_epoch(self, epoch: int) -> dict:
        loader = self.train_loader()
        set_loader_epoch(loader, epoch)
        # runtime randomness (denoising noise) is a function of (seed, epoch, rank): exact resume
        seed_everything(_mix(self.seed, epoch, self.rank))
        self.net.train()
        if self.batchnorm_eval:
            for m in self.model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        self.criterion.train()
        sums: Dict[str, float] = {}
        steps = skipped = consecutive_bad = 0
        bar = None
        if self.progress and du.is_main():
            from tqdm import tqdm

            bar = tqdm(total=self._steps_per_epoch(loader), desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)
        start = time.time()
        for group in self._step_groups(loader):
            self.warmup.apply()
            lr = self.optimizer.param_groups[-1]["lr"]  # the lr this step uses (warm-up included)
            self.optimizer.zero_grad(set_to_none=True)
            losses, loss, bad = self._accumulate_gradients(group)
            if bad is not None:
                self.optimizer.zero_grad(set_to_none=True)
                skipped += 1
                consecutive_bad += 1
                self.log_text(f"epoch {epoch} step {self.global_step}: non-finite loss, step skipped; terms {bad}")
                if consecutive_bad >= self.max_nonfinite:
                    raise NonFiniteLossError(
                        f"training stopped: {consecutive_bad} consecutive non-finite losses at epoch {epoch}, "
                        f"step {self.global_step} (last bad terms {bad}); lower the learning rate, check the data, "
                        f"or resume from {self.output_dir / 'last.pth'}"
                    )
                continue
            self.scaler.unscale_(self.optimizer)
            # the total norm, clipped when configured; a non-finite one would poison the weights. (With the fp16
            # GradScaler that is expected while the scale settles: scaler.step skips those steps itself.)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                  self.clip_max_norm if self.clip_max_norm > 0 else float("inf"))
            if not self.scaler.is_enabled():
                norm_ok = torch.isfinite(norm).to(torch.float32).reshape(1)
                if self.distributed:
                    torch.distributed.all_reduce(norm_ok, op=torch.distributed.ReduceOp.MIN)
                if norm_ok.item() < 1:
                    self.optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    consecutive_bad += 1
                    self.log_text(f"epoch {epoch} step {self.global_step}: non-finite gradient (norm {float(norm)}), "
                                  "step skipped")
                    if consecutive_bad >= self.max_nonfinite:
                        raise NonFiniteLossError(
                            f"training stopped: {consecutive_bad} consecutive non-finite losses or gradients at epoch "
                            f"{epoch}, step {self.global_step}; lower the learning rate, check the data, or resume "
                            f"from {self.output_dir / 'last.pth'}")
                    continue
            consecutive_bad = 0
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.warmup.step()
            if self.ema is not None:
                self.ema.update(self.model)
            steps += 1
            self.global_step += 1
            values = dict(losses)
            values["loss"] = loss
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            if self.global_step % self.print_freq == 0:
                if self.distributed:  # log the global batch's loss, not this rank's share
                    values["loss"] = du.all_reduce_mean({"loss": values["loss"]}, self.device)["loss"]
                self.scalar("train/loss", values["loss"], self.global_step)
                self.scalar("train/lr", lr, self.global_step)
                self.log_json({"type": "step", "epoch": epoch, "step": self.global_step, "loss": values["loss"], "lr": lr})
            if bar is not None:
                bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.2e}")
                bar.update(1)
        if bar is not None:
            bar.close()
        means = {k: v / max(steps, 1) for k, v in sums.items()}
        means = du.all_reduce_mean(means, self.device)
        means.update(steps=steps, skipped=skipped, seconds=time.time() - start)
        return means

    def _step_groups(self, loader):
        """The loader's batches in lists of accumulate_steps, one list per optimizer step. An incomplete last
        list is dropped when the loader drops its incomplete last batch (drop_last: as one batch of the whole
        step would be), else it makes a step of its own."""
        group = []
        for batch in loader:
            group.append(batch)
            if len(group) == self.accumulate_steps:
                yield group
                group = []
        if group and not loader.drop_last:
            yield group

    def _steps_per_epoch(self, loader) -> int:
        n, k = len(loader), self.accumulate_steps
        return n // k if loader.drop_last else -(-n // k)

    def _accumulate_gradients(self, group):
        """Forward and backward of each batch of one optimizer step: gradients summed in .grad (DDP all-reduces
        them with the last batch only). Returns (loss terms, loss) summed over the batches as floats, and None;
        or the non-finite terms of the first batch whose loss is not finite (on any process), without its
        backward. With one batch per step this is the plain training step."""
        accumulating = len(group) > 1 or self.accumulate_steps > 1
        if accumulating:
            # the step's box count normalises every batch, as the world's does under DDP (criterion.forward)
            count = torch.tensor([float(sum(len(t["labels"]) for _, targets in group for t in targets))],
                                 device=self.device)
            if self.distributed:
                torch.distributed.all_reduce(count)
            step_boxes = max(float(count.item()) / self.world, 1.0)
            step_images = sum(len(targets) for _, targets in group)
        sums: Dict[str, float] = {}
        total = 0.0
        for j, (images, targets) in enumerate(group):
            extra = {"step_num_boxes": step_boxes, "share": len(targets) / step_images} if accumulating else {}
            images = to_memory_format(images.to(self.device, non_blocking=True), self.channels_last)
            targets = _to_device(targets, self.device)
            last = j == len(group) - 1
            sync = contextlib.nullcontext() if last or not self.distributed else self.net.no_sync()
            with sync:
                with self._autocast():
                    outputs = self.net(images, targets=targets)
                with torch.autocast(self.device.type, enabled=False):  # the criterion runs in fp32
                    outputs = float_outputs(outputs)
                    losses = self.criterion(outputs, targets, **extra)
                loss = sum(losses.values())
                finite = torch.isfinite(loss.detach()).to(torch.float32)
                if self.distributed:  # every rank skips together, so DDP's collective calls stay paired
                    torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
                if finite.item() < 1:
                    return None, None, {k: float(v.detach()) for k, v in losses.items()
                                        if not math.isfinite(float(v.detach()))}
                self.scaler.scale(loss).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            total += float(loss.detach())
        return sums, total, None

    # -------------------------------------------------------------------------------------------
    # evaluation

    def eval_module(self):
        return self.ema.module if self.ema is not None else self.model

    @torch.no_grad()
    def evaluate(self, module=None, analysis_dir=None, plots: bool = False) -> dict:
        """COCO stats of ``module`` (default: the EMA or the model) on the validation set. With
        ``analysis_dir`` the main process also keeps the per-class analysis (``self.last_analysis``: per-class
        AP, precision-recall curves, confusion matrix at ``evaluator.confusion_*_threshold``) and writes it
        there (``dfine.data.coco_analysis.write_analysis``; the PNGs when ``plots``)."""
        module = module or self.eval_module()
        loader = self.val_loader()
        evaluator = CocoEvaluator(loader.dataset)
        was_training = module.training
        module.eval()
        bar = None
        if self.progress and du.is_main():
            from tqdm import tqdm

            bar = tqdm(total=len(loader), desc="eval", leave=False, dynamic_ncols=True)
        for images, targets in loader:
            images = to_memory_format(images.to(self.device), self.channels_last)
            with self._autocast():
                outputs = module(images)
            outputs = float_outputs(outputs)
            sizes = torch.stack([t["orig_size"] for t in targets]).to(self.device)
            results = self.postprocessor(outputs, sizes)
            if not all(bool(torch.isfinite(r["scores"]).all() and torch.isfinite(r["boxes"]).all()) for r in results):
                module.train(was_training)
                raise NonFiniteWeightsError(
                    "evaluation stopped: the model's outputs are not finite (the weights have diverged); lower the "
                    f"learning rate, check the data, or resume from {self.output_dir / 'last.pth'}")
            evaluator.update([{k: v.cpu() for k, v in r.items()} for r in results], [t["image_id"] for t in targets])
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        module.train(was_training)
        stats = evaluator.summarize()
        self.last_analysis = None
        if analysis_dir is not None and du.is_main():
            self.last_analysis = evaluator.analyze(self.confusion_score_threshold, self.confusion_iou_threshold)
            write_analysis(self.last_analysis, analysis_dir, plots=plots)
        return stats

    # -------------------------------------------------------------------------------------------
    # checkpoints

    def state_dict(self, epoch: int) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "lr_warmup_scheduler": self.warmup.state_dict(),
            "scaler": self.scaler.state_dict(),
            "last_epoch": epoch,
            "global_step": self.global_step,
            "best": self.best,
            "seed": self.seed,
            "date": datetime.datetime.now().isoformat(),
            "classes": self.class_metadata(),
            "config": self.config_record(),
        }

    def save(self, name: str, epoch: int) -> None:
        """Write a checkpoint atomically; never one with non-finite weights (the previous file is kept)."""
        if du.is_main():
            state = self.state_dict(epoch)
            bad = first_non_finite({"model": state["model"], "ema": state["ema"] or {}})
            if bad:
                raise NonFiniteWeightsError(
                    f"training stopped at epoch {epoch}: weight {bad} is not finite; {self.output_dir / name} was not "
                    f"written (the previous one is intact). Lower the learning rate or resume from "
                    f"{self.output_dir / 'last.pth'}")
            save_atomic(state, self.output_dir / name)

    def load_weights(self, path) -> None:
        """Model and EMA weights of a training checkpoint (the two-stage reload)."""
        ckpt = load_training_checkpoint(path)  # written by this run: never needs trusted=True
        self.model.load_state_dict(ckpt["model"])
        if self.ema is not None and ckpt.get("ema"):
            self.ema.module.load_state_dict(ckpt["ema"]["module"])

    def resume(self, path, trusted: bool = False) -> None:
        """Restore every piece of training state; training continues at last_epoch + 1. The file is read with
        ``weights_only=True`` unless ``trusted``."""
        ckpt = load_training_checkpoint(path, trusted=trusted)
        self.model.load_state_dict(ckpt["model"])
        if self.ema is not None:
            if not ckpt.get("ema"):
                raise ValueError(f"resume: {path} has no EMA state but the config has use_ema: True")
            self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        self.warmup.load_state_dict(ckpt["lr_warmup_scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch = int(ckpt["last_epoch"]) + 1
        self.global_step = int(ckpt.get("global_step", 0))
        self.best = ckpt.get("best") or self.best
        self.log_text(f"resumed from {path}: continuing at epoch {self.start_epoch} (step {self.global_step})")

    def tune_from(self, path, trusted: bool = False, allow_partial: bool = False) -> None:
        """Fine-tune: load released weights. Between an Objects365 (366 classes) and a COCO (80) model the class
        rows of the class-shaped tensors (score heads, denoising class embedding) are copied by the published
        table (`dfine.model.checkpoint.class_row_mapping`); for any other class count those tensors keep their
        fresh initialisation and are logged by name. A table of loaded / re-initialised tensors per part is logged.
        Refuses (PartialLoadError) when a backbone or encoder tensor does not load - the weights are then for
        another model size - unless ``allow_partial``. Read with ``weights_only=True`` unless ``trusted``."""
        report = load_checkpoint(self.model, path, strict=False, skip_mismatched=True, trusted=trusted,
                                 map_classes=True)
        table, incomplete = load_table(self.model.state_dict(), report)
        self.log_text(f"tuning from {path}:\n{table}\n{report}")  # the table, then the tensors by name
        if report.skipped_keys:
            self.log_text(f"re-initialised (shape differs from the checkpoint, e.g. another class count): "
                          f"{len(report.skipped_keys)} tensors: {', '.join(report.skipped_keys)}")
        if incomplete and not allow_partial:
            raise PartialLoadError(
                f"{path} does not fit this model's {' and '.join(incomplete)} (weights of another model size?): "
                f"training would start from partly random weights. Pass --allow-partial-load to train anyway.\n{table}")
        if self.ema is not None:
            self.ema.module.load_state_dict(self.model.state_dict())

    # -------------------------------------------------------------------------------------------
    # the schedule

    def _improved(self, key: str, stats: dict, epoch: int) -> bool:
        best = self.best.get(key)
        if best is None or stats["AP"] > best["AP"]:
            self.best[key] = {"epoch": epoch, "AP": stats["AP"]}
            return True
        return False

    def fit(self) -> List[dict]:
        """Train from start_epoch to epochs with the published two-stage schedule: the best stage-1
        weights are saved as best_stg1.pth; at the stop epoch (augmentation off) training restarts from
        them with EMA decay = ema_restart_decay; in stage 2 an epoch that does not improve AP lowers
        the EMA decay by 1e-4 and restarts from best_stg1.pth (the EMA search)."""
        if self.start_epoch >= self.epochs:
            raise NothingToTrainError(
                f"nothing to train: the run already finished epoch {self.start_epoch - 1} and epochs is {self.epochs}; "
                f"raise it (e.g. -u epochs={self.start_epoch + 1}) to train further")
        if du.is_main():
            removed = remove_stale_temporaries(self.output_dir)
            if removed:
                self.log_text(f"removed {len(removed)} temporary file(s) left by an interrupted save: {', '.join(removed)}")
        self.log_text(f"training epochs {self.start_epoch}..{self.epochs - 1} on {self.device} "
                      f"({self.world} process{'es' if self.world > 1 else ''}), output {self.output_dir}, "
                      f"AMP {self.amp.name}{' + GradScaler' if self.amp.scaler else ''}")
        for line in [describe_step_batch(self.cfg, self.world)] + self.batch_notes:
            self.log_text(line)
        if self.device.type == "cpu":
            self.log_text(f"CPU: {torch.get_num_threads()} threads, channels_last {self.channels_last}, "
                          f"allocator {self.allocator}")
        for epoch in range(self.start_epoch, self.epochs):
            if epoch == self.stop_epoch:
                self._enter_stage2()
            train_stats = self.train_one_epoch(epoch)
            self.lr_scheduler.step()
            record = {"type": "epoch", "epoch": epoch, "train": train_stats}
            evaluate = (epoch + 1) % self.eval_freq == 0 or epoch == self.epochs - 1
            if evaluate:
                plots = self.eval_plots == "every" or (self.eval_plots == "last" and epoch == self.epochs - 1)
                stats = self.evaluate(analysis_dir=self.output_dir / "eval", plots=plots)
                record["eval"] = stats
                if self.last_analysis is not None:
                    record["per_class"] = _per_class_record(self.last_analysis)
                for k in STAT_NAMES:
                    self.scalar(f"eval/{k}", stats[k], epoch)
                if self._improved("overall", stats, epoch):
                    self.save("best.pth", epoch)
                if epoch < self.stop_epoch:
                    if self._improved("stage1", stats, epoch):
                        self.save("best_stg1.pth", epoch)
                elif self._improved("stage2", stats, epoch):
                    self.save("best_stg2.pth", epoch)
                elif self.ema is not None:
                    self.ema.decay -= 1e-4
                    if (self.output_dir / "best_stg1.pth").exists():
                        self.load_weights(self.output_dir / "best_stg1.pth")
                    self.log_text(f"epoch {epoch}: no stage-2 improvement; EMA decay -> {self.ema.decay:.4f}")
                self.log_text(f"epoch {epoch}: loss {train_stats.get('loss', float('nan')):.4f}  "
                              + "  ".join(f"{k} {stats[k]:.4f}" for k in STAT_NAMES))
                if self.last_analysis is not None:
                    self.log_text(f"epoch {epoch} " + summary_text(self.last_analysis))
            else:
                self.log_text(f"epoch {epoch}: loss {train_stats.get('loss', float('nan')):.4f}")
            self.scalar("train/epoch_loss", train_stats.get("loss", float("nan")), epoch)
            if self.distributed:
                record["sync_max_diff"] = self.replica_divergence()
            self.log_json(record)
            self.history.append(record)
            # last.pth after the epoch's bookkeeping, so a resume continues exactly here
            self.save("last.pth", epoch)
            if self.checkpoint_freq and (epoch + 1) % self.checkpoint_freq == 0 and epoch < self.stop_epoch:
                self.save(f"checkpoint{epoch:04}.pth", epoch)
            du.barrier()
        if self._writer:
            self._writer.close()
        return self.history

    @torch.no_grad()
    def replica_divergence(self) -> float:
        """Largest difference between processes of a per-tensor weight fingerprint (0 when DDP keeps
        the replicas identical, as it must)."""
        prints = torch.stack([v.double().sum() for v in self.model.state_dict().values() if v.is_floating_point()])
        gathered = [torch.empty_like(prints) for _ in range(self.world)]
        torch.distributed.all_gather(gathered, prints)
        stacked = torch.stack(gathered)
        return float((stacked.max(0).values - stacked.min(0).values).max())

    def _enter_stage2(self) -> None:
        path = self.output_dir / "best_stg1.pth"
        if path.exists():
            self.load_weights(path)
            self.log_text(f"stop epoch {self.stop_epoch}: augmentation off, restarting from {path}")
        else:  # the release crashes here; continue with the current weights instead
            self.log_text(f"stop epoch {self.stop_epoch}: no best_stg1.pth yet (no evaluation so far); "
                          "continuing with the current weights")
        if self.ema is not None:
            self.ema.decay = self.ema_restart_decay


def _per_class_record(analysis) -> dict:
    """The per-class part of a log.jsonl epoch record (the curves and the matrix are in eval/analysis.json)."""
    counts = analysis.counts_at_threshold()
    rows = []
    for i, (cid, name) in enumerate(zip(analysis.category_ids, analysis.names)):
        row = {"id": cid, "name": name, "boxes": analysis.num_gt[i]}
        row.update({m: analysis.metrics[m][i] for m in METRICS})
        row.update({k: counts[k][i] for k in ("TP", "FP", "FN")})
        rows.append(row)
    return {"score_threshold": analysis.score_threshold, "iou_threshold": analysis.iou_threshold, "classes": rows}

