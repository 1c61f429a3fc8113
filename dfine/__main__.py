"""Command line: `python -m dfine predict ...`, `python -m dfine visualize ...`."""

import argparse
import sys

from dfine import predict, visualize


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dfine")
    sub = parser.add_subparsers(dest="command", required=True)
    predict.add_arguments(sub.add_parser("predict", help="detect objects in images with a checkpoint"))
    visualize.add_arguments(sub.add_parser("visualize", help="plot each decoder layer's box and FDR edge distributions"))
    args = parser.parse_args(argv)
    if args.command == "predict":
        return predict.run(args)
    if args.command == "visualize":
        return visualize.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
