"""Parameters (train / deploy format) and GFLOPs at 640x640 of every D-FINE size.

    python -m dfine info [--sizes n s m l x] [--configs-dir configs/dfine]

GFLOPs are counted with torch.utils.flop_counter on the deployed model (the release's numbers by
that method: 7.31 / 25.50 / 57.03 / 91.60 / 203.08; calflops gives 7.16 / 25.17 / 56.68 / 91.03 /
202.49).
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.utils.flop_counter import FlopCounterMode

from dfine.config import load_config
from dfine.model import build_model

PUBLISHED_FLOP_COUNTER_GFLOPS = {"n": 7.31, "s": 25.50, "m": 57.03, "l": 91.60, "x": 203.08}


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _cpu_flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """q @ k^T and attn @ v of the fused CPU attention kernel (2 FLOPs per multiply-add)."""
    b, h, lq, d = query
    lk, dv = key[-2], value[-1]
    return 2 * b * h * lq * lk * d + 2 * b * h * lq * lk * dv


def count_gflops(model: torch.nn.Module, size=(640, 640)) -> float:
    """FLOPs of one forward pass. The attention matmuls of nn.MultiheadAttention run in a fused CPU
    kernel that torch.utils.flop_counter has no formula for; they are added with the same count
    the counter uses for bmm, so the total matches the release (whose attention ran as bmm)."""
    x = torch.rand(1, 3, *size)
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops}
    # grad mode on, like the release's measurement: nn.MultiheadAttention then runs its composite
    # path (linear + attention matmuls), which the counter sees; the no-grad fast path is opaque to it.
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(x)
    return counter.get_total_flops() / 1e9


def model_info(config: str, backend: str = "reference") -> dict:
    model = build_model(load_config(config), backend=backend).eval()
    params = count_params(model)
    model.deploy()
    return {"params": params, "deploy_params": count_params(model), "gflops": count_gflops(model)}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dfine info", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["n", "s", "m", "l", "x"])
    parser.add_argument("--configs-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "configs", "dfine"))
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print("| size | params | params (deploy) | GFLOPs @640 (flop_counter) | published (flop_counter) |")
    print("|---|---|---|---|---|")
    for s in args.sizes:
        info = model_info(os.path.join(args.configs_dir, f"dfine_hgnetv2_{s}_coco.yml"))
        print(f"| {s.upper()} | {info['params']:,} | {info['deploy_params']:,} | {info['gflops']:.2f} | "
              f"{PUBLISHED_FLOP_COUNTER_GFLOPS.get(s, float('nan')):.2f} |")


if __name__ == "__main__":
    main()
