"""The inference graph of D-FINE: model + post-processor, (images, orig_target_sizes) -> (labels, boxes, scores).

What an exported ONNX file holds and what every runner calls, so all inference paths compute the same
thing. I/O names are the published deployment interface.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

__all__ = ["DeployError", "DetectorGraph", "INPUT_NAMES", "OUTPUT_NAMES"]

INPUT_NAMES = ("images", "orig_target_sizes")
OUTPUT_NAMES = ("labels", "boxes", "scores")


class DeployError(RuntimeError):
    """A clear, user-facing failure of loading, exporting or running a detector (missing file, bad option,
    flags that do not combine, a runtime that is not installed). The command lines print it as one line."""


class DetectorGraph(nn.Module):
    """Model + post-processor in deploy mode: (images [N,3,H,W], orig_target_sizes [N,2] (w, h)) ->
    (labels [N,K], boxes [N,K,4] xyxy pixels, scores [N,K]). Labels are the contiguous training ids."""

    def __init__(self, model: nn.Module, postprocessor: nn.Module):
        super().__init__()
        self.model = model
        self.postprocessor = copy.deepcopy(postprocessor).deploy()

    def forward(self, images: torch.Tensor, orig_target_sizes: torch.Tensor):
        return self.postprocessor(self.model(images), orig_target_sizes)
