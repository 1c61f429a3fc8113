"""Before/after timings of two checkouts of this project, side by side on one machine.

    git worktree add /tmp/before <commit> && (cd /tmp/before && python setup.py build_ext --inplace)
    python scripts/compare_checkouts.py --before /tmp/before [--after .] [--sizes n s] [--rounds 2]

What users feel end to end, each measured in a fresh process of each checkout, the checkouts taking turns
(before, after, before, after, ...) so that a shared machine's load hits both alike:
* the training step: each checkout's own ``benchmarks/bench_train_step.py`` (median seconds, fused and
  reference ops rows);
* the predict path: the deployed model + post-processor exactly as ``python -m dfine predict`` loads it on the
  CPU (``dfine.load_detector``, or ``dfine.predict.load_predictor`` in checkouts older than it), random
  weights from one checkpoint file shared by both, 1x3x640x640, median ms of --runs calls.
Prints one markdown table with the median over rounds and the after/before ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# Runs inside a checkout (cwd and sys.path[0] = the checkout): time its predict path.
PREDICT_SNIPPET = r"""
import json, statistics, sys, time, gc
import torch
torch.set_num_threads(2)
import dfine
cfg_path, ckpt, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    from dfine.deploy.cpu import loaded_allocator, retain_freed_memory
except ImportError:
    from dfine.cpu_speed import loaded_allocator, retain_freed_memory
if loaded_allocator() == "system":
    retain_freed_memory()  # as predict does
if hasattr(dfine, "load_detector"):
    graph = dfine.load_detector(cfg_path, ckpt, backend="auto").graph()
else:
    from dfine.export import DetectorGraph
    from dfine.predict import load_predictor
    model, post, _ = load_predictor(cfg_path, ckpt, backend="auto")
    graph = DetectorGraph(model, post).eval()
x = torch.rand(1, 3, 640, 640, generator=torch.Generator().manual_seed(0))
sizes = torch.tensor([[640, 480]])
times = []
gc.disable()
with torch.no_grad():
    for i in range(runs + 3):
        t = time.perf_counter()
        graph(x, sizes)
        if i >= 3:
            times.append(time.perf_counter() - t)
print(json.dumps({"ms": statistics.median(times) * 1e3}))
"""

# Runs in the checkout given as --after: one random-weight checkpoint per size, shared by both checkouts.
CHECKPOINT_SNIPPET = r"""
import sys, torch
import dfine
torch.manual_seed(0)
model = dfine.build_model(dfine.load_config(sys.argv[1]), backend="reference")
torch.save({"model": model.state_dict()}, sys.argv[2])
"""

ROW = re.compile(r"^\|\s*([NSMLX])\s*\|\s*(reference ops|fused ops[^|]*?)\s*\|\s*([0-9.]+)\s*\|")


def run(tree: Path, args, timeout=1800) -> str:
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.run([sys.executable, *args], cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: {' '.join(map(str, args[:2]))} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, type=Path, help="the older checkout (extension built in place)")
    parser.add_argument("--after", default=Path("."), type=Path, help="the newer checkout (default: this one)")
    parser.add_argument("--sizes", nargs="+", default=["n", "s"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=15, help="predict calls per measurement")
    parser.add_argument("--train-runs", type=int, default=5, help="training steps per measurement")
    parser.add_argument("--only", choices=["train", "predict"], help="measure only one of the two")
    args = parser.parse_args(argv)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="dfine_compare_") as tmp:
        ckpts = {}
        for size in args.sizes:
            cfg = str(trees["after"] / "configs" / "dfine" / f"dfine_hgnetv2_{size}_coco.yml")
            ckpts[size] = os.path.join(tmp, f"{size}.pth")
            run(trees["after"], ["-c", CHECKPOINT_SNIPPET, cfg, ckpts[size]])
        for r in range(args.rounds):
            for name, tree in trees.items():
                out = "" if args.only == "predict" else run(
                    tree, ["benchmarks/bench_train_step.py", "--sizes", *args.sizes, "--runs", str(args.train_runs)])
                for line in out.splitlines():
                    m = ROW.match(line)
                    if m:
                        key = (f"train step, {m.group(2)} (s)", m.group(1))
                        results.setdefault(key, {}).setdefault(name, []).append(float(m.group(3)))
                for size in (args.sizes if args.only != "train" else []):
                    cfg = str(tree / "configs" / "dfine" / f"dfine_hgnetv2_{size}_coco.yml")
                    ms = json.loads(run(tree, ["-c", PREDICT_SNIPPET, cfg, ckpts[size], str(args.runs)]))["ms"]
                    results.setdefault(("predict path (ms)", size.upper()), {}).setdefault(name, []).append(ms)
                print(f"round {r + 1}/{args.rounds}: {name} done", file=sys.stderr, flush=True)
    print(f"before: {trees['before']}\nafter: {trees['after']}\n")
    print("| measure | size | before (each round) | after (each round) | before median | after median | after / before |")
    print("|---|---|---|---|---|---|---|")
    for (measure, size), by in sorted(results.items()):
        b, a = by.get("before", []), by.get("after", [])
        if not a or not b:
            continue
        bm, am = statistics.median(b), statistics.median(a)
        print(f"| {measure} | {size} | {', '.join(f'{v:.3g}' for v in b)} | {', '.join(f'{v:.3g}' for v in a)} | "
              f"{bm:.3g} | {am:.3g} | {am / bm:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
