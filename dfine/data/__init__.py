"""Detection data: COCO-format datasets, the published train/val transforms, multi-scale collate,
COCO evaluation and a built-in synthetic dataset.

Names are imported on first use, so `python -m dfine.data.synthetic` does not pay for torchvision.
"""

import importlib

_EXPORTS = {
    "CocoDetection": "dfine.data.coco",
    "AnnotationFileError": "dfine.data.coco",
    "build_category_mapping": "dfine.data.coco",
    "DetectionTransforms": "dfine.data.transforms",
    "build_transforms": "dfine.data.transforms",
    "BatchCollator": "dfine.data.collate",
    "multiscale_sizes": "dfine.data.collate",
    "build_dataloader": "dfine.data.collate",
    "set_loader_epoch": "dfine.data.collate",
    "CocoEvaluator": "dfine.data.coco_eval",
    "evaluate_detections": "dfine.data.coco_eval",
    "make_synthetic_coco": "dfine.data.synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dfine.data' has no attribute {name!r}")
