"""Checkpoint files: reading them (published raw state_dicts, {"model": ...}, {"ema": {"module": ...}},
training checkpoints), loading their weights into a model, and writing them atomically."""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass, field
from typing import List, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

__all__ = ["extract_state_dict", "load_checkpoint", "LoadReport", "save_atomic", "load_training_checkpoint",
           "read_checkpoint", "remove_stale_temporaries", "UntrustedCheckpointError"]

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
        if self.skipped_keys:
            lines.append(f"skipped ({len(self.skipped_keys)}): {', '.join(self.skipped_keys[:20])}")
        return "\n".join(lines) if lines else "all keys matched"


def load_checkpoint(model: torch.nn.Module, checkpoint, strict: bool = True, skip_mismatched: bool = False,
                    trusted: bool = False) -> LoadReport:
    """Load weights into `model`.

    strict=True raises a ValueError listing every missing/unexpected key and shape mismatch.
    A checkpoint in deploy format (fused convs) deploys the model first (report.deployed).
    skip_mismatched=True leaves tensors whose shapes differ (e.g. class heads for another class
    count) at their current values and lists them in `report.skipped_keys`; use it with
    strict=False when fine-tuning. A file is read with ``weights_only=True`` unless ``trusted``."""
    state = extract_state_dict(checkpoint, trusted=trusted)
    deployed = False
    if _is_deploy_format(state) and not _is_deploy_format(model.state_dict()) and hasattr(model, "deploy"):
        model.deploy()  # fused-conv checkpoint: convert the model to the same layout first
        deployed = True
    own = model.state_dict()
    report = LoadReport(deployed=deployed)
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
