"""Shared helpers of the model tests: where the reference files live, building sizes quickly."""

import os
from pathlib import Path

import pytest
import torch

import dfine

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() == "true"


def shared_dir() -> Path:
    env = os.environ.get("DFINE_SHARED_DIR")
    return Path(env) if env else REPO.parent / "shared"


def shared_file(*parts) -> Path:
    """Path of a reference file; skips locally and fails in CI when it is missing."""
    path = shared_dir().joinpath(*parts)
    if not path.exists():
        msg = f"reference file {path} not found (set DFINE_SHARED_DIR)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def config_path(size: str) -> str:
    return str(REPO / "configs" / "dfine" / f"dfine_hgnetv2_{size}_coco.yml")


def build(size: str, overrides=None, backend="reference"):
    cfg = dfine.load_config(config_path(size), overrides)
    return dfine.build_model(cfg, backend=backend), cfg


def read_keys(path):
    return dict(line.split("\t") for line in Path(path).read_text().splitlines() if line.strip())


def keys_and_shapes(model):
    return {k: str(list(v.shape)) for k, v in model.state_dict().items()}


def match_queries(ref_boxes, boxes):
    """For each reference query the index of the nearest prediction (L1 on boxes); one-to-one."""
    dist = torch.cdist(ref_boxes, boxes, p=1)
    idx = dist.argmin(-1)
    assert idx.unique().numel() == idx.numel(), "query matching is not one-to-one"
    return idx


def load_predictor(config, checkpoint, backend="auto", device="cpu", compiled=False):
    """(model, postprocessor, cfg) as `python -m dfine predict` loads them (dfine.load_detector)."""
    det = dfine.load_detector(str(config), str(checkpoint), device=device, backend=backend, compile=compiled)
    return det.model, det.postprocessor, det.cfg
