"""Command line: ``python -m dfine predict|export|visualize|info|report ...`` (``--help`` on each)."""

import argparse
import sys

from dfine.apps import export, info, predict, report, visualize

# (module, help): predict/export/visualize take add_arguments + run; info/report parse their own arguments
COMMANDS = {
    "predict": (predict, "detect objects in images or a video with a checkpoint"),
    "export": (export, "export model + post-processor to ONNX"),
    "visualize": (visualize, "plot each decoder layer's box and FDR edge distributions"),
    "info": (info, "parameters and GFLOPs of the published sizes"),
    "report": (report, "AP table, training curve and per-class analysis of a training run"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("info", "report"):
        return COMMANDS[argv[0]][0].main(argv[1:]) or 0
    parser = argparse.ArgumentParser(prog="python -m dfine")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, text) in COMMANDS.items():
        command = sub.add_parser(name, help=text, add_help=name not in ("info", "report"))
        if hasattr(module, "add_arguments"):
            module.add_arguments(command)
    args = parser.parse_args(argv)
    return COMMANDS[args.command][0].run(args)


if __name__ == "__main__":
    sys.exit(main())
