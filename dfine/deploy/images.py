"""Reading images and the model's pre-processing, shared by every inference path."""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from dfine.deploy.graph import DeployError

__all__ = ["IMAGE_SUFFIXES", "list_images", "preprocess", "read_image", "to_uint8"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def preprocess(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """[3, H, W] RGB -> float [3, h, w] in [0, 1]: plain resize to the model size (aspect ratio not kept,
    as the model was trained and evaluated), no mean/std normalisation. Integer images are scaled by
    their dtype's range (uint8 by 255, 16-bit PNGs, decoded as uint16, by 65535); float ones are taken
    as already in [0, 1]."""
    if image.dtype == torch.uint8:
        return TF.resize(image, list(size), antialias=True).float() / 255.0
    return TF.resize(TF.to_dtype(image, torch.float32, scale=True), list(size), antialias=True)


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """An image of any dtype as uint8 (scaled by its dtype's range), for drawing and JPEG output."""
    return image if image.dtype == torch.uint8 else TF.to_dtype(image, torch.uint8, scale=True)


def read_image(path) -> torch.Tensor:
    """An image file as [3, H, W] RGB, uint8 (uint16 for 16-bit PNGs: `preprocess` scales either); a
    DeployError naming the file when it cannot be decoded."""
    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except Exception as err:  # torchvision raises RuntimeError/ValueError depending on the format
        raise DeployError(f"cannot read image {str(path)!r}: {err}") from err


def list_images(path: Path) -> List[Path]:
    """``path`` itself, or the image files of a directory (sorted); a DeployError when there are none."""
    path = Path(path)
    if not path.exists():
        raise DeployError(f"--input {str(path)!r} does not exist")
    if path.is_file():
        return [path]
    images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DeployError(f"--input directory {str(path)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return images
