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
    python benchmarks/bench_train_step.py --device cuda --sizes s [--amp off bfloat16 float16]
    python -m pytest benchmarks/bench_train_step.py --benchmark-only             # pytest-benchmark

On a GPU (`--device cuda`) each step runs as the Trainer runs it there: NCHW (channels_last auto = off on CUDA),
the model under autocast in each `--amp` dtype (default: off = fp32, and bfloat16), the criterion in fp32, a
GradScaler for float16; one column group per AMP setting with the step's wall time (the step ends by reading the
loss, which synchronises) and the peak GPU memory (torch.cuda.max_memory_allocated) of one step.
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
from dfine.deploy.cpu import loaded_allocator, resolve_channels_last, retain_freed_memory, to_memory_format  # noqa: E402
from dfine.engine.amp import amp_policy, float_outputs  # noqa: E402
from dfine.engine.optim import build_optimizer  # noqa: E402
from dfine.ops.timing import device_or_exit  # noqa: E402

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


def _on(targets, device):
    return [{k: v.to(device) for k, v in t.items()} for t in targets]


class OursStep:
    """The step train.py's Trainer runs (without EMA): forward (under autocast with ``amp``), criterion in fp32,
    backward (scaled for float16), clip, AdamW."""

    def __init__(self, size, backend, channels_last=True, device="cpu", amp="off"):
        torch.manual_seed(0)
        self.device = torch.device(device)
        self.cfg = dfine.load_config(config_path(size))
        model = dfine.build_model(self.cfg, backend=backend).train().to(self.device)
        self.model = to_memory_format(model, channels_last)
        self.criterion = dfine.build_criterion(self.cfg, backend=backend).train().to(self.device)
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.clip = float(self.cfg.get("clip_max_norm", 0.1))
        self.amp = amp_policy(amp != "off", None if amp == "off" else amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp.scaler)
        images, targets = make_batch(self.cfg["num_classes"])
        self.images = to_memory_format(images.to(self.device), channels_last)
        self.targets = _on(targets, self.device)

    def __call__(self):
        with self.amp.autocast(self.device.type):
            outputs = self.model(self.images, targets=self.targets)
        with torch.autocast(self.device.type, enabled=False):
            loss = sum(self.criterion(float_outputs(outputs), self.targets).values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())


class TransformersStep:
    """DFineForObjectDetection computes its own loss from `labels`; same optimizer settings as ours."""

    def __init__(self, size, device="cpu", amp="off"):
        model = build_transformers(size)
        if model is None:
            raise ImportError("transformers is not installed (optional benchmark extra)")
        cfg = dfine.load_config(config_path(size))
        self.device = torch.device(device)
        # its loss is computed inside the model, so under autocast with it (no GradScaler: bf16 or off only)
        self.amp = amp_policy(amp != "off", None if amp == "off" else amp, self.device, scaler_enabled=False)
        self.model = model.train().to(self.device)
        opt = cfg.get("optimizer") or {}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=float(opt.get("lr", 1e-4)),
                                           weight_decay=float(opt.get("weight_decay", 1e-4)))
        self.clip = float(cfg.get("clip_max_norm", 0.1))
        images, targets = make_batch(cfg["num_classes"])
        self.images = images.to(self.device)
        self.labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in _on(targets, self.device)]

    def __call__(self):
        with self.amp.autocast(self.device.type):
            loss = self.model(pixel_values=self.images, labels=self.labels).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        return float(loss.detach())


CHANNELS_LAST = True  # --channels-last


VARIANTS = {
    "reference ops": lambda s, device="cpu", amp="off": OursStep(s, "reference", CHANNELS_LAST, device, amp),
    "fused ops (auto)": lambda s, device="cpu", amp="off": OursStep(s, "auto", CHANNELS_LAST, device, amp),
    "transformers": TransformersStep,
}


VARIANT_KEYS = {"reference": "reference ops", "fused": "fused ops (auto)", "transformers": "transformers"}


def time_step(step, runs=5, warmup=1):
    """Median wall seconds of a step; every step ends by reading the loss, which waits for the GPU."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_step_gib(step, device) -> float:
    """Peak GPU memory of one step (weights, optimizer state and activations), GiB."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    return torch.cuda.max_memory_allocated(device) / 2**30


def main_cuda(args, device):
    """One column group per AMP setting: seconds, ratio to the reference ops, peak GiB."""
    amps = args.amp or ["off", "bfloat16"]
    name = torch.cuda.get_device_name(device)
    print(f"one training step on {name}, batch {BATCH} x 3 x {IMAGE[0]} x {IMAGE[1]}, median of {args.runs} after "
          f"{args.warmup} warm-up steps; channels_last {CHANNELS_LAST}; AMP off = fp32 (TF32 as torch defaults)")
    header = ["size", "variant"]
    for amp in amps:
        label = "fp32" if amp == "off" else amp
        header += [f"{label} s", f"{label} vs reference ops", f"{label} peak GiB"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)
    for size in args.sizes:
        seconds = {}
        for variant, make in VARIANTS.items():
            cells = [size.upper(), variant]
            for amp in amps:
                try:
                    step = make(size, device=device, amp=amp)
                    sec = time_step(step, runs=args.runs, warmup=args.warmup)
                    peak = peak_step_gib(step, device)
                except ImportError:
                    cells = None
                    break
                except Exception as err:  # e.g. float16 without GradScaler for transformers: listed, not fatal
                    cells += [f"n/a ({type(err).__name__})"] * 3
                    continue
                finally:
                    step = None
                    torch.cuda.empty_cache()
                seconds[(variant, amp)] = sec
                ref = seconds.get(("reference ops", amp))
                cells += [f"{sec:.3f}", f"{ref / sec:.2f}x" if ref else "-", f"{peak:.2f}"]
            if cells is not None:
                print("| " + " | ".join(cells) + " |", flush=True)


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
    parser.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                        help="our model's layout (auto, as the Trainer: on for the CPU, off for CUDA)")
    parser.add_argument("--malloc", choices=["retain", "default"], default="retain",
                        help="under the system allocator: keep freed memory (as train.py does) or not")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    parser.add_argument("--amp", nargs="+", choices=["off", "bfloat16", "float16"],
                        help="with --device cuda: autocast settings, one column group each (default: off bfloat16)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (cuDNN and Triton tune there)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANT_KEYS), default=list(VARIANT_KEYS),
                        help="which steps to time (default: all)")
    args = parser.parse_args(argv)
    device = device_or_exit(args.device)
    chosen = {VARIANT_KEYS[k] for k in args.variants}
    for name in list(VARIANTS):
        if name not in chosen:
            del VARIANTS[name]
    global CHANNELS_LAST
    CHANNELS_LAST = resolve_channels_last(args.channels_last, device)
    if device.type == "cuda":
        return main_cuda(args, device)
    if args.amp not in (None, ["off"]):
        print("error: --amp needs --device cuda (the CPU table is fp32)", file=sys.stderr)
        raise SystemExit(2)
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
