"""Command line: `python -m dfine predict ...`, `python -m dfine export ...`, `python -m dfine visualize ...`."""

import argparse
import sys

from dfine import predict, visualize


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dfine")
    sub = parser.add_subparsers(dest="command", required=True)
    predict.add_arguments(sub.add_parser("predict", help="detect objects in images with a checkpoint"))
    from dfine import export

    export.add_arguments(sub.add_parser("export", help="export model + post-processor to ONNX"))
    visualize.add_arguments(sub.add_parser("visualize", help="plot each decoder layer's box and FDR edge distributions"))
    args = parser.parse_args(argv)
    if args.command == "predict":
        return predict.run(args)
    if args.command == "export":
        return export.run(args)
    if args.command == "visualize":
        return visualize.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
