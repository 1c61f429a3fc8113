"""The one way to get a ready-to-run detector from a config and a checkpoint.

    det = load_detector("configs/dfine/dfine_hgnetv2_s_coco.yml", "dfine_s_coco.pth", device="cpu")
    labels, boxes, scores = det.graph()(images, orig_sizes)

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
from dfine.model.checkpoint import UntrustedCheckpointError
from dfine.ops import BACKENDS

__all__ = ["Detector", "input_size", "load_detector", "require_file"]


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


def load_detector(config: Union[str, os.PathLike, dict], checkpoint=None, *, device: Union[str, torch.device] = "cpu",
                  backend: str = "auto", deploy: bool = True, optimize: Union[bool, str] = "auto",
                  compile: bool = False, overrides: Optional[Iterable[str]] = None, trusted: bool = False) -> Detector:
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
    if checkpoint is not None:
        if isinstance(checkpoint, (str, os.PathLike)):
            require_file(checkpoint, "checkpoint")
        try:
            report = load_checkpoint(model, checkpoint, trusted=trusted)
        except UntrustedCheckpointError as err:
            raise DeployError(str(err)) from None
        except (ValueError, TypeError) as err:
            raise DeployError(f"checkpoint does not fit the config's model: {err}") from err
    if deploy:
        model.deploy()
    model = model.to(device).eval()
    optimizations = None
    if optimize:
        channels_last = resolve_channels_last(config_value(cfg, "channels_last"), device)
        optimizations = optimize_for_cpu(model, channels_last=channels_last)
    if compile:
        model = compile_model(model)
    return Detector(model, build_postprocessor(cfg).to(device), cfg, device, report, optimizations)
