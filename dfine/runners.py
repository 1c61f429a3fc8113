"""Inference runners: one call signature for PyTorch and onnxruntime.

    runner(images [N, 3, H, W] float32, orig_sizes [N, 2] int64 (w, h)) -> (labels [N, K], boxes [N, K, 4], scores [N, K])

Both run the deployed model plus the post-processor in deploy mode (``dfine.export.DetectorGraph``);
labels are the contiguous training ids. Pre-processing is the caller's (``dfine.predict.preprocess``).
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional, Tuple

import torch

import dfine
from dfine.export import (INPUT_NAMES, OUTPUT_NAMES, DetectorGraph, ExportError, _require_file, export_onnx,
                          load_detector, model_size)

__all__ = ["TorchRunner", "OnnxRuntimeRunner", "onnxruntime_runner"]

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
            raise ExportError(f"onnxruntime is not installed (pip install onnxruntime): {err}") from err
        if not os.path.isfile(os.fspath(path)):
            raise ExportError(f"ONNX file {os.fspath(path)!r} does not exist")
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
            raise ExportError(f"onnxruntime cannot load {os.fspath(path)!r}: {err}") from err
        names = tuple(i.name for i in self.session.get_inputs())
        outputs = tuple(o.name for o in self.session.get_outputs())
        if names != INPUT_NAMES or outputs != OUTPUT_NAMES:
            raise ExportError(f"{os.fspath(path)!r} is not a D-FINE export: inputs {names}, outputs {outputs} "
                              f"(expected {INPUT_NAMES} -> {OUTPUT_NAMES}; write one with `python -m dfine export`)")
        self.device = device

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
        labels, boxes, scores = self.session.run(list(OUTPUT_NAMES), feeds)
        return tuple(torch.from_numpy(t).to(images.device) for t in (labels, boxes, scores))


def onnxruntime_runner(config: str, checkpoint: str, onnx_path: Optional[str] = None, device: str = "cpu",
                       threads: Optional[int] = None):
    """``(OnnxRuntimeRunner, cfg, postprocessor)``: the file ``onnx_path`` or, when it is None, the
    checkpoint exported to a temporary file first (static graph at the config's input size)."""
    _require_file(config, "config")
    _require_file(checkpoint, "checkpoint")
    if onnx_path is not None:
        # the file holds the weights; the config gives the input size and the post-processor settings
        cfg = dfine.load_config(config)
        postprocessor = dfine.build_postprocessor(cfg).deploy()
        runner = OnnxRuntimeRunner(onnx_path, threads=threads, device=device)
    else:
        detector, cfg = load_detector(config, checkpoint, backend="reference")
        postprocessor = detector.postprocessor
        with tempfile.TemporaryDirectory(prefix="dfine_onnx_") as tmp:
            path = export_onnx(detector, os.path.join(tmp, "model.onnx"), model_size(cfg))
            runner = OnnxRuntimeRunner(path, threads=threads, device=device)  # the session holds the model
    expected = model_size(cfg)
    got = runner.input_size
    if any(g is not None and g != e for g, e in zip(got, expected)):
        raise ExportError(f"the ONNX file takes {got[0]} x {got[1]} images but the config's eval_spatial_size is "
                          f"{expected[0]} x {expected[1]}; export it with --size {expected[0]} {expected[1]} "
                          "or --dynamic-size")
    return runner, cfg, postprocessor
