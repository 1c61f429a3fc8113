"""Building the model and its post-processor from a loaded config (sections named after the classes)."""

from __future__ import annotations

import inspect
from typing import Iterable, Optional

from dfine.model.decoder import DFINETransformer
from dfine.model.dfine import DFINE
from dfine.model.hgnetv2 import HGNetv2
from dfine.model.hybrid_encoder import HybridEncoder
from dfine.model.postprocessor import DFINEPostProcessor
from dfine.ops import BACKENDS

__all__ = ["build_model", "build_postprocessor", "set_backend"]


def _section_kwargs(cfg: dict, name: str, cls, injected: Iterable[str] = ()) -> dict:
    """Arguments for `cls` from section `name`, plus top-level keys (e.g. num_classes,
    eval_spatial_size) that the class accepts and the section does not set. Unknown keys are
    ignored, like the release does (e.g. HybridEncoder `act`)."""
    section = dict(cfg.get(name) or {})
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in section.items() if k in params}
    for key in injected:
        if key in params and key not in kwargs and key in cfg:
            kwargs[key] = cfg[key]
    return kwargs


def _resolve_backend_name(cfg: dict, backend: Optional[str]) -> str:
    name = backend if backend is not None else cfg.get("ops_backend", "auto")
    if name not in BACKENDS:
        raise ValueError(f"ops_backend/backend must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(model, name: str):
    """Switch every fused-op call inside `model` (deformable attention, FDR decode) to `name`."""
    if name not in BACKENDS:
        raise ValueError(f"set_backend: name must be one of {BACKENDS}, got {name!r}")
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = name
    return model


def build_model(cfg: dict, backend: Optional[str] = None):
    """The DFINE model described by `cfg` (backend overrides the config's `ops_backend`)."""
    if cfg.get("model", "DFINE") != "DFINE":
        raise ValueError(f"build_model: only model: DFINE is supported, got {cfg.get('model')!r}")
    parts = dict(cfg.get("DFINE") or {})
    classes = {"HGNetv2": HGNetv2, "HybridEncoder": HybridEncoder, "DFINETransformer": DFINETransformer}
    for role, default in (("backbone", "HGNetv2"), ("encoder", "HybridEncoder"), ("decoder", "DFINETransformer")):
        if parts.get(role, default) != default:
            raise ValueError(f"build_model: DFINE.{role} must be {default}, got {parts.get(role)!r}")
    name = _resolve_backend_name(cfg, backend)
    injected = ("num_classes", "eval_spatial_size")
    backbone = HGNetv2(**_section_kwargs(cfg, "HGNetv2", HGNetv2, injected))
    encoder = HybridEncoder(**_section_kwargs(cfg, "HybridEncoder", HybridEncoder, injected))
    decoder_kwargs = _section_kwargs(cfg, "DFINETransformer", DFINETransformer, injected)
    decoder_kwargs["backend"] = name
    decoder = DFINETransformer(**decoder_kwargs)
    return set_backend(DFINE(backbone, encoder, decoder), name)


def build_postprocessor(cfg: dict):
    kwargs = _section_kwargs(cfg, "DFINEPostProcessor", DFINEPostProcessor,
                             ("num_classes", "use_focal_loss", "remap_mscoco_category"))
    return DFINEPostProcessor(**kwargs)
