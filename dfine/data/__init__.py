"""Detection data: COCO-format datasets, the published train/val transforms, multi-scale collate,
COCO evaluation and a built-in synthetic dataset. Submodules are imported on use."""
