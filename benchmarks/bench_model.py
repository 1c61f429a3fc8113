"""Eval latency of whole D-FINE models at 1x3x640x640, 2 threads.

Side by side in one run: this project with reference ops, with fused ops (backend "auto"), fused
after deploy(), the same in channels_last layout (input converted inside the timed call), that plus
linear layers through oneDNN, what `predict` runs on the CPU (`dfine.load_detector`: deploy() and
`dfine.deploy.optimize_for_cpu`), and - when `transformers` is installed
(optional extra) - Hugging Face's DFineForObjectDetection built from the equivalent config with
random weights. Then the decoder alone on fixed encoder features, and the most fusion can gain there:
its matrix multiplies (their FLOPs at this machine's best sgemm rate) are the same in every backend,
and the fused ops' calls, timed alone with each backend, are what changes. Median of --runs calls; the variants take
turns (one call each per round), so that load from other processes hits all alike.

    python benchmarks/bench_model.py [--sizes n s] [--runs 10] [--malloc retain|default]   # markdown table
    python benchmarks/bench_model.py --device cuda [--sizes n s] [--runs 20]   # GPU: fp32 and bf16 autocast columns
    python -m pytest benchmarks/bench_model.py --benchmark-only        # pytest-benchmark
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dfine  # noqa: E402
from dfine.deploy.cpu import prepack_linear_weights, to_memory_format  # noqa: E402

torch.set_num_threads(2)
IMAGE = (640, 640)


def config_path(size):
    return str(REPO / "configs" / "dfine" / f"dfine_hgnetv2_{size}_coco.yml")


def build_ours(size, backend, deploy=False, channels_last=False, onednn_linear=False):
    torch.manual_seed(0)
    model = dfine.build_model(dfine.load_config(config_path(size)), backend=backend).eval()
    model = model.deploy() if deploy else model
    if onednn_linear:
        prepack_linear_weights(model)
    return ChannelsLast(model) if channels_last else model


def build_predict_path(size):
    """What `python -m dfine predict` runs on the CPU: dfine.load_detector (deploy + optimize_for_cpu)."""
    torch.manual_seed(0)
    return ChannelsLast(dfine.load_detector(config_path(size), None, backend="auto").model)


class ChannelsLast(torch.nn.Module):
    """The model with NHWC weights, fed NHWC images (oneDNN's native layout on the CPU)."""

    def __init__(self, model):
        super().__init__()
        self.model = to_memory_format(model, True)

    def forward(self, images):
        return self.model(to_memory_format(images, True))


def build_transformers(size):
    """DFineForObjectDetection with D-FINE-{size}'s architecture and random weights, or None."""
    try:
        from transformers import DFineConfig, DFineForObjectDetection, HGNetV2Config
    except Exception:
        return None
    from dfine.model.hgnetv2 import ARCHS

    cfg = dfine.load_config(config_path(size))
    from dfine.model import DFINETransformer, HybridEncoder

    bb = cfg["HGNetv2"]
    enc = dict(_defaults(HybridEncoder), **cfg["HybridEncoder"])
    dec = dict(_defaults(DFINETransformer), **cfg["DFINETransformer"])
    stem, stages = ARCHS[bb["name"]]
    backbone = HGNetV2Config(
        stem_channels=stem, stage_in_channels=[s[0] for s in stages], stage_mid_channels=[s[1] for s in stages],
        stage_out_channels=[s[2] for s in stages], stage_num_blocks=[s[3] for s in stages],
        stage_downsample=[s[4] for s in stages], stage_light_block=[s[5] for s in stages],
        stage_kernel_size=[s[6] for s in stages], stage_numb_of_layers=[s[7] for s in stages],
        hidden_sizes=[s[2] for s in stages], use_lab=bb.get("use_lab", False),
        out_features=[f"stage{i + 1}" for i in bb["return_idx"]],
    )
    hf_cfg = DFineConfig(
        backbone_config=backbone, num_labels=cfg["num_classes"], encoder_in_channels=enc["in_channels"],
        feat_strides=enc["feat_strides"], encoder_hidden_dim=enc["hidden_dim"], encoder_ffn_dim=enc["dim_feedforward"],
        encode_proj_layers=enc["use_encoder_idx"], hidden_expansion=enc["expansion"], depth_mult=enc["depth_mult"],
        d_model=dec["hidden_dim"], decoder_in_channels=dec["feat_channels"], num_feature_levels=dec["num_levels"],
        decoder_n_levels=dec["num_levels"], decoder_layers=dec["num_layers"], decoder_ffn_dim=dec["dim_feedforward"],
        decoder_n_points=dec["num_points"], num_queries=dec["num_queries"], reg_scale=float(dec["reg_scale"]),
        eval_idx=dec["eval_idx"], anchor_image_size=list(cfg["eval_spatial_size"]), num_denoising=dec["num_denoising"],
        # transformers freezes the backbone BatchNorms by default; the published configs say per size
        freeze_backbone_batch_norms=bool(bb.get("freeze_norm", False)),
    )
    return DFineForObjectDetection(hf_cfg).eval()


def _defaults(cls):
    import inspect

    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if p.default is not p.empty}


def time_model(model, runs=10, warmup=2):
    return time_in_turns({"model": model}, runs, warmup)["model"]


def time_in_turns(calls, runs=10, warmup=2):
    """Median ms of every ``calls[name](x)`` on one 640x640 image; the calls take turns (one call of
    each per round), so that load from other processes on a shared machine hits all alike."""
    x = torch.rand(1, 3, *IMAGE)
    times = {name: [] for name in calls}
    gc_was_enabled = gc.isenabled()
    with torch.no_grad():
        for call in calls.values():
            for _ in range(warmup):
                call(x)
        gc.collect()
        gc.disable()  # as in timeit: no whole-heap collection inside a timed call
        try:
            for _ in range(runs):
                for name, call in calls.items():
                    t0 = time.perf_counter()
                    call(x)
                    times[name].append(time.perf_counter() - t0)
        finally:
            if gc_was_enabled:
                gc.enable()
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


VARIANTS = {
    "reference ops": lambda s: build_ours(s, "reference"),
    "fused ops (auto)": lambda s: build_ours(s, "auto"),
    "fused + deploy()": lambda s: build_ours(s, "auto", deploy=True),
    "fused + deploy() + channels_last": lambda s: build_ours(s, "auto", deploy=True, channels_last=True),
    "fused + deploy() + channels_last + oneDNN linear": lambda s: build_ours(s, "auto", deploy=True,
                                                                             channels_last=True, onednn_linear=True),
    "predict on CPU (load_detector: deploy + optimize_for_cpu)": build_predict_path,
    "transformers": build_transformers,
}


@pytest.mark.parametrize("size", ["n", "s"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bench_eval_640(benchmark, size, variant):
    model = VARIANTS[variant](size)
    if model is None:
        pytest.skip("transformers is not installed (optional benchmark extra)")
    x = torch.rand(1, 3, *IMAGE)
    with torch.no_grad():
        model(x)
        benchmark.pedantic(model, args=(x,), rounds=3, iterations=1, warmup_rounds=1)


def decoder_call(model):
    """The decoder alone (query selection, FDR layers, heads) on fixed encoder features."""
    x = torch.rand(1, 3, *IMAGE)
    with torch.no_grad():
        feats = model.encoder(model.backbone(x))
    return lambda _x: model.decoder(feats)


def time_decoder(model, runs=10, warmup=2):
    return time_model(decoder_call(model), runs, warmup)


def sgemm_peak_gflops(runs=5):
    """The best fp32 matrix-multiply rate of this machine (GFLOP/s, current thread count), over a
    large square GEMM and the decoder's largest one (8400 anchors x 256 x 256)."""
    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (8400, 256, 256)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * m * k * n / min(times) / 1e9)
    return best


def decoder_gemm_gflop(model):
    """GFLOP of the matrix multiplies in one decoder call (torch.utils.flop_counter), the same in
    every backend: the fused ops replace the sampling and the FDR decode, not the linear layers."""
    from torch.utils.flop_counter import FlopCounterMode

    call = decoder_call(model)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call(None)
    return counter.get_total_flops() / 1e9


def fused_op_times_ms(model, runs=10):
    """(reference ms, fused ms) of the decoder's fused-op calls alone (every ms_deform_attn and
    fdr_decode call of one decoder run, recorded and replayed with backend "reference" and "cpp")."""
    import dfine.model.decoder as decoder_mod
    import dfine.model.deformable_attention as attention_mod

    calls = []
    real_attn, real_fdr = attention_mod.ms_deform_attn, decoder_mod.fdr_decode

    def record(fn, name):
        def wrapper(*args, **kwargs):
            calls.append((fn, args, {k: v for k, v in kwargs.items() if k != "backend"}))
            return fn(*args, **kwargs)
        return wrapper

    attention_mod.ms_deform_attn = record(real_attn, "ms_deform_attn")
    decoder_mod.fdr_decode = record(real_fdr, "fdr_decode")
    try:
        decoder_call(model)(None)
    finally:
        attention_mod.ms_deform_attn, decoder_mod.fdr_decode = real_attn, real_fdr
    replay = {backend: (lambda b=backend: [fn(*a, backend=b, **kw) for fn, a, kw in calls])
              for backend in ("reference", "cpp")}
    times = time_in_turns({k: (lambda _x, f=f: f()) for k, f in replay.items()}, runs=runs)
    return times["reference"], times["cpp"]


CUDA_VARIANTS = {
    "reference ops": lambda s: build_ours(s, "reference"),
    "fused ops (auto)": lambda s: build_ours(s, "auto"),
    "fused + deploy()": lambda s: build_ours(s, "auto", deploy=True),
    "transformers": build_transformers,
}


def main_cuda(args, device):
    """Eval latency on the GPU: the device-independent variants, fp32 and bf16 autocast; CUDA-event times."""
    from dfine.ops.timing import median_ms

    x = torch.rand(1, 3, *IMAGE, device=device)
    modes = {"fp32": None, "bf16 autocast": torch.bfloat16}
    print(f"eval latency on {torch.cuda.get_device_name(device)}, 1x3x{IMAGE[0]}x{IMAGE[1]}, median of {args.runs} "
          "CUDA-event times after 3 warm-up calls")
    header = ["size", "variant"] + [f"{m} ms" for m in modes] + [f"{m} vs reference ops" for m in modes]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)
    for size in args.sizes:
        ref = {}
        for name, make in CUDA_VARIANTS.items():
            model = make(size)
            if model is None:
                continue
            model = model.to(device)
            times = {}
            for mode, dtype in modes.items():
                def call(model=model, dtype=dtype):
                    with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                        return model(x)
                times[mode] = median_ms(call, device, args.runs, warmup=3)
                if name == "reference ops":
                    ref[mode] = times[mode]
            cells = [size.upper(), name] + [f"{times[m]:.2f}" for m in modes] + [f"{ref[m] / times[m]:.2f}x" for m in modes]
            print("| " + " | ".join(cells) + " |", flush=True)
            del model
            torch.cuda.empty_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["n", "s"])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--malloc", choices=["retain", "default"], default="retain",
                        help="under the system allocator: keep freed memory, as `python -m dfine predict` does "
                             "on the CPU (process-wide, so every variant runs under it), or glibc's defaults")
    parser.add_argument("--device", default="cpu",
                        help="cpu (default) or cuda / cuda:N: the device-independent variants, fp32 and bf16 autocast")
    args = parser.parse_args(argv)
    from dfine.ops.timing import device_or_exit

    device = device_or_exit(args.device)
    if device.type == "cuda":
        return main_cuda(args, device)
    from dfine.deploy.cpu import loaded_allocator, retain_freed_memory

    allocator = loaded_allocator()
    if allocator == "system" and args.malloc == "retain" and retain_freed_memory():
        allocator = "system, retaining freed memory"
    print(f"allocator: {allocator}")
    from dfine.ops._backend import resolve_backend

    print(f"fused backend on CPU resolves to: {resolve_backend('auto', torch.device('cpu'), 'ms_deform_attn')}")
    print("| size | variant | median ms | vs reference ops | vs transformers |")
    print("|---|---|---|---|---|")
    bound = []
    for size in args.sizes:
        models = {name: make(size) for name, make in VARIANTS.items()}
        results = time_in_turns({name: m for name, m in models.items() if m is not None}, runs=args.runs)
        del models
        ref, hf = results.get("reference ops"), results.get("transformers")
        for name, ms in results.items():
            vs_hf = f"{hf / ms:.2f}x" if hf else "n/a"
            print(f"| {size.upper()} | {name} | {ms:.1f} | {ref / ms:.2f}x | {vs_hf} |")
        decoders = {
            "decoder only, reference ops": decoder_call(build_ours(size, "reference")),
            "decoder only, fused ops (auto)": decoder_call(build_ours(size, "auto")),
            "decoder only, fused ops + oneDNN linear": decoder_call(build_ours(size, "auto", onednn_linear=True)),
        }
        dec = time_in_turns(decoders, runs=args.runs)
        dec_ref = dec["decoder only, reference ops"]
        for name, ms in dec.items():
            print(f"| {size.upper()} | {name} | {ms:.1f} | {dec_ref / ms:.2f}x | |")
        gflop, peak = decoder_gemm_gflop(build_ours(size, "reference")), sgemm_peak_gflops()
        gemm_ms = gflop / peak * 1e3
        ref_ops, fused_ops = fused_op_times_ms(build_ours(size, "reference"), runs=args.runs)
        bound.append(
            f"{size.upper()}: the decoder's matrix multiplies are {gflop:.2f} GFLOP, >= {gemm_ms:.1f} ms at this "
            f"machine's best sgemm rate ({peak:.0f} GFLOP/s). Its ms_deform_attn + fdr_decode calls take "
            f"{ref_ops:.1f} ms with the reference ops and {fused_ops:.1f} ms fused. Even if every other op cost "
            f"nothing, fusing could make the decoder at most ({gemm_ms:.1f} + {ref_ops:.1f}) / ({gemm_ms:.1f} + "
            f"{fused_ops:.1f}) = {(gemm_ms + ref_ops) / (gemm_ms + fused_ops):.2f}x faster; measured "
            f"{dec_ref / dec['decoder only, fused ops (auto)']:.2f}x"
        )
    print("\nWhat fusion can gain in the decoder (its linear layers are identical in every backend):")
    for line in bound:
        print(f"- {line}")


if __name__ == "__main__":
    main()
