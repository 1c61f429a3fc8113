"""Checkpoint files: reading them (published raw state_dicts, {"model": ...}, {"ema": {"module": ...}},
training checkpoints, .safetensors), loading their weights into a model (with the Objects365 <-> COCO
class-row mapping of fine-tuning), what they record besides weights (class metadata, config), and writing
them atomically."""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors_file

from dfine.model.classes import OBJ365_IDS_FOR_COCO, OBJ365_NUM_CLASSES

__all__ = ["extract_state_dict", "load_checkpoint", "LoadReport", "save_atomic", "load_training_checkpoint",
           "read_checkpoint", "remove_stale_temporaries", "UntrustedCheckpointError", "METADATA_KEYS",
           "checkpoint_metadata", "save_safetensors", "class_row_mapping", "class_shaped_keys"]

# what a checkpoint records besides weights: "classes" (dfine.model.classes) and "config" (the merged config
# it was trained with); plain dicts, lists, strings and numbers, so they load under weights_only=True
METADATA_KEYS = ("classes", "config")

TRUST_HINT = ("if you trust the file, load it with trusted=True (command lines: --trust-checkpoint); "
              "a checkpoint written by this project never needs that")


class UntrustedCheckpointError(ValueError):
    """A checkpoint file whose pickle needs more than tensors and plain containers to load, i.e. could run code."""


def read_checkpoint(path, trusted: bool = False, what: str = "checkpoint"):
    """``torch.load`` of a checkpoint file onto the CPU with ``weights_only=True``: tensors, numbers, strings and
    containers only, so a file cannot run code while it loads. A ``.safetensors`` file gives its state_dict. ``trusted=True`` allows any pickle (only for files
    you trust). Raises FileNotFoundError, UntrustedCheckpointError, or ValueError for an unreadable file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise FileNotFoundError(f"{what} {path!r} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path!r} does not exist")
    if path.endswith(".safetensors"):  # tensors only by construction: a flat state_dict
        try:
            return load_safetensors(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{what} {path!r} could not be read ({type(err).__name__}: {str(err)[:300]})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as err:
        # weights_only refuses a pickle that names a global (a function or class to call): that is code.
        # Other unpickler errors ("Unsupported operand ...") are files that are not checkpoints at all.
        globals_named = [line.strip() for line in str(err).splitlines() if "global" in line.lower()]
        if not trusted and globals_named:
            raise UntrustedCheckpointError(f"{what} {path!r} was refused: loading it would run code from the file "
                                           f"({globals_named[0][:200]}); {TRUST_HINT}") from None
        raise ValueError(f"{what} {path!r} could not be read ({type(err).__name__}: {err})") from None
    except Exception as err:  # a truncated or foreign file: zip/pickle/EOF errors of several types
        raise ValueError(f"{what} {path!r} could not be read ({type(err).__name__}: {str(err)[:300]})") from None


def extract_state_dict(checkpoint, trusted: bool = False) -> dict:
    """The model weights inside a checkpoint (a dict or a file, read by ``read_checkpoint``); EMA weights are
    preferred like the release does."""
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint(checkpoint, trusted=trusted)
    if not isinstance(checkpoint, dict):
        raise TypeError(f"load_checkpoint: expected a dict or a path, got {type(checkpoint).__name__}")
    ema = checkpoint.get("ema")
    if isinstance(ema, dict) and isinstance(ema.get("module"), dict):
        return ema["module"]
    if isinstance(checkpoint.get("model"), dict):
        return checkpoint["model"]
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    raise ValueError(
        "load_checkpoint: no weights found; expected a state_dict, {'model': state_dict} or "
        f"{{'ema': {{'module': state_dict}}}}, got keys {sorted(checkpoint)[:8]}"
    )


@dataclass
class LoadReport:
    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    shape_mismatches: List[Tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, checkpoint, model)
    skipped_keys: List[str] = field(default_factory=list)
    deployed: bool = False  # the checkpoint was in deploy format, so model.deploy() ran first
    mapped_keys: List[str] = field(default_factory=list)  # class rows copied by a class table (map_classes=True)
    class_mapping: str = ""  # which table, e.g. "Objects365 (366 classes) -> COCO (80)"

    @property
    def ok(self) -> bool:
        return not (self.missing_keys or self.unexpected_keys or self.shape_mismatches)

    def __str__(self) -> str:
        lines = []
        if self.missing_keys:
            lines.append(f"missing in checkpoint ({len(self.missing_keys)}): {', '.join(self.missing_keys[:20])}")
        if self.unexpected_keys:
            lines.append(f"unexpected in checkpoint ({len(self.unexpected_keys)}): {', '.join(self.unexpected_keys[:20])}")
        for k, a, b in self.shape_mismatches[:20]:
            lines.append(f"shape mismatch {k}: checkpoint {list(a)} vs model {list(b)}")
        if self.mapped_keys:
            lines.append(f"class rows mapped {self.class_mapping} ({len(self.mapped_keys)}): "
                         f"{', '.join(self.mapped_keys[:20])}")
        if self.skipped_keys:
            lines.append(f"skipped ({len(self.skipped_keys)}): {', '.join(self.skipped_keys[:20])}")
        return "\n".join(lines) if lines else "all keys matched"


def load_checkpoint(model: torch.nn.Module, checkpoint, strict: bool = True, skip_mismatched: bool = False,
                    trusted: bool = False, map_classes: bool = False) -> LoadReport:
    """Load weights into `model`.

    strict=True raises a ValueError listing every missing/unexpected key and shape mismatch.
    A checkpoint in deploy format (fused convs) deploys the model first (report.deployed).
    skip_mismatched=True leaves tensors whose shapes differ (e.g. class heads for another class
    count) at their current values and lists them in `report.skipped_keys`; use it with
    strict=False when fine-tuning. map_classes=True first copies the class rows of the class-shaped
    tensors between an Objects365 (366 classes) and a COCO (80) model by the published table
    (`class_row_mapping`; report.mapped_keys). A file is read with ``weights_only=True`` unless ``trusted``."""
    state = extract_state_dict(checkpoint, trusted=trusted)
    deployed = False
    if _is_deploy_format(state) and not _is_deploy_format(model.state_dict()) and hasattr(model, "deploy"):
        model.deploy()  # fused-conv checkpoint: convert the model to the same layout first
        deployed = True
    own = model.state_dict()
    report = LoadReport(deployed=deployed)
    if map_classes:
        state, report.mapped_keys, report.class_mapping = _map_class_rows(state, own)
    report.missing_keys = [k for k in own if k not in state]
    report.unexpected_keys = [k for k in state if k not in own]
    to_load = {}
    for k, v in state.items():
        if k not in own:
            continue
        if tuple(v.shape) != tuple(own[k].shape):
            report.shape_mismatches.append((k, tuple(v.shape), tuple(own[k].shape)))
            continue
        to_load[k] = v
    if skip_mismatched:
        report.skipped_keys = [k for k, _, _ in report.shape_mismatches]
    problems = report.missing_keys or report.unexpected_keys or (report.shape_mismatches and not skip_mismatched)
    if strict and problems:
        raise ValueError(f"load_checkpoint: checkpoint does not fit the model:\n{report}")
    if report.shape_mismatches and not skip_mismatched:
        raise ValueError(f"load_checkpoint: shape mismatches (pass skip_mismatched=True to skip them):\n{report}")
    model.load_state_dict(to_load, strict=False)
    return report


# class-shaped tensors of D-FINE: one row per class (score heads), or per class plus the padding row last
# (denoising_class_embed, an Embedding(num_classes + 1) whose last row is its padding_idx)
_SCORE_HEAD = re.compile(r"(^|\.)(enc_score_head|dec_score_head\.\d+)\.(weight|bias)$")
_CLASS_EMBED = re.compile(r"(^|\.)denoising_class_embed\.weight$")


def class_shaped_keys(state: dict) -> List[str]:
    """The keys of ``state`` whose first dimension runs over the classes (score heads of the encoder and of every
    decoder layer, the denoising class embedding)."""
    return [k for k in state if _SCORE_HEAD.search(k) or _CLASS_EMBED.search(k)]


def _num_classes(state: dict) -> Optional[int]:
    for k in class_shaped_keys(state):
        rows = int(state[k].shape[0])
        return rows - 1 if _CLASS_EMBED.search(k) else rows
    return None


def class_row_mapping(source_classes: int, target_classes: int) -> Optional[Tuple[List[Tuple[int, int]], str]]:
    """([(target row, source row), ...], description) of the published fine-tuning's class table between an
    Objects365 model (366 classes; row 0 unused) and a COCO one (80): COCO row c <-> Objects365 row
    OBJ365_IDS_FOR_COCO[c] + 1, either direction. None for any other pair of class counts."""
    if (source_classes, target_classes) == (OBJ365_NUM_CLASSES, 80):
        return ([(c, o + 1) for c, o in enumerate(OBJ365_IDS_FOR_COCO)],
                f"Objects365 ({OBJ365_NUM_CLASSES} classes) -> COCO (80)")
    if (source_classes, target_classes) == (80, OBJ365_NUM_CLASSES):
        return ([(o + 1, c) for c, o in enumerate(OBJ365_IDS_FOR_COCO)],
                f"COCO (80 classes) -> Objects365 ({OBJ365_NUM_CLASSES})")
    return None


def _map_class_rows(state: dict, own: dict) -> Tuple[dict, List[str], str]:
    """``state`` with its class-shaped tensors rebuilt in the model's class layout when the class counts are an
    Objects365/COCO pair: each starts as the model's own tensor (its fresh initialisation: rows the table does
    not cover, the embedding's padding row) and gets the table's rows from the checkpoint."""
    src_k, dst_k = _num_classes(state), _num_classes(own)
    table = class_row_mapping(src_k, dst_k) if src_k is not None and dst_k is not None else None
    if table is None:
        return state, [], ""
    pairs, description = table
    dst_rows = torch.tensor([d for d, _ in pairs])
    src_rows = torch.tensor([s for _, s in pairs])
    out, mapped = dict(state), []
    for key in class_shaped_keys(state):
        if key not in own or tuple(state[key].shape[1:]) != tuple(own[key].shape[1:]):
            continue
        tensor = own[key].detach().clone()
        tensor[dst_rows] = state[key][src_rows].to(tensor.dtype)
        out[key] = tensor
        mapped.append(key)
    return out, mapped, description


def checkpoint_metadata(checkpoint, trusted: bool = False) -> Dict[str, dict]:
    """What a checkpoint records besides weights: ``{"classes": ..., "config": ...}`` with the keys it has
    (`METADATA_KEYS`), ``{}`` for a published or foreign one. ``checkpoint``: a dict from ``read_checkpoint`` or a
    file (a ``.safetensors`` file keeps them as JSON strings in its metadata; only its header is read)."""
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if path.endswith(".safetensors"):
            try:
                with safe_open(path, framework="pt", device="cpu") as f:
                    raw = f.metadata() or {}
            except (SafetensorError, OSError, ValueError) as err:
                raise ValueError(f"checkpoint {path!r} could not be read ({type(err).__name__}: {str(err)[:300]})"
                                 ) from None
            found = {}
            for key in METADATA_KEYS:
                if key in raw:
                    try:
                        found[key] = json.loads(raw[key])
                    except json.JSONDecodeError as err:
                        raise ValueError(f"checkpoint {path!r}: its {key!r} metadata is not valid JSON ({err})"
                                         ) from None
            return found
        checkpoint = read_checkpoint(path, trusted=trusted)
    if not isinstance(checkpoint, dict):
        return {}
    return {k: checkpoint[k] for k in METADATA_KEYS if isinstance(checkpoint.get(k), dict)}


def save_safetensors(state_dict: dict, path, metadata: Optional[dict] = None) -> None:
    """Write a state_dict as ``.safetensors``; ``metadata`` ({"classes": ..., "config": ...}) goes into the file's
    string metadata as JSON. Tensors that share memory (up / reg_scale) are written as copies."""
    tensors = {k: v.detach().clone().contiguous() for k, v in state_dict.items()}
    text = {k: json.dumps(v) for k, v in (metadata or {}).items() if v is not None}
    save_safetensors_file(tensors, os.fspath(path), metadata=text or None)


def _is_deploy_format(state: dict) -> bool:
    return any(".conv_bn_fused." in k for k in state)


TMP_SUFFIX = ".tmp"


def remove_stale_temporaries(directory) -> List[str]:
    """Delete the temporary files that an interrupted ``save_atomic`` (e.g. kill -9) left in ``directory``
    (``<name>.pth.<random>.tmp``); returns their names. Call it where no other process is saving."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in sorted(os.listdir(directory)):
        stem = name[: -len(TMP_SUFFIX)] if name.endswith(TMP_SUFFIX) else ""
        if ".pth." in stem and os.path.isfile(os.path.join(directory, name)):
            os.unlink(os.path.join(directory, name))
            removed.append(name)
    return removed


def save_atomic(obj, path) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over `path`
    (os.replace is atomic on POSIX): readers see the old file or the new one, never half of one."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=TMP_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # a full disk surfaces as OSError, or as torch's zip-writer RuntimeError
        if os.path.exists(tmp):
            os.unlink(tmp)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0][:200]
        intact = "the previous file is intact" if os.path.exists(path) else "nothing was written"
        raise OSError(f"could not write checkpoint {path!r} ({reason}; is the disk full?); {intact}") from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def load_training_checkpoint(path, trusted: bool = False) -> dict:
    """A training checkpoint written by ``Trainer.save`` (weights_only load unless ``trusted``)."""
    ckpt = read_checkpoint(path, trusted=trusted, what="resume checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"resume checkpoint {path!r} is not a training checkpoint (no 'model' entry); "
                         "use -t to fine-tune from released weights")
    return ckpt
