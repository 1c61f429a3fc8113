"""Command line: `python -m dfine predict ...`."""

import argparse
import sys

from dfine import predict


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dfine")
    sub = parser.add_subparsers(dest="command", required=True)
    predict.add_arguments(sub.add_parser("predict", help="detect objects in images with a checkpoint"))
    args = parser.parse_args(argv)
    if args.command == "predict":
        return predict.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
