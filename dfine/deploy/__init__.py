"""Inference: one detector loader, the export graph, ONNX export, runners (PyTorch, onnxruntime, OpenVINO),
the CPU inference forms (layer `deploy`: imports ops, config, model)."""

from dfine.deploy.compiled import compile_model
from dfine.deploy.cpu import optimize_for_cpu, prepack_linear_weights
from dfine.deploy.graph import INPUT_NAMES, OUTPUT_NAMES, DeployError, DetectorGraph
from dfine.deploy.images import list_images, preprocess, read_image
from dfine.deploy.loader import Detector, input_size, load_detector
from dfine.deploy.onnx_export import check_onnx, export_onnx, onnxruntime_runner
from dfine.deploy.openvino_ir import openvino_runner
from dfine.deploy.runners import OnnxRuntimeRunner, OpenVinoRunner, TorchRunner

__all__ = [
    "Detector", "DeployError", "DetectorGraph", "INPUT_NAMES", "OUTPUT_NAMES", "OnnxRuntimeRunner", "OpenVinoRunner",
    "TorchRunner", "check_onnx", "compile_model", "export_onnx", "input_size", "list_images", "load_detector", "onnxruntime_runner",
    "openvino_runner", "optimize_for_cpu", "prepack_linear_weights", "preprocess", "read_image",
]
