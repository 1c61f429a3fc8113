"""YAML configs in the published layout, read by plain code.

`__include__` files (paths relative to the including file) are merged in order, then the file
itself on top: later wins, dicts merge recursively. Sections are named after the classes they
build (`DFINE`, `HGNetv2`, `HybridEncoder`, `DFINETransformer`, `DFINEPostProcessor`, ...).
"""

from __future__ import annotations

import copy
import inspect
import os
from typing import Iterable, Optional

import yaml

from dfine.ops import BACKENDS

__all__ = ["load_config", "build_model", "build_postprocessor", "set_backend", "merge_dict"]


def merge_dict(base: dict, update: dict) -> dict:
    """Recursive merge of `update` into a copy of `base` (update wins); inputs are not modified."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dict(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_file(path: str, seen: tuple) -> dict:
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_config: config file {path!r} does not exist")
    if path in seen:
        raise ValueError(f"load_config: include cycle through {path!r}")
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"load_config: {path!r} must hold a mapping at top level")
    includes = cfg.pop("__include__", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for inc in includes:
        inc_path = inc if os.path.isabs(inc) else os.path.join(os.path.dirname(path), inc)
        merged = merge_dict(merged, _load_file(inc_path, seen + (path,)))
    return merge_dict(merged, cfg)


def _apply_override(cfg: dict, item: str) -> None:
    if "=" not in item:
        raise ValueError(f"load_config: override {item!r} must look like 'Section.key=value'")
    dotted, raw = item.split("=", 1)
    keys = dotted.strip().split(".")
    node = cfg
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = yaml.safe_load(raw)


def load_config(path: str, overrides: Optional[Iterable[str]] = None) -> dict:
    """Read a config file with its includes; apply overrides such as "DFINETransformer.num_denoising=0"."""
    cfg = _load_file(path, ())
    for item in overrides or []:
        _apply_override(cfg, item)
    return cfg


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
    from dfine.model import DFINE, DFINETransformer, HGNetv2, HybridEncoder

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
    from dfine.model import DFINEPostProcessor

    kwargs = _section_kwargs(cfg, "DFINEPostProcessor", DFINEPostProcessor,
                             ("num_classes", "use_focal_loss", "remap_mscoco_category"))
    return DFINEPostProcessor(**kwargs)
