"""One D-FINE training step (forward with denoising, criterion, backward, clip, AdamW) at 640, batch 4,
2 threads, on the CPU.

Side by side in one run on the same images and targets: this project with reference ops, with fused
ops (backend "auto" = C++ on the CPU), and - when `transformers` is installed (optional extra) - Hugging
Face's DFineForObjectDetection with the same architecture and loss weights, random weights.
`--profile` adds a torch.profiler table for the fused step: where the time goes, grouped by op.

Our steps run as train.py's Trainer runs them on the CPU: channels_last (`--channels-last off` for
NCHW) and, under the system allocator, glibc told to keep freed memory (`--malloc default` to not).
Those settings are process-wide, so the transformers step runs under the same allocator. For jemalloc
start the benchmark as scripts/main.sh starts training:
    LD_PRELOAD=libjemalloc.so.2 MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1 python benchmarks/...

    python benchmarks/bench_train_step.py [--sizes n s] [--runs 5] [--profile]   # markdown tables
    python -m pytest benchmarks/bench_train_step.py --benchmark-only             # pytest-benchmark
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import dfine  # noqa: E402
from bench_model import build_transformers, config_path  # noqa: E402
from dfine.deploy.cpu import loaded_allocator, retain_freed_memory, to_memory_format  # noqa: E402
from dfine.engine.optim import build_optimizer  # noqa: E402

torch.set_num_threads(2)
BATCH, IMAGE, BOXES_PER_IMAGE = 4, (640, 640), 8


def make_batch(num_classes, seed=0):
    """Random images and targets (labels, normalised cxcywh boxes), identical for every variant."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(BATCH, 3, *IMAGE, generator=g)
    targets = []
    for _ in range(BATCH):
        cxcy = torch.rand(BOXES_PER_IMAGE, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(BOXES_PER_IMAGE, 2, generator=g) * 0.3 + 0.05
        labels = torch.randint(0, num_classes, (BOXES_PER_IMAGE,), generator=g)
        targets.append({"labels": labels, "boxes": torch.cat([cxcy, wh], 1)})
    return images, targets


class OursStep:
    """The step train.py's Trainer runs (without AMP/EMA): forward, criterion, backward, clip, AdamW."""

    def __init__(self, size, backend, channels_last=True):
        torch.manual_seed(0)
        self.cfg = dfine.load_config(config_path(size))
        model = dfine.build_model(self.cfg, backend=backend).train()
        self.model = to_memory_format(model, channels_last)
        self.criterion = dfine.build_criterion(self.cfg, backend=backend).train()
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.clip = float(self.cfg.get("clip_max_norm", 0.1))
        images, self.targets = make_batch(self.cfg["num_classes"])
        self.images = to_memory_format(images, channels_last)

    def __call__(self):
        outputs = self.model(self.images, targets=self.targets)
        loss = sum(self.criterion(outputs, self.targets).values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        return float(loss.detach())


class TransformersStep:
    """DFineForObjectDetection computes its own loss from `labels`; same optimizer settings as ours."""

    def __init__(self, size):
        model = build_transformers(size)
        if model is None:
            raise ImportError("transformers is not installed (optional benchmark extra)")
        cfg = dfine.load_config(config_path(size))
        self.model = model.train()
        opt = cfg.get("optimizer") or {}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=float(opt.get("lr", 1e-4)),
                                           weight_decay=float(opt.get("weight_decay", 1e-4)))
        self.clip = float(cfg.get("clip_max_norm", 0.1))
        images, targets = make_batch(cfg["num_classes"])
        self.images = images
        self.labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]

    def __call__(self):
        loss = self.model(pixel_values=self.images, labels=self.labels).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        return float(loss.detach())


CHANNELS_LAST = True  # --channels-last


VARIANTS = {
    "reference ops": lambda s: OursStep(s, "reference", CHANNELS_LAST),
    "fused ops (auto)": lambda s: OursStep(s, "auto", CHANNELS_LAST),
    "transformers": TransformersStep,
}


def time_step(step, runs=5, warmup=1):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@pytest.mark.parametrize("size", ["n", "s"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bench_train_step_640(benchmark, size, variant):
    try:
        step = VARIANTS[variant](size)
    except ImportError as err:
        pytest.skip(str(err))
    if loaded_allocator() == "system":
        retain_freed_memory()  # as train.py does
    step()
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)


def profile_table(step, rows=25):
    """Self CPU time per op over two steps, plus the share of the step spent in our fused ops."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\n| op | self CPU ms / step | share | calls / step |\n|---|---|---|---|")
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]:
        print(f"| {e.key} | {e.self_cpu_time_total / 2e3:.1f} | {100 * e.self_cpu_time_total / total:.1f}% "
              f"| {e.count // 2} |")
    ours = {}
    for e in events:
        if e.key.startswith("dfine::"):
            ours[e.key] = ours.get(e.key, 0) + e.self_cpu_time_total
    print("\nfused ops (dfine::*), self CPU ms / step and share of the step:")
    for key, t in sorted(ours.items(), key=lambda kv: -kv[1]):
        print(f"  {key}: {t / 2e3:.1f} ms ({100 * t / total:.1f}%)")
    conv = sum(e.self_cpu_time_total for e in events if "conv" in e.key or "mkldnn" in e.key)
    print(f"  convolutions (forward + backward, incl. mkldnn): {conv / 2e3:.1f} ms ({100 * conv / total:.1f}%)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["n", "s"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="print a profile table of the fused step")
    parser.add_argument("--channels-last", choices=["on", "off"], default="on", help="our model's layout")
    parser.add_argument("--malloc", choices=["retain", "default"], default="retain",
                        help="under the system allocator: keep freed memory (as train.py does) or not")
    args = parser.parse_args(argv)
    global CHANNELS_LAST
    CHANNELS_LAST = args.channels_last == "on"
    allocator = loaded_allocator()
    if allocator == "system" and args.malloc == "retain" and retain_freed_memory():
        allocator = "system, retaining freed memory"
    print(f"one training step, batch {BATCH} x 3 x {IMAGE[0]} x {IMAGE[1]}, {torch.get_num_threads()} threads, "
          f"median of {args.runs}; ours channels_last {CHANNELS_LAST}; allocator {allocator}")
    print("| size | variant | median s | vs reference ops | vs transformers |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        results = {}
        for name, make in VARIANTS.items():
            try:
                step = make(size)
            except ImportError:
                continue
            results[name] = time_step(step, runs=args.runs)
            del step
        ref, hf = results.get("reference ops"), results.get("transformers")
        for name, sec in results.items():
            vs_hf = f"{hf / sec:.2f}x" if hf else "n/a"
            print(f"| {size.upper()} | {name} | {sec:.2f} | {ref / sec:.2f}x | {vs_hf} |", flush=True)
    if args.profile:
        for size in args.sizes:
            print(f"\nprofile of the fused D-FINE-{size.upper()} training step:")
            profile_table(OursStep(size, "auto", CHANNELS_LAST))


if __name__ == "__main__":
    main()
