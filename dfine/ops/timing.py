"""Device choice, timing and peak memory for `python -m dfine.ops.compare` and the scripts in benchmarks/.

* :func:`resolve_device` turns ``--device cpu|cuda[:N]`` into a ``torch.device``; asking for CUDA where no GPU
  is visible is a :class:`DeviceUnavailable` with one line that says so (:func:`device_or_exit` prints it as
  ``error: ...`` and exits 2).
* :func:`times_ms`: per-call milliseconds. On a GPU every call is bracketed by CUDA events and the device is
  synchronised once at the end (kernel launches are asynchronous: a host clock would time the launches);
  on the CPU ``time.perf_counter``.
* :func:`cuda_peak_bytes`: the most memory the caching allocator handed out during a call beyond what was
  allocated before it (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``), and the bytes
  of the tensors the call returned.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, List, Tuple

import torch

__all__ = ["DeviceUnavailable", "resolve_device", "device_or_exit", "synchronize", "times_ms", "median_ms",
           "cuda_peak_bytes", "tensor_bytes", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class DeviceUnavailable(RuntimeError):
    """The requested device does not exist here."""


def resolve_device(name: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a device that exists here, else :class:`DeviceUnavailable`."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise DeviceUnavailable(f"--device must be cpu, cuda or cuda:N, got {name!r}") from err
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceUnavailable(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        why = "this torch was built without CUDA" if torch.version.cuda is None else "torch.cuda.is_available() is False"
        raise DeviceUnavailable(f"--device {name}: no CUDA GPU is visible on this machine ({why})")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceUnavailable(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def device_or_exit(name: str) -> torch.device:
    """:func:`resolve_device` for a command line: one ``error: ...`` line and exit status 2 when it fails."""
    try:
        return resolve_device(name)
    except DeviceUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def times_ms(fn: Callable[[], object], device, repeats: int, warmup: int = 1) -> List[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn()`` after ``warmup`` untimed ones."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        out = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1e3)
        return out
    torch.cuda.synchronize(device)
    with torch.cuda.device(device):
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def median_ms(fn: Callable[[], object], device, repeats: int, warmup: int = 1) -> float:
    return statistics.median(times_ms(fn, device, repeats, warmup))


def tensor_bytes(result) -> int:
    """Bytes of the tensors in ``result`` (a tensor, or a nested tuple/list/dict of them)."""
    if isinstance(result, torch.Tensor):
        return result.numel() * result.element_size()
    if isinstance(result, dict):
        return sum(tensor_bytes(v) for v in result.values())
    if isinstance(result, (list, tuple)):
        return sum(tensor_bytes(v) for v in result)
    return 0


def cuda_peak_bytes(fn: Callable[[], object], device) -> Tuple[int, int]:
    """(peak bytes allocated during ``fn()`` beyond those allocated before it, bytes of the tensors it returned)."""
    device = torch.device(device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    return max(0, peak), tensor_bytes(result)
