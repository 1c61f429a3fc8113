"""Timing and CPU peak-memory helpers shared by bench_fdr_decode.py and bench_golsd_losses.py.

Peak memory: the profiler's allocation events (torch.profiler, profile_memory=True) in time order;
the peak of their running sum is the most memory the measured call held at once beyond what was
allocated before it started (inputs excluded, outputs and gradients included). Checked on a known
sequence in ``_check_peak_memory`` (run by ``main()`` of both benchmarks).
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

THREADS = 2


def setup_threads():
    torch.set_num_threads(THREADS)


def time_ms(fn, warmup: int = 3, repeat: int = 15) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def peak_memory_bytes(fn, return_kept: bool = False):
    """Peak of the running sum of CPU allocations made while ``fn()`` runs (see module doc).
    With ``return_kept``: ``(peak, kept)``, kept = bytes of the tensors ``fn()`` returns (its outputs,
    or the gradients for a forward+backward), so ``peak - kept`` is the extra memory beyond them."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    results = result if isinstance(result, (tuple, list)) else [result]
    kept = sum(t.numel() * t.element_size() for t in results if isinstance(t, torch.Tensor))
    del result, results
    allocations = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.typed[0] == _EventType.Allocation:
            allocations.append((event.start_time_ns, event.typed[1].alloc_size))
        stack.extend(event.children)
    allocations.sort()
    running = peak = 0
    for _, size in allocations:
        running += size
        peak = max(peak, running)
    return (peak, kept) if return_kept else peak


def _check_peak_memory():
    def known():
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(500_000)  # + 2 MB -> 6 MB peak
        del a
        c = torch.empty(250_000)  # 3 MB held
        return b, c

    peak, kept = peak_memory_bytes(known, return_kept=True)
    assert peak == 6_000_000, f"peak-memory helper measured {peak} bytes for a known 6 MB peak"
    assert kept == 3_000_000, f"peak-memory helper counted {kept} bytes of results, expected 3 MB"


def cpp_available() -> bool:
    from dfine.ops import extension_available

    return extension_available()


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
