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


def parse_args(argv=None, description=None, extra=None):
    """The kernel benchmarks' command line: ``--malloc`` (CPU, below), the ``--device cuda`` options
    (``_cuda_bench.add_device_arguments``) and what ``extra(parser)`` adds."""
    import argparse

    from _cuda_bench import add_device_arguments

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--malloc", choices=["retain", "default"], default="retain",
                        help="under the system allocator: keep freed memory (as train.py does) or not")
    add_device_arguments(parser)
    if extra is not None:
        extra(parser)
    return parser.parse_args(argv)


def apply_allocator(malloc: str) -> str:
    """``retain`` (default): run the way train.py does, with glibc told to keep freed memory
    (dfine.deploy.cpu.retain_freed_memory); ``default``: glibc's defaults, under which the fresh gradients of
    every call (1 MiB per layer for the losses, 34 MiB for ms_deform_attn) are returned to the system and
    page-faulted in again on the next call. Returns the allocator's name for the table header."""
    from dfine.deploy.cpu import loaded_allocator, retain_freed_memory

    allocator = loaded_allocator()
    if allocator == "system" and malloc == "retain" and retain_freed_memory():
        allocator = "system, retaining freed memory"
    return allocator


def setup_allocator(argv=None, description=None) -> str:
    """Parses the command line (:func:`parse_args`) and applies ``--malloc`` (:func:`apply_allocator`)."""
    return apply_allocator(parse_args(argv, description).malloc)


def times_ms_in_turns(calls: dict, rounds: int = 5, per_round: int = 6) -> dict:
    """Median wall time in milliseconds of every ``calls[name]()``. The calls take turns: in each of
    ``rounds`` rounds every call runs once untimed (its data back in cache) and then ``per_round``
    times timed, so that load from other processes on a shared machine hits all of them alike.
    Python's garbage collector is off while timing, as in ``timeit``: a collection of the whole heap
    (millions of objects once torch is imported) would otherwise land in whichever call triggers it."""
    for fn in calls.values():
        fn()
    samples = {name: [] for name in calls}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            for name, fn in calls.items():
                fn()
                for _ in range(per_round):
                    start = time.perf_counter()
                    fn()
                    samples[name].append((time.perf_counter() - start) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: statistics.median(t) for name, t in samples.items()}


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
