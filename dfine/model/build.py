"""Building the model and its post-processor from a loaded config (sections named after the classes)."""

from __future__ import annotations

import inspect
from typing import Optional

from dfine.config import config_section, config_value
from dfine.model.decoder import DFINETransformer
from dfine.model.dfine import DFINE
from dfine.model.hgnetv2 import HGNetv2
from dfine.model.hybrid_encoder import HybridEncoder
from dfine.model.postprocessor import DFINEPostProcessor
from dfine.ops import BACKENDS

__all__ = ["build_model", "build_postprocessor", "set_backend"]


def _section_kwargs(cfg: dict, name: str, cls) -> dict:
    """Arguments for `cls` from section `name`: every key the schema declares for it (the constructor's
    arguments), defaults and shared top-level keys (num_classes, eval_spatial_size, ...) filled in by
    `config_section`. Unknown keys never get here: `load_config` rejects them."""
    kwargs = config_section(cfg, name)
    params = inspect.signature(cls.__init__).parameters
    extra = sorted(set(kwargs) - set(params))
    if extra:  # the schema and the class disagree: a bug, caught by tests/engine/test_config.py
        raise TypeError(f"config section {name} declares {extra}, which {cls.__name__} does not take")
    return kwargs


def _resolve_backend_name(cfg: dict, backend: Optional[str]) -> str:
    name = backend if backend is not None else config_value(cfg, "ops_backend")
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
    if config_value(cfg, "model") != "DFINE":
        raise ValueError(f"build_model: only model: DFINE is supported, got {config_value(cfg, 'model')!r}")
    parts = config_section(cfg, "DFINE")
    for role, default in (("backbone", "HGNetv2"), ("encoder", "HybridEncoder"), ("decoder", "DFINETransformer")):
        if parts[role] != default:
            raise ValueError(f"build_model: DFINE.{role} must be {default}, got {parts[role]!r}")
    name = _resolve_backend_name(cfg, backend)
    backbone = HGNetv2(**_section_kwargs(cfg, "HGNetv2", HGNetv2))
    encoder = HybridEncoder(**_section_kwargs(cfg, "HybridEncoder", HybridEncoder))
    decoder_kwargs = _section_kwargs(cfg, "DFINETransformer", DFINETransformer)
    decoder_kwargs["backend"] = name
    decoder = DFINETransformer(**decoder_kwargs)
    return set_backend(DFINE(backbone, encoder, decoder), name)


def build_postprocessor(cfg: dict):
    kwargs = _section_kwargs(cfg, "DFINEPostProcessor", DFINEPostProcessor)
    return DFINEPostProcessor(**kwargs)
