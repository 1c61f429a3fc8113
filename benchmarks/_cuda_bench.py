"""The ``--device cuda`` path of the kernel benchmarks (bench_ms_deform_attn.py, bench_fdr_decode.py,
bench_golsd_losses.py).

Every variant - the reference, torch.compile(reference), the C++/CUDA kernel ("cpp") and Triton - runs in each
dtype (float32 and bfloat16 by default), forward and forward+backward, on the benchmark's shapes. Time: the median
of ``--runs`` calls, each bracketed by CUDA events (``dfine.ops.timing.times_ms``; two untimed calls first, which
also compile). Memory: the peak the caching allocator handed out during one call beyond what was allocated before
it (``torch.cuda.max_memory_allocated``), outputs and gradients included. A variant that does not take a dtype (or
fails) shows ``n/a`` and its error is listed under the table. Rows are printed as they are measured.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from dfine.ops.timing import DTYPES, cuda_peak_bytes, device_or_exit, median_ms  # noqa: E402

VARIANTS = ("reference", "compile(reference)", "cpp", "triton")


def add_device_arguments(parser) -> None:
    parser.add_argument("--device", default="cpu",
                        help="cpu (default: the CPU tables) or cuda / cuda:N (the table of the module docstring of "
                             "benchmarks/_cuda_bench.py)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES),
                        help="with --device cuda: the dtypes (one column group each)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="with --device cuda: the variants (rows)")
    parser.add_argument("--runs", type=int, default=20, help="with --device cuda: timed calls per cell")


def device_from_args(args) -> torch.device:
    """The device of ``--device``; on a machine without a GPU, ``--device cuda`` is one ``error:`` line, exit 2."""
    return device_or_exit(args.device)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def measure_cell(call: Callable[[], object], device, runs: int) -> Tuple[float, float]:
    """(median ms, peak MiB) of ``call()`` on ``device``."""
    ms = median_ms(call, device, runs, warmup=2)
    peak, _ = cuda_peak_bytes(call, device)
    return ms, peak / 2**20


def cuda_table(rows: Sequence[Tuple[str, str]], make_call: Callable[[str, str, str, torch.dtype], Callable[[], object]],
               device, dtypes: Sequence[str], variants: Sequence[str], runs: int) -> List[str]:
    """Measure and print the table; ``make_call(shape, pass, variant, dtype)`` returns the zero-argument call to
    time. Returns the printed lines (header and rows)."""
    header = ["shape", "pass", "variant"]
    for d in dtypes:
        header += [f"{d} ms", f"{d} vs reference", f"{d} peak MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for line in lines:
        print(line, flush=True)
    failures: Dict[str, str] = {}
    for shape, mode in rows:
        reference_ms: Dict[str, float] = {}
        for variant in variants:
            cells = [shape, mode, variant]
            for d in dtypes:
                try:
                    ms, peak = measure_cell(make_call(shape, mode, variant, DTYPES[d]), device, runs)
                except Exception as err:  # a dtype the kernel does not take, a compile failure: listed, not fatal
                    failures[f"{variant} {d} ({shape} {mode})"] = _first_line(err)
                    cells += ["n/a", "n/a", "n/a"]
                    continue
                if variant == "reference":
                    reference_ms[d] = ms
                ratio = f"{reference_ms[d] / ms:.2f}x" if d in reference_ms else "-"
                cells += [f"{ms:.3f}", ratio, f"{peak:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    if failures:
        print("\nn/a cells:")
        for where, why in failures.items():
            print(f"- {where}: {why}")
    return lines


def describe_device(device) -> str:
    capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return f"{torch.cuda.get_device_name(device)} (compute capability {capability}), torch {torch.__version__}"
