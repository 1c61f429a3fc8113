"""YAML configs in the published layout, strictly checked against one declaration (`dfine.config.schema`).

`__include__` files (paths relative to the including file) are merged in order, then the file
itself on top: later wins, dicts merge recursively, lists are replaced. Sections are named after the
classes they build (`DFINE`, `HGNetv2`, `HybridEncoder`, `DFINETransformer`, `DFINEPostProcessor`, ...).

`load_config` then checks the merged config: a key that `dfine.config.schema.SCHEMA` does not declare, a
value of the wrong type, or a value we cannot honour (e.g. a ``type:`` naming a class we do not
implement, a ``transforms.ops`` entry naming an unknown op or parameter) raises `ConfigError`, naming the
key, the file (or ``-u`` override) that set it and, for an unknown key, the closest known one.

Code reads values with `config_value(cfg, "Section.key")` and `config_section(cfg, "Section")`, whose
defaults come from the schema.
"""

from __future__ import annotations

import copy
import difflib
import os
from typing import Any, Iterable, List, Optional, Tuple

import yaml

from dfine.config.schema import INHERITED, SCHEMA, TRANSFORM_OPS, Key, ListOf, Section

__all__ = ["ConfigError", "load_config", "merge_dict", "validate_config", "config_value", "config_section",
           "SCHEMA"]


class ConfigError(ValueError):
    """A config that cannot be used as written: unknown key, wrong type, or a value we cannot honour.
    The message is one line naming the key, where it was set and (for unknown keys) the closest known key."""


def merge_dict(base: dict, update: dict) -> dict:
    """Recursive merge of `update` into a copy of `base` (update wins); inputs are not modified."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dict(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _display(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _load_file(path: str, seen: tuple, sources: list) -> dict:
    """Merged config of `path`; appends (shown file name, the file's own mapping) to `sources` in merge order."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_config: config file {path!r} does not exist")
    if path in seen:
        raise ConfigError(f"load_config: include cycle through {path!r}")
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{_display(path)} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"load_config: {path!r} must hold a mapping at top level")
    includes = cfg.pop("__include__", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for inc in includes:
        inc_path = inc if os.path.isabs(inc) else os.path.join(os.path.dirname(path), inc)
        merged = merge_dict(merged, _load_file(inc_path, seen + (path,), sources))
    sources.append((_display(path), cfg))
    return merge_dict(merged, cfg)


def _apply_override(cfg: dict, item: str) -> Tuple[str, ...]:
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"load_config: override {item!r} must look like 'Section.key=value'")
    dotted, raw = item.split("=", 1)
    keys = tuple(k.strip() for k in dotted.strip().split("."))
    if not all(keys):
        raise ConfigError(f"load_config: override {item!r} must look like 'Section.key=value'")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"config key {'.'.join(keys)!r} from the override {item!r}: the value {raw!r} "
                          "is not valid YAML") from None
    node = cfg
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value
    return keys


class _Origins:
    """Where each key of the merged config was set: the last override or file (in merge order) that holds it."""

    def __init__(self, sources: list, overrides: List[Tuple[Tuple[str, ...], str]]):
        self.sources = sources
        self.overrides = overrides

    def __call__(self, path: Tuple[str, ...]) -> str:
        keys = tuple(k for k in path if isinstance(k, str))[: _dict_depth(path)]
        for opath, item in reversed(self.overrides):
            if keys[: len(opath)] == opath or opath[: len(keys)] == keys:
                return f"the -u override {item!r}"
        for name, own in reversed(self.sources):
            node, found = own, True
            for k in keys:
                if isinstance(node, dict) and k in node:
                    node = node[k]
                else:
                    found = False
                    break
            if found:
                return name
        return "the config"


def _dict_depth(path: tuple) -> int:
    """Number of leading mapping keys of a path (list indices stop it: lists are replaced as a whole)."""
    n = 0
    for k in path:
        if not isinstance(k, str):
            break
        n += 1
    return n


def _dotted(path: tuple) -> str:
    out = ""
    for k in path:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else k)
    return out


def _all_leaf_paths(section: Section, prefix=()) -> List[Tuple[str, ...]]:
    out = []
    for name, spec in section.keys.items():
        out.append(prefix + (name,))
        if isinstance(spec, Section):
            out += _all_leaf_paths(spec, prefix + (name,))
        elif isinstance(spec, ListOf):
            out += _all_leaf_paths(spec.item, prefix + (name,))
    return out


def _suggest(name: str, known: Iterable[str]) -> Optional[str]:
    known = list(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return close[0]
    lower = {k.lower(): k for k in known}
    return lower.get(name.lower())


class _Checker:
    def __init__(self, origin: _Origins):
        self.origin = origin

    def fail(self, path, message):
        raise ConfigError(f"config key {_dotted(path)!r} in {self.origin(path)}: {message}")

    def unknown(self, path, known):
        name = path[-1]
        hint = _suggest(name, known)
        if hint is None:
            # another section may have it: suggest the full dotted key
            candidates = {_dotted(p): p[-1] for p in _all_leaf_paths(SCHEMA)}
            close = difflib.get_close_matches(name, list(candidates.values()), n=1, cutoff=0.75)
            if close:
                hint = next(d for d, last in candidates.items() if last == close[0])
        msg = f"unknown config key {_dotted(path)!r} in {self.origin(path)}"
        if hint is not None:
            msg += f" (did you mean {hint!r}?)"
        raise ConfigError(msg)

    def section(self, node, spec: Section, path):
        if node is None:
            return
        if not isinstance(node, dict):
            self.fail(path, f"expected a mapping (section), got {node!r}")
        for name, value in node.items():
            sub = path + (name,)
            if not isinstance(name, str) or name not in spec.keys:
                self.unknown(path + (str(name),), [k for k in spec.keys])
            child = spec.keys[name]
            if isinstance(child, Section):
                self.section(value, child, sub)
            elif isinstance(child, ListOf):
                if value is None and child.nullable:
                    continue
                if not isinstance(value, list):
                    self.fail(sub, f"expected a list of mappings, got {value!r}")
                for i, item in enumerate(value):
                    if not isinstance(item, dict):
                        self.fail(sub + (i,), f"expected a mapping, got {item!r}")
                    self.section(item, child.item, sub + (i,))
                    for req, kspec in child.item.keys.items():
                        if isinstance(kspec, Key) and kspec.default is None and not kspec.nullable and req not in item:
                            self.fail(sub + (i,), f"needs the key {req!r}")
            else:
                node[name] = self.key(value, child, sub)

    def key(self, value, spec: Key, path):
        if value is None:
            if spec.nullable:
                return None
            self.fail(path, f"must be set ({_describe(spec)}), got null")
        value = self.typed(value, spec.types, path, spec)
        if isinstance(value, list):
            if spec.length is not None and len(value) != spec.length:
                self.fail(path, f"expected {spec.length} values, got {value!r}")
            if spec.items:
                value = [self.typed(v, spec.items, path + (i,), spec) for i, v in enumerate(value)]
            for i, v in enumerate(value if spec.item_choices is not None else []):
                if v not in spec.item_choices:
                    self.fail(path + (i,), f"{v!r} is not supported here (supported: "
                                           f"{', '.join(map(repr, spec.item_choices))})")
        if isinstance(value, dict) and spec.keys is not None:
            for k, v in value.items():
                if k not in spec.keys:
                    self.unknown(path + (str(k),), spec.keys)
                value[k] = self.typed(v, _FLOATS, path + (k,), spec)
        if spec.choices is not None and not any(_same(value, c) for c in spec.choices):
            supported = [c for c in spec.choices if c is not None]
            text = " or ".join(repr(c) for c in supported)
            self.fail(path, f"{value!r} is not supported here (supported: {text})")
        return value

    def typed(self, value, types, path, spec):
        if not types:
            return value
        if float in types and isinstance(value, str):
            try:  # YAML 1.1 reads 1e-4 (no dot) as a string
                return float(value)
            except ValueError:
                pass
        ok = False
        for t in types:
            if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                ok = True
            elif t is int and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            elif t is not int and t is not float and isinstance(value, t):
                ok = True
        if not ok:
            self.fail(path, f"expected {_type_names(types)}, got {value!r}")
        return value


_FLOATS = (float,)


def _type_names(types) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
             dict: "a mapping"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _describe(spec: Key) -> str:
    return _type_names(spec.types) if spec.types else "a value"


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _check_ops(check: _Checker, cfg: dict):
    """Every `transforms.ops` entry is a known op type (schema.TRANSFORM_OPS) with known parameters of the right
    types and its required ones (`policy.ops` may name known op types only: schema). (The order rules - ConvertBoxes
    last, Mosaic / MixUp before ConvertPILImage - are checked when the pipeline is built: dfine.data.transforms.)"""
    for split in ("train", "val"):
        transforms = (((cfg.get(f"{split}_dataloader") or {}).get("dataset") or {}).get("transforms") or {})
        ops = transforms.get("ops")
        path = (f"{split}_dataloader", "dataset", "transforms", "ops")
        for i, op in enumerate(ops or []):
            where = path + (i,)
            if not isinstance(op, dict) or "type" not in op:
                check.fail(where, f"expected a mapping with a 'type' (an op such as {{type: Resize, size: [640, 640]}}), "
                                  f"got {op!r}")
            op_type = op["type"]
            if op_type not in TRANSFORM_OPS:
                hint = _suggest(str(op_type), TRANSFORM_OPS)
                check.fail(where + ("type",), f"unknown transform op {op_type!r}"
                           + (f" (did you mean {hint!r}?)" if hint else "") + f"; known: {', '.join(TRANSFORM_OPS)}")
            spec = TRANSFORM_OPS[op_type]
            for name in [k for k in op if k != "type"]:
                if name not in spec.keys:
                    hint = _suggest(str(name), spec.keys)
                    listed = ", ".join(spec.keys) or "none"
                    check.fail(where + (str(name),), f"{op_type} has no parameter {name!r}"
                               + (f" (did you mean {hint!r}?)" if hint else "") + f"; its parameters: {listed}")
                op[name] = check.key(op[name], spec.keys[name], where + (name,))
            for name, kspec in spec.keys.items():
                if kspec.default is None and not kspec.nullable and name not in op:
                    check.fail(where, f"{op_type} needs the parameter {name!r}")


def validate_config(cfg: dict, sources: Optional[list] = None, overrides=()) -> dict:
    """Check a merged config against the schema (in place: numeric strings such as 1e-4 become floats).

    sources: (file name, own mapping) in merge order, and overrides: (key path, text) in order, for naming
    where a bad key came from. Raises ConfigError."""
    check = _Checker(_Origins(list(sources or []), list(overrides)))
    check.section(cfg, SCHEMA, ())
    _check_ops(check, cfg)
    return cfg


def load_config(path: str, overrides: Optional[Iterable[str]] = None) -> dict:
    """Read a config file with its includes; apply overrides such as "DFINETransformer.num_denoising=0";
    check every key against `dfine.config.schema.SCHEMA` (ConfigError names a bad key and where it was set)."""
    sources: list = []
    cfg = _load_file(os.fspath(path), (), sources)
    applied = []
    for item in overrides or []:
        applied.append((_apply_override(cfg, item), item))
    return validate_config(cfg, sources, applied)


# ------------------------------------------------------------------------------------------------
# reading values, defaults from the schema


def _spec(dotted: str):
    spec: Any = SCHEMA
    for k in dotted.split("."):
        if isinstance(spec, ListOf):
            spec = spec.item
        if not isinstance(spec, Section) or k not in spec.keys:
            raise KeyError(f"{dotted!r} is not a key of dfine.config.schema.SCHEMA")
        spec = spec.keys[k]
    return spec


def _default(spec, cfg: dict):
    if isinstance(spec, Key):
        if spec.inherit is not None:
            return config_value(cfg, spec.inherit)
        return copy.deepcopy(spec.default)
    if isinstance(spec, ListOf):
        return copy.deepcopy(spec.default)
    return _filled({}, spec, cfg)


def _filled(node: Optional[dict], spec: Section, cfg: dict) -> dict:
    node = node or {}
    out = {}
    for name, child in spec.keys.items():
        if name in node and not (isinstance(child, Section) and node[name] is None):
            value = node[name]
            out[name] = _filled(value, child, cfg) if isinstance(child, Section) else value
        else:
            out[name] = _default(child, cfg)
    return out


def config_value(cfg: dict, dotted: str):
    """The value of ``"Section.sub.key"`` in `cfg`, else its schema default (for a section: the section
    with every default filled in). A key that the schema does not declare is a KeyError (a bug)."""
    spec = _spec(dotted)
    node: Any = cfg
    keys = dotted.split(".")
    for i, k in enumerate(keys):
        if not isinstance(node, dict) or k not in node:
            return _default(spec, cfg)
        if node[k] is None:  # a null section is an empty one; a null key is null
            return _default(spec, cfg) if i < len(keys) - 1 or not isinstance(spec, Key) else None
        node = node[k]
    return _filled(node, spec, cfg) if isinstance(spec, Section) else node


def config_section(cfg: dict, dotted: str) -> dict:
    """Section ``dotted`` of `cfg` with every declared key, defaults from the schema (top-level keys such as
    num_classes filled in where the section takes them, `schema.INHERITED`)."""
    spec = _spec(dotted)
    if not isinstance(spec, Section):
        raise KeyError(f"{dotted!r} is a key, not a section")
    return config_value(cfg, dotted)


assert all(k in SCHEMA.keys for k in INHERITED)
