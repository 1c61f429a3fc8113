"""Inference runners: one call signature for PyTorch, onnxruntime and OpenVINO.

    runner(images [N, 3, H, W] float32, orig_sizes [N, 2] int64 (w, h)) -> (labels [N, K], boxes [N, K, 4], scores [N, K])

All run the deployed model plus the post-processor in deploy mode (``dfine.deploy.DetectorGraph``);
labels are the contiguous training ids. Pre-processing is the caller's (``dfine.deploy.preprocess``).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from dfine.deploy.graph import INPUT_NAMES, OUTPUT_NAMES, DeployError, DetectorGraph
from dfine.model.classes import classes_from_onnx_metadata

__all__ = ["TorchRunner", "OnnxRuntimeRunner", "OpenVinoRunner", "require_openvino"]

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


def require_openvino():
    """The ``openvino`` module, or a DeployError saying how to install it."""
    try:
        import openvino
    except ImportError as err:
        raise DeployError(f"openvino is not installed (pip install openvino): {err}") from err
    return openvino


class OpenVinoRunner:
    """An exported ONNX file or an OpenVINO IR (``.xml`` beside its ``.bin``), compiled for OpenVINO's CPU plugin.

    float32 inference (``INFERENCE_PRECISION_HINT=f32``: on CPUs with bf16 units OpenVINO would otherwise pick
    bf16 and drift from PyTorch), latency mode (one stream), ``threads`` inference threads (None: OpenVINO's
    default, every core)."""

    def __init__(self, path, threads: Optional[int] = None, device: str = "cpu"):
        ov = require_openvino()
        self.check_device(device)
        core = ov.Core()
        path = os.fspath(path)
        self.name = repr(path)
        if not os.path.isfile(path):
            raise DeployError(f"model file {path!r} (ONNX or OpenVINO .xml) does not exist")
        try:
            model = core.read_model(path)
        except Exception as err:  # OpenVINO raises RuntimeError with a multi-line C++ trace
            raise DeployError(f"openvino cannot read {path!r}: {_first_line(err)}") from None
        names = tuple(i.get_any_name() for i in model.inputs)
        outputs = tuple(o.get_any_name() for o in model.outputs)
        if names != INPUT_NAMES or outputs != OUTPUT_NAMES:
            raise DeployError(f"{self.name} is not a D-FINE export: inputs {names}, outputs {outputs} "
                              f"(expected {INPUT_NAMES} -> {OUTPUT_NAMES}; write one with `python -m dfine export`)")
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as err:
            raise DeployError(f"openvino cannot compile {self.name} for the CPU: {_first_line(err)}") from None
        self.model = model
        self.request = self.compiled.create_infer_request()
        self.outputs = [self.compiled.output(name) for name in OUTPUT_NAMES]
        self.device = device
        self.cache_entry = None  # the cache directory the IR was read from (dfine.deploy.openvino_ir)

    @staticmethod
    def check_device(device) -> None:
        if torch.device(device).type != "cpu":
            raise DeployError(f"--backend openvino runs on the CPU; got --device {device}")

    @property
    def input_size(self) -> Tuple[Optional[int], Optional[int]]:
        """(H, W) of the graph's ``images`` input; None for a dynamic axis."""
        shape = self.model.input("images").get_partial_shape()
        return tuple(d.get_length() if d.is_static else None for d in (shape[2], shape[3]))

    def __call__(self, images: torch.Tensor, orig_sizes: torch.Tensor) -> Detections:
        feeds = {
            "images": images.detach().to("cpu", torch.float32).contiguous().numpy(),
            "orig_target_sizes": torch.as_tensor(orig_sizes).detach().to("cpu", torch.int64).contiguous().numpy(),
        }
        try:
            results = self.request.infer(feeds)  # copies the outputs (share_outputs=False)
        except Exception as err:  # OpenVINO's RuntimeError with a C++ trace
            first = _first_line(err)
            hint = ""
            if "topk" in first.lower() and "exceeds" in first.lower():
                hint = " - the images are too small: they give fewer positions than the model's num_queries"
            raise DeployError(f"openvino could not run the graph on images {list(images.shape)}{hint} ({first})"
                              ) from None
        return tuple(torch.from_numpy(results[o]).to(images.device) for o in self.outputs)


def _first_line(err: Exception) -> str:
    """The informative line of an OpenVINO error: its messages start with lines of C++ source locations."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Exception from", "Check '"))]
    return ((useful or lines or [type(err).__name__])[-1])[:300]
