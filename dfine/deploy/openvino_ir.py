"""OpenVINO as a CPU runtime: a checkpoint converted through the ONNX export, and a cache of the converted models.

The conversion goes through this project's own ONNX export (``export_onnx``: the tested graph, standard
operators only) and OpenVINO's ONNX reader, then ``openvino.save_model`` writes the IR (weights kept in
float32). The direct route, ``openvino.convert_model`` on the PyTorch module, gave the same detections on a
tiny D-FINE-N but took about 8x longer (52 s against 6.6 s on 2 cores) and traces the model a second, untested way.

Exporting is the slow part (seconds to tens of seconds), so the converted IR is kept in a cache directory
under a key that covers everything it was made from: the checkpoint's bytes, the loaded config, the input
size, the opset, the dfine sources, the torch and openvino versions and whether the checkpoint was trusted.
Any change gives a new key; a stale entry is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch

from dfine.config import load_config
from dfine.deploy.graph import DeployError
from dfine.deploy.loader import input_size, load_detector, require_file
from dfine.deploy.onnx_export import DEFAULT_OPSET, export_onnx
from dfine.deploy.runners import OpenVinoRunner, require_openvino
from dfine.model import build_postprocessor

__all__ = ["default_cache_dir", "openvino_cache_key", "openvino_runner"]

_PACKAGE = Path(__file__).resolve().parents[1]
_IR_NAME = "model.xml"


def default_cache_dir() -> Path:
    """``$DFINE_CACHE_DIR/openvino``, else ``$XDG_CACHE_HOME/dfine/openvino``, else ``~/.cache/dfine/openvino``."""
    if os.environ.get("DFINE_CACHE_DIR"):
        return Path(os.environ["DFINE_CACHE_DIR"]) / "openvino"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dfine" / "openvino"


def _sources_digest() -> str:
    """The dfine Python sources: a code change (a fixed layer, another export) must not reuse an old IR."""
    h = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        h.update(str(path.relative_to(_PACKAGE)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def openvino_cache_key(cfg: dict, checkpoint: str, trusted: bool = False) -> str:
    """The cache key of the IR converted from ``checkpoint`` under the loaded config ``cfg``."""
    h = hashlib.sha256()
    with open(checkpoint, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    meta = {"config": cfg, "size": input_size(cfg), "opset": DEFAULT_OPSET, "trusted": bool(trusted),
            "torch": torch.__version__, "openvino": require_openvino().__version__, "sources": _sources_digest()}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _convert(config, checkpoint, trusted: bool, ir_path: Path) -> None:
    """Export the checkpoint to ONNX (static, the config's input size), read it into OpenVINO, save the IR."""
    ov = require_openvino()
    det = load_detector(config, checkpoint, backend="reference", optimize=False, trusted=trusted)
    with tempfile.TemporaryDirectory(prefix="dfine_onnx_") as tmp:
        onnx_path = export_onnx(det.graph(), os.path.join(tmp, "model.onnx"), input_size(det.cfg))
        model = ov.Core().read_model(str(onnx_path))
        # float32 weights: save_model would compress them to float16 by default
        ov.save_model(model, str(ir_path), compress_to_fp16=False)


def openvino_runner(config: str, checkpoint: str, model_path: Optional[str] = None, device: str = "cpu",
                    threads: Optional[int] = None, trusted: bool = False,
                    cache_dir: Union[str, os.PathLike, None, bool] = True):
    """``(OpenVinoRunner, cfg, postprocessor)``.

    ``model_path``: an ONNX file (``python -m dfine export``) or an OpenVINO IR ``.xml``, read as it is. Without
    it the checkpoint is converted (ONNX export at the config's input size, then OpenVINO) and the IR cached
    in ``cache_dir`` (True: ``default_cache_dir()``; None or False: convert every time, keep nothing)."""
    cfg = load_config(require_file(config, "config"))
    postprocessor = build_postprocessor(cfg).deploy()
    if model_path is not None:
        runner = OpenVinoRunner(model_path, threads=threads, device=device)
    else:
        OpenVinoRunner.check_device(device)
        require_file(checkpoint, "checkpoint")
        if cache_dir is True:
            cache_dir = default_cache_dir()
        if not cache_dir:
            with tempfile.TemporaryDirectory(prefix="dfine_openvino_") as tmp:
                _convert(config, checkpoint, trusted, Path(tmp) / _IR_NAME)
                runner = OpenVinoRunner(Path(tmp) / _IR_NAME, threads=threads, device=device)
        else:
            entry = Path(cache_dir) / openvino_cache_key(cfg, checkpoint, trusted)
            if not (entry / _IR_NAME).is_file():
                _fill_cache_entry(entry, config, checkpoint, trusted)
            runner = OpenVinoRunner(entry / _IR_NAME, threads=threads, device=device)
            runner.cache_entry = entry
    expected = input_size(cfg)
    got = runner.input_size
    if any(g is not None and g != e for g, e in zip(got, expected)):
        raise DeployError(f"the model file takes {got[0]} x {got[1]} images but the config's eval_spatial_size is "
                          f"{expected[0]} x {expected[1]}; export it with --size {expected[0]} {expected[1]} "
                          "or --dynamic-size")
    return runner, cfg, postprocessor


def _fill_cache_entry(entry: Path, config, checkpoint, trusted: bool) -> None:
    """Convert into a fresh directory beside ``entry`` and rename it into place: a reader never sees half an
    entry, and of two processes converting at once one wins and the other's copy is dropped."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    except OSError as err:
        raise DeployError(f"cannot write the OpenVINO cache {str(entry.parent)!r} ({err.strerror or err}); "
                          "choose another with --cache-dir, or --cache-dir none") from None
    try:
        _convert(config, checkpoint, trusted, work / _IR_NAME)
        (work / "source.json").write_text(json.dumps(
            {"config": os.path.abspath(config), "checkpoint": os.path.abspath(checkpoint)}, indent=1))
        if entry.exists() and not (entry / _IR_NAME).is_file():
            shutil.rmtree(entry, ignore_errors=True)  # a broken entry left by hand: replace it
        try:
            os.rename(work, entry)
        except OSError:
            if not (entry / _IR_NAME).is_file():  # not another process's finished entry
                raise DeployError(f"cannot write the OpenVINO cache entry {str(entry)!r}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
