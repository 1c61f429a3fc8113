"""Eager fused vs torch.compile fused: deployed D-FINE, random weights, 1x3x640x640, 2 threads, ops backend cpp.

    python benchmarks/bench_compile.py [--size s] [--runs 20] [--variants eager compile compile+freezing ...]
    python benchmarks/bench_compile.py --device cuda       # on the GPU (ops backend auto), synchronised timing

Each variant runs in its own process (Inductor's config is global) next to an eager fused twin (same
weights): the first call of the variant is its compile time, then `--warmup` calls of each, then `--runs`
timed pairs, eager and variant alternately, so that the load of a shared machine hits both alike; the
speed-up is the ratio of the medians. "max abs diff" compares the variant's outputs with eager's, matching
each query to its nearest (near-equal encoder scores may swap the order of queries).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

VARIANTS = {
    "compile": {"compile": True},
    "compile+freezing": {"compile": True, "freezing": True},
    "compile+max-autotune": {"compile": True, "mode": "max-autotune-no-cudagraphs"},
    "compile+channels_last": {"compile": True, "channels_last": True},
    "compile+freezing+channels_last": {"compile": True, "freezing": True, "channels_last": True},
    "eager+channels_last": {"channels_last": True},
}
DEFAULT = ["compile", "compile+freezing"]


def build(size: str, device="cpu"):
    """Random weights (seed 0), BatchNorm statistics from one random batch (else the features of all positions
    are nearly equal at random init, the query top-k nearly ties and the output comparison means little).
    Ops backend cpp on the CPU, auto on a GPU (the CUDA kernels, or Triton where dfine._C has none for it)."""
    import torch

    import dfine

    torch.manual_seed(0)
    cfg = dfine.load_config(str(REPO / "configs" / "dfine" / f"dfine_hgnetv2_{size}_coco.yml"))
    model = dfine.build_model(cfg, backend="cpp" if torch.device(device).type == "cpu" else "auto").to(device)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.rand(2, 3, 640, 640, generator=torch.Generator().manual_seed(1)).to(device))
    return model.deploy()


def query_set_diff(out, ref) -> float:
    """Max over the reference's queries of the L-inf distance (logits and box) to the nearest query of ``out``:
    insensitive to the order of queries, which near-equal encoder scores may swap between eager and compiled."""
    import torch

    a = torch.cat([out["pred_logits"], out["pred_boxes"]], -1)[0]
    b = torch.cat([ref["pred_logits"], ref["pred_boxes"]], -1)[0]
    return float(torch.cdist(b, a, p=float("inf")).min(-1).values.max())


def measure(size: str, variant: str, runs: int, warmup: int, device: str = "cpu") -> dict:
    """Eager fused and ``variant`` in one process, timed alternately (a shared machine's load hits both)."""
    import torch

    sys.path.insert(0, str(REPO))
    from dfine.deploy.compiled import compile_model
    from dfine.ops.timing import synchronize

    opts = VARIANTS[variant]
    torch.set_num_threads(2)
    eager = build(size, device)
    model = build(size, device)  # same weights (same seed)
    x = torch.rand(1, 3, 640, 640, generator=torch.Generator().manual_seed(0)).to(device)
    xv = x
    if opts.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
        xv = x.contiguous(memory_format=torch.channels_last)
    if opts.get("freezing"):
        torch._inductor.config.freezing = True
    if opts.get("compile"):
        model = compile_model(model, mode=opts.get("mode"))
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(xv)
        synchronize(device)
        first = time.perf_counter() - t0
        ref = eager(x)
        diff = query_set_diff(out, ref)
        for _ in range(warmup):
            model(xv)
            eager(x)
        t_eager, t_variant = [], []
        for _ in range(runs):  # (synchronize: on a GPU the calls only launch kernels)
            synchronize(device)
            t0 = time.perf_counter()
            eager(x)
            synchronize(device)
            t1 = time.perf_counter()
            model(xv)
            synchronize(device)
            t2 = time.perf_counter()
            t_eager.append(t1 - t0)
            t_variant.append(t2 - t1)
    med_e, med_v = statistics.median(t_eager) * 1e3, statistics.median(t_variant) * 1e3
    return {"variant": variant, "eager_ms": med_e, "variant_ms": med_v, "eager_min_ms": min(t_eager) * 1e3,
            "variant_min_ms": min(t_variant) * 1e3, "speedup": med_e / med_v, "first_call_s": first,
            "max_abs_diff": diff, "runs": runs}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="s", choices=list("nsmlx"))
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=DEFAULT, choices=list(VARIANTS))
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from dfine.ops.timing import device_or_exit

    device = str(device_or_exit(args.device))
    if args.one:
        print(json.dumps(measure(args.size, args.one, args.runs, args.warmup, device)))
        return 0
    rows = []
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--size", args.size, "--runs", str(args.runs), "--warmup",
               str(args.warmup), "--device", device, "--one", variant]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"{variant}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"  {variant}: {rows[-1]}", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    where = "2 threads, ops backend cpp" if device == "cpu" else f"{device}, ops backend auto, synchronised timing"
    print(f"\nD-FINE-{args.size.upper()} deployed, 1x3x640x640, batch 1, {where}, random weights; "
          f"median of {args.runs} alternating eager/variant calls after {args.warmup} warm-ups\n")
    print("| variant | eager fused median (min) ms | variant median (min) ms | speed-up | compile (1st call) s "
          "| max abs diff (matched queries) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['eager_ms']:.1f} ({r['eager_min_ms']:.1f}) | {r['variant_ms']:.1f} "
              f"({r['variant_min_ms']:.1f}) | {r['speedup']:.2f}x | {r['first_call_s']:.1f} | {r['max_abs_diff']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
