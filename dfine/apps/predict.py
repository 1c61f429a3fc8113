"""``python -m dfine predict``: run a checkpoint on images or a video, draw boxes, write COCO-format results.

    python -m dfine predict -c CFG -r CKPT --input IMG_OR_DIR --output DIR [--threshold 0.4] [--backend auto]
    python -m dfine predict ... --backend onnxruntime [--onnx model.onnx]    # exported graph (dfine.deploy)
    python -m dfine predict ... --backend openvino [--onnx model.onnx|.xml]  # OpenVINO on the CPU (cached IR)
    python -m dfine predict ... --compile                                    # torch.compile (dfine.deploy.compiled)
    python -m dfine predict ... --input clip.mp4                             # video (dfine.apps.video)

Every path goes through a runner (dfine.deploy.runners): runner(images [N,3,H,W], orig_sizes [N,2] (w, h)) ->
(labels, boxes, scores), fed by the same `dfine.deploy.preprocess`.

Class names and ``category_id``s come from the checkpoint's class metadata (an ONNX file's metadata_props with
``--onnx``), ``--classes FILE`` overriding (`dfine.model.classes`); ``images.json`` lists them as COCO
``categories``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import List

import torch
import torchvision
from torchvision.utils import draw_bounding_boxes
from tqdm import tqdm

from dfine.apps.common import (PredictError, add_classes_argument, add_trust_argument, coco_records, detect,
                               label_texts, print_notice)
from dfine.apps.video import is_video, predict_video
from dfine.config import ConfigError
from dfine.deploy import (TorchRunner, input_size, list_images, load_detector, onnxruntime_runner, openvino_runner,
                          read_image)
from dfine.deploy.images import to_uint8
from dfine.deploy.cpu import loaded_allocator, retain_freed_memory
from dfine.deploy.loader import detector_classes
from dfine.model.checkpoint import checkpoint_metadata
from dfine.ops import BACKENDS

GRAPH_BACKENDS = ["onnxruntime", "openvino"]  # run an exported graph instead of the PyTorch model
RUNNER_BACKENDS = list(BACKENDS) + GRAPH_BACKENDS


def load_runner(config: str, checkpoint: str, backend: str = "auto", device: str = "cpu", onnx=None,
                compiled: bool = False, trusted: bool = False, classes=None, cache_dir=True):
    """(runner, cfg, postprocessor, ClassInfo): the detector of `dfine.deploy.load_detector` (deployed, with the
    CPU inference forms on the CPU), an onnxruntime session or an OpenVINO compiled model. ``classes``: a
    ``--classes`` file. `cache_dir`: where --backend openvino keeps converted checkpoints (True: the default
    place; None: nowhere)."""
    if backend in GRAPH_BACKENDS and compiled:
        raise PredictError(f"--compile applies to the PyTorch model, not to --backend {backend}")
    if backend in GRAPH_BACKENDS:
        if backend == "onnxruntime":
            runner, cfg, post = onnxruntime_runner(config, checkpoint, onnx, device, trusted=trusted)
        else:
            runner, cfg, post = openvino_runner(config, checkpoint, onnx, device, trusted=trusted, cache_dir=cache_dir)
        record = getattr(runner, "class_metadata", None) if onnx is not None else None
        if record is not None:
            info = detector_classes(cfg, record, classes, source=f"ONNX file {str(onnx)!r}")
        else:  # an on-the-fly export, or a file exported without class metadata: what the checkpoint records
            try:
                metadata = checkpoint_metadata(checkpoint, trusted=trusted) if Path(checkpoint).is_file() else {}
            except ValueError as err:
                raise PredictError(str(err)) from None
            info = detector_classes(cfg, metadata.get("classes"), classes, source=f"checkpoint {str(checkpoint)!r}")
        return runner, cfg, post, info
    if onnx is not None:
        raise PredictError("--onnx is only used with --backend onnxruntime or openvino")
    det = load_detector(config, checkpoint, device=device, backend=backend, compile=compiled, trusted=trusted,
                        classes=classes)
    return TorchRunner(det.graph()), det.cfg, det.postprocessor, det.classes


def output_names(images: List[Path]) -> List[str]:
    """The drawn image's file name for each input: ``<stem>.jpg``, or ``<stem>.<ext>.jpg`` for inputs whose stems
    collide (``a.jpg`` and ``a.png`` in one directory), so no result overwrites another."""
    stems = Counter(p.stem for p in images)
    return [f"{p.stem}.jpg" if stems[p.stem] == 1 else f"{p.stem}{p.suffix.lower()}.jpg" for p in images]


def check_no_overwrite(inputs: List[Path], outputs: List[Path]) -> None:
    """Refuse (before anything is written) when an output file would replace an input file."""
    taken = {p.resolve() for p in inputs}
    for out in outputs:
        if out.resolve() in taken:
            raise PredictError(f"--output would overwrite the input image {str(out)!r}; choose another directory")


def predict(config, checkpoint, input_path, output_dir, threshold=0.4, backend="auto", device="cpu",
            onnx=None, compiled=False, trusted=False, classes=None, cache_dir=True) -> dict:
    """Returns {"results": [COCO detections], "images": [...], "categories": [{"id", "name"}], "errors": [messages],
    "classes": ClassInfo} (+ "video" for a video).

    backend: a fused-op backend (PyTorch), "onnxruntime" or "openvino" (the file `onnx`, else the checkpoint
    exported on the fly; openvino keeps the conversion in `cache_dir`).
    classes: a ``--classes`` file overriding the names (and ids) the checkpoint records."""
    video = is_video(input_path)
    images = [] if video else list_images(Path(input_path))
    runner, cfg, post, info = load_runner(config, checkpoint, backend, device, onnx, compiled, trusted, classes,
                                          cache_dir)
    size = input_size(cfg)
    if video:
        out = predict_video(runner, size, input_path, output_dir, threshold, device, info)
        out["classes"] = info
        return out
    out_dir = Path(output_dir)
    drawn_names = output_names(images)
    check_no_overwrite(images, [out_dir / n for n in drawn_names] + [out_dir / "results.json", out_dir / "images.json"])
    out_dir.mkdir(parents=True, exist_ok=True)
    results, infos, errors = [], [], []
    for image_id, path in enumerate(tqdm(images, disable=len(images) == 1, desc="predict")):
        try:
            image = read_image(path)
        except PredictError as err:
            if len(images) == 1:
                raise
            errors.append(str(err))
            continue
        h, w = image.shape[-2:]
        labels, boxes, scores = detect(runner, image, size, threshold, device)
        drawn = draw_bounding_boxes(to_uint8(image), boxes, labels=label_texts(info, labels, scores), colors="red",
                                    width=2)
        torchvision.io.write_jpeg(drawn, str(out_dir / drawn_names[image_id]))
        infos.append({"id": image_id, "file_name": path.name, "width": int(w), "height": int(h)})
        results += coco_records(info, image_id, labels, boxes, scores)
    with open(out_dir / "results.json", "w") as f:
        json.dump(results, f)
    with open(out_dir / "images.json", "w") as f:
        json.dump({"images": infos, "categories": info.categories()}, f, indent=1)
    return {"results": results, "images": infos, "categories": info.categories(), "errors": errors, "classes": info}


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("-c", "--config", required=True, help="config YAML, e.g. configs/dfine/dfine_hgnetv2_n_coco.yml")
    parser.add_argument("-r", "--resume", required=True, help="checkpoint (.pth): state_dict, {'model'} or {'ema'}")
    parser.add_argument("--input", required=True, help="an image, a directory of images, or a video (.mp4, .avi, ...)")
    parser.add_argument("--output", required=True, help="directory for drawn images (or the video) and results.json")
    parser.add_argument("--threshold", type=float, default=0.4)
    parser.add_argument("--backend", default="auto", choices=RUNNER_BACKENDS,
                        help="fused-op backend of the PyTorch model, or onnxruntime / openvino (an exported graph)")
    parser.add_argument("--onnx", default=None,
                        help="with --backend onnxruntime or openvino: the ONNX file (openvino also reads its IR .xml); "
                             "default: export the checkpoint (onnxruntime: to a temp file each run; openvino: once, "
                             "into --cache-dir)")
    parser.add_argument("--cache-dir", default=None,
                        help="with --backend openvino: where converted checkpoints are kept (default "
                             "$DFINE_CACHE_DIR/openvino or ~/.cache/dfine/openvino); 'none' converts every run")
    parser.add_argument("--device", default="cpu")
    add_classes_argument(parser)
    add_trust_argument(parser)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the deployed model (fused ops in the graph; the first image compiles)")


def run(args) -> int:
    if torch.device(args.device).type == "cpu" and loaded_allocator() == "system":
        # the command owns its process: keep freed activations on the heap for the next image instead
        # of faulting fresh pages in for every large tensor (dfine/deploy/cpu.py)
        retain_freed_memory()
    try:
        if args.cache_dir is not None and args.backend != "openvino":
            raise PredictError("--cache-dir is only used with --backend openvino")
        cache_dir = True if args.cache_dir is None else None if args.cache_dir.lower() == "none" else args.cache_dir
        out = predict(args.config, args.resume, args.input, args.output, args.threshold, args.backend, args.device,
                      onnx=args.onnx, compiled=args.compile, trusted=args.trust_checkpoint, classes=args.classes,
                      cache_dir=cache_dir)
    except (PredictError, ConfigError) as err:  # ConfigError: the config or a -u override
        print(f"error: {err}")
        return 2
    except OSError as err:  # e.g. an unwritable or full --output
        print(f"error: cannot write the results to --output {args.output!r}: {err.strerror or err}")
        return 2
    print_notice(out["classes"])
    for msg in out["errors"]:
        print(f"error: {msg}")
    unit = "frame(s)" if "video" in out else "image(s)"
    print(f"{len(out['images'])} {unit}, {len(out['results'])} detection(s) > {args.threshold} -> {args.output}")
    return 1 if out["errors"] else 0
