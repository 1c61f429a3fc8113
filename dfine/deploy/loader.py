"""The one way to get a ready-to-run detector from a config and a checkpoint.

    det = load_detector("configs/dfine/dfine_hgnetv2_s_coco.yml", "dfine_s_coco.pth", device="cpu")
    labels, boxes, scores = det.graph()(images, orig_sizes)
    det.classes.name(label), det.classes.category_id(label)     # what a label means (dfine.model.classes)

``predict``, ``export``, ``visualize``, ``train.py --test-only`` and the benchmarks all load through it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple, Union

import torch
import torch.nn as nn

from dfine.config import config_value, load_config
from dfine.deploy.compiled import compile_model
from dfine.deploy.cpu import optimize_for_cpu, resolve_channels_last
from dfine.deploy.graph import DeployError, DetectorGraph
from dfine.model import LoadReport, build_model, build_postprocessor, load_checkpoint
from dfine.model.checkpoint import UntrustedCheckpointError, checkpoint_metadata, read_checkpoint
from dfine.model.classes import ClassInfo, resolve_classes
from dfine.ops import BACKENDS

__all__ = ["Detector", "detector_classes", "input_size", "load_detector", "require_file"]


def input_size(cfg: dict) -> Tuple[int, int]:
    """(H, W) the model was configured for: ``eval_spatial_size``, else 640 x 640."""
    size = config_value(cfg, "eval_spatial_size") or [640, 640]
    return int(size[0]), int(size[1])


@dataclass
class Detector:
    """A loaded detector: the model (deployed or in eval mode), its post-processor and config."""

    model: nn.Module
    postprocessor: nn.Module
    cfg: dict
    device: torch.device
    report: Optional[LoadReport] = None  # what load_checkpoint found; None without a checkpoint
    optimizations: Optional[dict] = None  # what optimize_for_cpu replaced; None when not applied
    classes: Optional[ClassInfo] = None  # names and dataset category ids per label

    @property
    def input_size(self) -> Tuple[int, int]:
        return input_size(self.cfg)

    def graph(self) -> DetectorGraph:
        """Model + post-processor as one module: (images, orig_target_sizes) -> (labels, boxes, scores)."""
        return DetectorGraph(self.model, self.postprocessor).to(self.device).eval()


def require_file(path, what: str) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        raise DeployError(f"{what} {path!r} is a directory, not a file")
    if not os.path.isfile(path):
        raise DeployError(f"{what} file {path!r} does not exist")
    return path


def detector_classes(cfg: dict, metadata: Optional[dict] = None, classes_file=None,
                     source: str = "the checkpoint") -> ClassInfo:
    """What the labels of ``cfg``'s model mean: ``metadata`` (the class record of a checkpoint or ONNX file),
    else guessed from the class count (COCO for 80, numbered otherwise, with a notice), ``classes_file``
    (``--classes``) overriding; see `dfine.model.classes.resolve_classes`. Raises DeployError."""
    try:
        return resolve_classes(config_value(cfg, "DFINETransformer.num_classes"), metadata, classes_file,
                               coco_config=bool(config_value(cfg, "remap_mscoco_category")), source=source)
    except ValueError as err:
        raise DeployError(str(err)) from None


def load_detector(config: Union[str, os.PathLike, dict], checkpoint=None, *, device: Union[str, torch.device] = "cpu",
                  backend: str = "auto", deploy: bool = True, optimize: Union[bool, str] = "auto",
                  compile: bool = False, overrides: Optional[Iterable[str]] = None, trusted: bool = False,
                  classes=None) -> Detector:
    """Build the model of ``config`` and load ``checkpoint`` into it, ready for inference.

    Args:
        config: a config file (published layout, ``__include__`` merged) or a config dict from ``load_config``.
        checkpoint: a checkpoint file or dict (raw state_dict, ``{"model"}``, ``{"ema": {"module"}}``; EMA weights
            preferred), loaded strictly; None keeps the initial weights (benchmarks).
        device: where the model runs.
        backend: the fused-op backend, one of ``dfine.ops.BACKENDS``.
        deploy: ``model.deploy()`` (conv+BN and RepVGG fusion, training-only heads dropped); else ``model.eval()``.
        optimize: ``dfine.deploy.optimize_for_cpu`` (channels_last per the config, oneDNN linear layers, the CPU
            forms of the stem pool and attention softmax). "auto": for a deployed model on the CPU. True on another
            device is an error.
        compile: ``torch.compile(fullgraph=True)`` of the model (``dfine.deploy.compiled``).
        overrides: ``"Section.key=value"`` config overrides (with a config path).
        trusted: read a checkpoint file with full pickle instead of ``weights_only=True`` (it can run code: only for
            files you trust; this project's own checkpoints never need it).
        classes: a ``--classes`` file overriding the class names (and ids) the checkpoint records
            (`dfine.model.classes.read_classes_file`). ``Detector.classes`` holds the result.

    Raises:
        DeployError: a missing file, an unknown backend, a checkpoint that does not fit, flags that do not combine.
    """
    if backend not in BACKENDS:
        raise DeployError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    device = torch.device(device)
    if optimize == "auto":
        optimize = deploy and device.type == "cpu"
    elif optimize not in (True, False):
        raise DeployError(f"optimize must be True, False or 'auto', got {optimize!r}")
    if optimize and device.type != "cpu":
        raise DeployError(f"optimize=True applies the CPU inference forms; the device is {device}")
    if isinstance(config, dict):
        if overrides:
            raise DeployError("overrides apply to a config file; the config given is already loaded")
        cfg = config
    else:
        cfg = load_config(require_file(config, "config"), overrides=overrides)
    model = build_model(cfg, backend=backend)
    report = None
    metadata = {}
    source = "the checkpoint" if checkpoint is not None else "the model (no checkpoint given)"
    if checkpoint is not None:
        if isinstance(checkpoint, (str, os.PathLike)):
            source = f"checkpoint {os.fspath(checkpoint)!r}"
            require_file(checkpoint, "checkpoint")
        try:
            if isinstance(checkpoint, (str, os.PathLike)) and not os.fspath(checkpoint).endswith(".safetensors"):
                checkpoint = read_checkpoint(checkpoint, trusted=trusted)  # once: weights and metadata
            metadata = checkpoint_metadata(checkpoint)
        except ValueError as err:  # UntrustedCheckpointError too: one clear line
            raise DeployError(str(err)) from None
        try:
            report = load_checkpoint(model, checkpoint, trusted=trusted)
        except UntrustedCheckpointError as err:
            raise DeployError(str(err)) from None
        except (ValueError, TypeError) as err:
            raise DeployError(f"checkpoint does not fit the config's model: {err}") from err
    classes = detector_classes(cfg, metadata.get("classes"), classes, source)
    if deploy:
        model.deploy()
    model = model.to(device).eval()
    optimizations = None
    if optimize:
        channels_last = resolve_channels_last(config_value(cfg, "channels_last"), device)
        optimizations = optimize_for_cpu(model, channels_last=channels_last)
    if compile:
        model = compile_model(model)
    return Detector(model, build_postprocessor(cfg).to(device), cfg, device, report, optimizations, classes)
