"""YAML configs in the published layout, read by plain code.

`__include__` files (paths relative to the including file) are merged in order, then the file
itself on top: later wins, dicts merge recursively. Sections are named after the classes they
build (`DFINE`, `HGNetv2`, `HybridEncoder`, `DFINETransformer`, `DFINEPostProcessor`, ...).
"""

from __future__ import annotations

import copy
import os
from typing import Iterable, Optional

import yaml


__all__ = ["load_config", "merge_dict"]


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
