"""Detection data: COCO-format datasets, the published train/val transforms, multi-scale collate,
COCO evaluation and a built-in synthetic dataset (layer `data`: imports nothing else of dfine)."""

from dfine.data.coco import AnnotationFileError, CocoDetection, build_category_mapping
from dfine.data.coco_eval import CocoEvaluator, evaluate_detections
from dfine.data.collate import BatchCollator, build_dataloader, multiscale_sizes, set_loader_epoch
from dfine.data.synthetic import make_synthetic_coco
from dfine.data.transforms import DetectionTransforms, build_transforms

__all__ = [
    "AnnotationFileError", "BatchCollator", "CocoDetection", "CocoEvaluator", "DetectionTransforms",
    "build_category_mapping", "build_dataloader", "build_transforms", "evaluate_detections", "make_synthetic_coco",
    "multiscale_sizes", "set_loader_epoch",
]
