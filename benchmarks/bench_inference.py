"""Deployed inference latency on CPU (2 threads): PyTorch eager, torch.compile, onnxruntime.

Every variant runs the same thing - `model.deploy()` + the post-processor in deploy mode
(`dfine.export.DetectorGraph`: images, orig_target_sizes -> labels, boxes, scores) - with random weights:

* eager, reference ops      PyTorch eager, plain-PyTorch ops (grid_sample, softmax-expectation)
* eager, fused ops (cpp)    PyTorch eager, the C++ kernels of dfine._C
* torch.compile, fused ops  inductor, static shapes; the C++ ops are custom ops inside the graph
* onnxruntime, dynamic      CPUExecutionProvider, intra_op_num_threads=2, one dynamic batch/H/W export
                            (reference ops -> GridSample), as `python -m dfine export --dynamic-*` writes
* onnxruntime, static       the same graph exported at the measured shape (lets ORT fold shape math)

    python benchmarks/bench_inference.py [--sizes s n] [--runs 10] [--shapes 640x640 480x800] [--batches 1 4]
    python -m pytest benchmarks/bench_inference.py --benchmark-only      # pytest-benchmark (N, 640, batch 1)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dfine  # noqa: E402
from dfine.export import DetectorGraph, export_onnx  # noqa: E402
from dfine.runners import OnnxRuntimeRunner, TorchRunner  # noqa: E402

THREADS = 2
torch.set_num_threads(THREADS)


def config_path(size):
    return str(REPO / "configs" / "dfine" / f"dfine_hgnetv2_{size}_coco.yml")


def build_detector(size, backend):
    torch.manual_seed(0)
    cfg = dfine.load_config(config_path(size), ["DFINETransformer.num_denoising=0"])
    model = dfine.build_model(cfg, backend=backend).deploy()
    return DetectorGraph(model, dfine.build_postprocessor(cfg)).eval()


def inputs(batch, h, w):
    gen = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, h, w, generator=gen), torch.tensor([[w, h]] * batch, dtype=torch.int64)


def median_ms(fn, args, runs, warmup=2):
    with torch.no_grad():
        for _ in range(warmup):
            fn(*args)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


class Variants:
    """Builds each runner once per model size; compiled graphs and static exports once per shape."""

    def __init__(self, size, tmp):
        self.size, self.tmp = size, tmp
        self.reference = build_detector(size, "reference")
        self.fused = build_detector(size, "cpp")
        self.fused.load_state_dict(self.reference.state_dict())
        self.compiled = None
        self.compile_note = ""
        self.dynamic_path = export_onnx(build_detector(size, "reference"), Path(tmp) / f"{size}_dynamic.onnx",
                                        (640, 640), dynamic_batch=True, dynamic_size=True)
        self.ort_dynamic = OnnxRuntimeRunner(self.dynamic_path, threads=THREADS)

    def runners(self, batch, h, w):
        static = export_onnx(self.reference, Path(self.tmp) / f"{self.size}_{batch}x{h}x{w}.onnx", (h, w), batch=batch)
        yield "eager, reference ops", TorchRunner(self.reference)
        yield "eager, fused ops (cpp)", TorchRunner(self.fused)
        compile_start = time.perf_counter()
        images, sizes = inputs(batch, h, w)
        with torch.no_grad():  # compile for this shape (not timed in the median)
            if self.compiled is None:
                try:  # the whole model in one graph when nothing breaks it
                    self.compiled = torch.compile(self.fused, dynamic=False, fullgraph=True)
                    self.compiled(images, sizes)
                    self.compile_note = "one graph (fullgraph=True)"
                except Exception as err:  # a graph break: compile the pieces
                    torch._dynamo.reset()
                    reason = str(err).strip().splitlines()[0][:120]
                    self.compiled = torch.compile(self.fused, dynamic=False)
                    self.compile_note = f"with graph breaks (fullgraph=True failed: {reason})"
            self.compiled(images, sizes)
        self.compile_s = time.perf_counter() - compile_start
        yield "torch.compile, fused ops", TorchRunner(self.compiled)
        yield "onnxruntime, dynamic graph", self.ort_dynamic
        yield "onnxruntime, static graph", OnnxRuntimeRunner(static, threads=THREADS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["s", "n"])
    parser.add_argument("--shapes", nargs="+", default=["640x640", "480x800"], help="HxW")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv)
    if not dfine.ops.extension_available():
        sys.exit("bench_inference: the fused ops need dfine._C; build it with `python setup.py build_ext --inplace`")
    import onnxruntime

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__} "
          f"(intra_op_num_threads={THREADS}), {os.cpu_count()} CPUs; median of {args.runs} runs")
    print("| size | input (N x H x W) | variant | median ms | vs eager reference | vs eager fused |")
    print("|---|---|---|---|---|---|")
    summary = []
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        for size in args.sizes:
            variants = Variants(size, tmp)
            for shape in args.shapes:
                h, w = (int(v) for v in shape.lower().split("x"))
                for batch in args.batches:
                    x = inputs(batch, h, w)
                    results = {}
                    runs = args.runs if batch == 1 else max(3, args.runs // 2)
                    for name, runner in variants.runners(batch, h, w):
                        results[name] = median_ms(runner, x, runs)
                        ref, fused = results["eager, reference ops"], results.get("eager, fused ops (cpp)")
                        vs_fused = f"{fused / results[name]:.2f}x" if fused else ""
                        print(f"| {size.upper()} | {batch}x{h}x{w} | {name} | {results[name]:.1f} | "
                              f"{ref / results[name]:.2f}x | {vs_fused} |", flush=True)
                    summary.append((size, batch, h, w, results, variants.compile_s))
            print(f"|   | {size.upper()}: torch.compile ran {variants.compile_note} | | | | |", flush=True)
            del variants
    print()
    for size, batch, h, w, r, compile_s in summary:
        torch_best = min(("eager, fused ops (cpp)", "torch.compile, fused ops", "eager, reference ops"), key=r.get)
        ort_best = min(("onnxruntime, dynamic graph", "onnxruntime, static graph"), key=r.get)
        print(f"{size.upper()} {batch}x{h}x{w}: torch.compile vs eager fused {r['eager, fused ops (cpp)'] / r['torch.compile, fused ops']:.2f}x "
              f"(compile {compile_s:.0f} s); fastest PyTorch ({torch_best}, {r[torch_best]:.1f} ms) vs fastest "
              f"onnxruntime ({ort_best}, {r[ort_best]:.1f} ms): {r[ort_best] / r[torch_best]:.2f}x")


@pytest.mark.parametrize("variant", ["eager fused", "onnxruntime"])
def test_bench_inference_n_640(benchmark, variant, tmp_path):
    if variant == "eager fused":
        if not dfine.ops.extension_available():
            pytest.skip("dfine._C is not built")
        runner = TorchRunner(build_detector("n", "cpp"))
    else:
        runner = OnnxRuntimeRunner(export_onnx(build_detector("n", "reference"), tmp_path / "n.onnx", (640, 640)),
                                   threads=THREADS)
    x = inputs(1, 640, 640)
    runner(*x)
    benchmark.pedantic(runner, args=x, rounds=3, iterations=1, warmup_rounds=1)


if __name__ == "__main__":
    main()
