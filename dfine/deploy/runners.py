"""Inference runners: one call signature for PyTorch and onnxruntime.

    runner(images [N, 3, H, W] float32, orig_sizes [N, 2] int64 (w, h)) -> (labels [N, K], boxes [N, K, 4], scores [N, K])

Both run the deployed model plus the post-processor in deploy mode (``dfine.deploy.DetectorGraph``);
labels are the contiguous training ids. Pre-processing is the caller's (``dfine.deploy.preprocess``).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from dfine.deploy.graph import INPUT_NAMES, OUTPUT_NAMES, DeployError, DetectorGraph
from dfine.model.classes import classes_from_onnx_metadata

__all__ = ["TorchRunner", "OnnxRuntimeRunner"]

Detections = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class TorchRunner:
    """The PyTorch model (any fused-op backend) under ``torch.no_grad()``."""

    def __init__(self, detector: DetectorGraph):
        self.detector = detector.eval()

    def __call__(self, images: torch.Tensor, orig_sizes: torch.Tensor) -> Detections:
        with torch.no_grad():
            return tuple(self.detector(images, orig_sizes))


class OnnxRuntimeRunner:
    """An exported ONNX file in an onnxruntime session (CPU, or CUDA when asked and available)."""

    def __init__(self, path, threads: Optional[int] = None, device: str = "cpu"):
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise DeployError(f"onnxruntime is not installed (pip install onnxruntime): {err}") from err
        if not os.path.isfile(os.fspath(path)):
            raise DeployError(f"ONNX file {os.fspath(path)!r} does not exist")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(os.fspath(path), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types for unreadable files
            raise DeployError(f"onnxruntime cannot load {os.fspath(path)!r}: {err}") from err
        names = tuple(i.name for i in self.session.get_inputs())
        outputs = tuple(o.name for o in self.session.get_outputs())
        if names != INPUT_NAMES or outputs != OUTPUT_NAMES:
            raise DeployError(f"{os.fspath(path)!r} is not a D-FINE export: inputs {names}, outputs {outputs} "
                              f"(expected {INPUT_NAMES} -> {OUTPUT_NAMES}; write one with `python -m dfine export`)")
        self.device = device

    @property
    def class_metadata(self) -> Optional[dict]:
        """The class record ({"names", "category_ids"}) the export wrote into the file's metadata_props; None for
        a file without one."""
        try:
            return classes_from_onnx_metadata(dict(self.session.get_modelmeta().custom_metadata_map))
        except ValueError as err:
            raise DeployError(str(err)) from None

    @property
    def input_size(self) -> Tuple[Optional[int], Optional[int]]:
        """(H, W) of the graph's ``images`` input; None for a dynamic axis."""
        shape = self.session.get_inputs()[0].shape
        return tuple(s if isinstance(s, int) else None for s in shape[2:4])

    def __call__(self, images: torch.Tensor, orig_sizes: torch.Tensor) -> Detections:
        feeds = {
            "images": images.detach().to("cpu", torch.float32).contiguous().numpy(),
            "orig_target_sizes": torch.as_tensor(orig_sizes).detach().to("cpu", torch.int64).contiguous().numpy(),
        }
        try:
            labels, boxes, scores = self.session.run(list(OUTPUT_NAMES), feeds)
        except Exception as err:  # onnxruntime's own exception types
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            hint = ""
            if "topk" in first.lower() or "k argument" in first.lower():
                hint = " - the images are too small: they give fewer positions than the model's num_queries"
            raise DeployError(f"onnxruntime could not run the graph on images {list(images.shape)}{hint} ({first})"
                              ) from None
        return tuple(torch.from_numpy(t).to(images.device) for t in (labels, boxes, scores))
