"""``python -m dfine export``: the deployed model and its post-processor as one ONNX graph.

    python -m dfine export -c CFG -r CKPT [--output model.onnx] [--opset 17] [--dynamic-batch] [--dynamic-size]
                           [--size H W] [--check] [--simplify]

The graph's interface and how the fused ops are exported: ``dfine.deploy.onnx_export``. The file's
``metadata_props`` carry the class names and category ids the checkpoint records (``--classes FILE`` overrides):
``names``, ``category_ids`` (JSON lists indexed by label) and ``num_classes``.
"""

from __future__ import annotations

import argparse

from dfine.config import ConfigError
from dfine.apps.common import add_classes_argument, add_trust_argument, print_notice
from dfine.deploy import DeployError, check_onnx, export_onnx, load_detector
from dfine.deploy.onnx_export import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, onnx_op_domains, simplify_onnx
from dfine.model import set_backend


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("-c", "--config", required=True, help="config YAML, e.g. configs/dfine/dfine_hgnetv2_s_coco.yml")
    parser.add_argument("-r", "--resume", required=True, help="checkpoint (.pth): state_dict, {'model'} or {'ema'}")
    parser.add_argument("--output", default="model.onnx", help="ONNX file to write (default: model.onnx)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})")
    parser.add_argument("--dynamic-batch", action="store_true", help="any batch size N")
    parser.add_argument("--dynamic-size", action="store_true", help="any input height and width")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="input size to trace at (default: the config's eval_spatial_size, else 640 640)")
    parser.add_argument("--check", action="store_true",
                        help="run onnx.checker and compare onnxruntime with PyTorch on random inputs")
    parser.add_argument("--simplify", action="store_true", help="simplify with onnxsim (when installed)")
    add_classes_argument(parser)
    add_trust_argument(parser)


def run(args) -> int:
    try:
        det = load_detector(args.config, args.resume, backend="reference", optimize=False,
                            trusted=args.trust_checkpoint, classes=args.classes)
        print_notice(det.classes)
        detector = det.graph()
        h, w = args.size if args.size else det.input_size
        path = export_onnx(detector, args.output, (h, w), opset=args.opset, dynamic_batch=args.dynamic_batch,
                           dynamic_size=args.dynamic_size, metadata=det.classes.onnx_metadata())
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, opset {args.opset}, input 1x3x{h}x{w}"
              f"{', dynamic batch' if args.dynamic_batch else ''}{', dynamic H/W' if args.dynamic_size else ''}; "
              f"{det.classes.num_classes} class names from {det.classes.origin})")
        if args.simplify:
            print(simplify_onnx(path))
        if args.check:
            shapes = [(1, h, w)]
            if args.dynamic_batch:
                shapes.append((3, h, w))
            if args.dynamic_size:
                shapes.append((2 if args.dynamic_batch else 1, h + 32, w + 64))
            domains = onnx_op_domains(path)
            print(f"onnx.checker: ok; node domains: {domains}")
            # PyTorch side: the deployed model with the fused ops when they are built (what predict runs)
            set_backend(detector, "auto")
            failed = False
            for row in check_onnx(path, detector, shapes):
                print(f"  {'x'.join(map(str, row['shape']))}: max |score diff| {row['max_score_diff']:.2e}, "
                      f"max |box diff| {row['max_box_diff']:.2e} px ({row['max_box_diff_rel']:.1e} of the box scale), "
                      f"unmatched detections {int(row['unmatched'])} (+{int(row['boundary'])} near-ties at the top-k cut)")
                failed |= row["unmatched"] > 0 or row["max_score_diff"] > 1e-3 or row["max_box_diff_rel"] > 1e-3
            if set(domains) - {"", "ai.onnx"}:
                print(f"check: non-standard operator domains {sorted(set(domains) - {'', 'ai.onnx'})}")
                failed = True
            print("check: " + ("FAILED" if failed else "onnxruntime matches PyTorch"))
            return 1 if failed else 0
    except (DeployError, ConfigError) as err:  # ConfigError: the config or a -u override
        print(f"error: {err}")
        return 2
    return 0
