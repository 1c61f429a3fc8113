"""Deployed inference latency on CPU (2 threads): PyTorch eager, torch.compile, onnxruntime, OpenVINO.

Every variant runs the same thing - `model.deploy()` + the post-processor in deploy mode
(`dfine.deploy.DetectorGraph`: images, orig_target_sizes -> labels, boxes, scores) - with random weights:

* eager, reference ops      PyTorch eager, plain-PyTorch ops (grid_sample, softmax-expectation)
* eager, fused ops (cpp)    PyTorch eager, the C++ kernels of dfine._C
* eager, fused + CPU forms  the same with `dfine.deploy.optimize_for_cpu` (channels_last, oneDNN linear layers, ...):
                            what `python -m dfine predict` runs on the CPU
* torch.compile, fused ops  inductor, static shapes, fullgraph; the C++ ops are custom ops inside the graph
                            (reg_scale handed to fdr_decode as a float, see reg_scale_as_float)
* onnxruntime, dynamic      CPUExecutionProvider, intra_op_num_threads=2, one dynamic batch/H/W export
                            (reference ops -> GridSample), as `python -m dfine export --dynamic-*` writes
* onnxruntime, static       the same graph exported at the measured shape (lets ORT fold shape math)
* openvino, dynamic / static  the same two ONNX files in OpenVINO's CPU plugin (INFERENCE_NUM_THREADS=2, float32,
                            latency hint), as `python -m dfine predict --backend openvino` runs them

    python benchmarks/bench_inference.py [--sizes s n] [--runs 10] [--shapes 640x640 480x800] [--batches 1 4]
    python benchmarks/bench_inference.py --device cuda     # GPU: eager reference / fused / torch.compile fused,
                                                           # fp32 and bf16 autocast (onnxruntime: CPU rows only)
    python -m pytest benchmarks/bench_inference.py --benchmark-only      # pytest-benchmark (N, 640, batch 1)
"""

from __future__ import annotations

import argparse
import copy
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
from dfine.deploy import export_onnx  # noqa: E402
from dfine.deploy import OnnxRuntimeRunner, OpenVinoRunner, TorchRunner  # noqa: E402

THREADS = 2
torch.set_num_threads(THREADS)


def config_path(size):
    return str(REPO / "configs" / "dfine" / f"dfine_hgnetv2_{size}_coco.yml")


def build_detector(size, backend, optimize=False):
    torch.manual_seed(0)
    det = dfine.load_detector(config_path(size), None, backend=backend, optimize=optimize,
                              overrides=["DFINETransformer.num_denoising=0"])
    return det.graph()


def reg_scale_as_float(detector):
    """Give the FDR loop ``reg_scale`` as a Python float (what deploy() does on the branch that adds
    --compile): the C++ ``fdr_decode`` takes a float, and reading it from the parameter tensor inside
    a compiled graph is a ``Tensor.item()`` graph break in every decoder layer. Numerically the same."""
    dec = detector.model.decoder.decoder
    if isinstance(getattr(dec, "reg_scale", None), torch.Tensor):
        value = float(dec.reg_scale.reshape(-1)[0])
        del dec._parameters["reg_scale"]
        dec.reg_scale = value
    return detector


def inputs(batch, h, w):
    gen = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, h, w, generator=gen), torch.tensor([[w, h]] * batch, dtype=torch.int64)


def interleaved_ms(runners, args, runs, warmup=2):
    """{name: (median ms, min ms)}. The variants take turns call by call, so a load that comes and goes
    on a shared machine falls on all of them alike and their ratios stay meaningful."""
    times = {name: [] for name, _ in runners}
    with torch.no_grad():
        for _, fn in runners:
            for _ in range(warmup):
                fn(*args)
        for _ in range(runs):
            for name, fn in runners:
                t0 = time.perf_counter()
                fn(*args)
                times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t) * 1e3, min(t) * 1e3) for name, t in times.items()}


class Variants:
    """Builds each runner once per model size; compiled graphs and static exports once per shape."""

    def __init__(self, size, tmp):
        self.size, self.tmp = size, tmp
        torch._dynamo.reset()  # a fresh recompile budget for this model's shapes (one graph per shape)
        self.reference = build_detector(size, "reference")
        self.fused = build_detector(size, "cpp")
        self.fused.load_state_dict(self.reference.state_dict())
        self.cpu_forms = build_detector(size, "cpp", optimize=True)  # same seed: the same weights
        self.compiled = None
        self.compile_note = ""
        self.dynamic_path = export_onnx(build_detector(size, "reference"), Path(tmp) / f"{size}_dynamic.onnx",
                                        (640, 640), dynamic_batch=True, dynamic_size=True)
        self.ort_dynamic = OnnxRuntimeRunner(self.dynamic_path, threads=THREADS)
        self.ov_dynamic = OpenVinoRunner(self.dynamic_path, threads=THREADS)

    def runners(self, batch, h, w):
        static = export_onnx(self.reference, Path(self.tmp) / f"{self.size}_{batch}x{h}x{w}.onnx", (h, w), batch=batch)
        yield "eager, reference ops", TorchRunner(self.reference)
        yield "eager, fused ops (cpp)", TorchRunner(self.fused)
        yield "eager, fused ops + CPU forms", TorchRunner(self.cpu_forms)
        compile_start = time.perf_counter()
        images, sizes = inputs(batch, h, w)
        with torch.no_grad():  # compile for this shape (not timed in the median)
            if self.compiled is None:
                self.for_compile = reg_scale_as_float(copy.deepcopy(self.fused))
                try:  # the whole model in one graph when nothing breaks it
                    self.compiled = torch.compile(self.for_compile, dynamic=False, fullgraph=True)
                    self.compiled(images, sizes)
                    self.compile_note = "one graph (fullgraph=True)"
                except Exception as err:  # a graph break: compile the pieces
                    torch._dynamo.reset()
                    reason = str(err).strip().splitlines()[0][:120]
                    self.compiled = torch.compile(self.for_compile, dynamic=False)
                    self.compile_note = f"with graph breaks (fullgraph=True failed: {reason})"
            self.compiled(images, sizes)
        self.compile_s = time.perf_counter() - compile_start
        yield "torch.compile, fused ops", TorchRunner(self.compiled)
        yield "onnxruntime, dynamic graph", self.ort_dynamic
        yield "onnxruntime, static graph", OnnxRuntimeRunner(static, threads=THREADS)
        yield "openvino, dynamic graph", self.ov_dynamic
        yield "openvino, static graph", OpenVinoRunner(static, threads=THREADS)


def main_cuda(args, device):
    """The PyTorch variants on the GPU, fp32 and bf16 autocast, CUDA-event medians."""
    from dfine.ops.timing import median_ms

    modes = {"fp32": None, "bf16 autocast": torch.bfloat16}
    print(f"deployed inference on {torch.cuda.get_device_name(device)}, torch {torch.__version__}; median of "
          f"{args.runs} CUDA-event times after 3 warm-up calls (the first ones compile)")
    header = ["size", "input (N x H x W)", "variant"] + [f"{m} ms" for m in modes] + [f"{m} vs eager reference" for m in modes]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)
    for size in args.sizes:
        torch._dynamo.reset()
        reference = build_detector(size, "reference").to(device)
        fused = build_detector(size, "auto").to(device)
        fused.load_state_dict(reference.state_dict())
        compiled = torch.compile(reg_scale_as_float(copy.deepcopy(fused)), dynamic=False)
        runners = {"eager, reference ops": TorchRunner(reference), "eager, fused ops (auto)": TorchRunner(fused),
                   "torch.compile, fused ops": TorchRunner(compiled)}
        for shape in args.shapes:
            h, w = (int(v) for v in shape.lower().split("x"))
            for batch in args.batches:
                images, sizes = (t.to(device) for t in inputs(batch, h, w))
                times = {}
                for name, runner in runners.items():
                    for mode, dtype in modes.items():
                        def call(runner=runner, dtype=dtype):
                            with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                                return runner(images, sizes)
                        try:
                            times[name, mode] = median_ms(call, device, args.runs, warmup=3)
                        except Exception as err:  # e.g. a compile failure: listed, not fatal
                            print(f"{name}, {mode}: {type(err).__name__}: {str(err).strip().splitlines()[0][:160]}")
                for name in runners:
                    cells = [size.upper(), f"{batch}x{h}x{w}", name]
                    cells += [f"{times[name, m]:.2f}" if (name, m) in times else "n/a" for m in modes]
                    cells += [f"{times['eager, reference ops', m] / times[name, m]:.2f}x"
                              if (name, m) in times and ("eager, reference ops", m) in times else "n/a" for m in modes]
                    print("| " + " | ".join(cells) + " |", flush=True)
        del reference, fused, compiled, runners
        torch.cuda.empty_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["s", "n"])
    parser.add_argument("--shapes", nargs="+", default=["640x640", "480x800"], help="HxW")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    args = parser.parse_args(argv)
    from dfine.ops.timing import device_or_exit

    device = device_or_exit(args.device)
    if device.type == "cuda":
        return main_cuda(args, device)
    if not dfine.ops.extension_available():
        sys.exit("bench_inference: the fused ops need dfine._C; build it with `python setup.py build_ext --inplace`")
    import onnxruntime
    import openvino

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__} "
          f"(intra_op_num_threads={THREADS}), openvino {openvino.__version__} (INFERENCE_NUM_THREADS={THREADS}), "
          f"{os.cpu_count()} CPUs; median of {args.runs} runs")
    print("| size | input (N x H x W) | variant | median ms | min ms | vs eager reference | vs eager fused |")
    print("|---|---|---|---|---|---|---|")
    summary = []
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        for size in args.sizes:
            variants = Variants(size, tmp)
            for shape in args.shapes:
                h, w = (int(v) for v in shape.lower().split("x"))
                for batch in args.batches:
                    runners = list(variants.runners(batch, h, w))  # exports and compiles happen here
                    runs = args.runs if batch == 1 else max(3, args.runs // 2)
                    timed = interleaved_ms(runners, inputs(batch, h, w), runs)
                    results = {name: med for name, (med, _) in timed.items()}
                    ref, fused = results["eager, reference ops"], results["eager, fused ops (cpp)"]
                    for name, (med, low) in timed.items():
                        print(f"| {size.upper()} | {batch}x{h}x{w} | {name} | {med:.1f} | {low:.1f} | {ref / med:.2f}x | "
                              f"{fused / med:.2f}x |", flush=True)
                    summary.append((size, batch, h, w, results, variants.compile_s))
            print(f"|   | {size.upper()}: torch.compile ran {variants.compile_note} | | | | | |", flush=True)
            del variants
    print()
    for size, batch, h, w, r, compile_s in summary:
        torch_best = min((n for n in r if n.startswith(("eager", "torch.compile"))), key=r.get)
        ort_best = min((n for n in r if n.startswith("onnxruntime")), key=r.get)
        ov_best = min((n for n in r if n.startswith("openvino")), key=r.get)
        best = min(r, key=r.get)
        print(f"{size.upper()} {batch}x{h}x{w}: torch.compile vs eager fused {r['eager, fused ops (cpp)'] / r['torch.compile, fused ops']:.2f}x "
              f"(compile {compile_s:.0f} s); fastest PyTorch ({torch_best}, {r[torch_best]:.1f} ms), onnxruntime "
              f"({ort_best}, {r[ort_best]:.1f} ms), OpenVINO ({ov_best}, {r[ov_best]:.1f} ms); fastest: {best}")


@pytest.mark.parametrize("variant", ["eager fused", "onnxruntime", "openvino"])
def test_bench_inference_n_640(benchmark, variant, tmp_path):
    if variant == "eager fused":
        if not dfine.ops.extension_available():
            pytest.skip("dfine._C is not built")
        runner = TorchRunner(build_detector("n", "cpp"))
    else:
        graph = export_onnx(build_detector("n", "reference"), tmp_path / "n.onnx", (640, 640))
        runner_type = OnnxRuntimeRunner if variant == "onnxruntime" else OpenVinoRunner
        runner = runner_type(graph, threads=THREADS)
    x = inputs(1, 640, 640)
    runner(*x)
    benchmark.pedantic(runner, args=x, rounds=3, iterations=1, warmup_rounds=1)


if __name__ == "__main__":
    main()
