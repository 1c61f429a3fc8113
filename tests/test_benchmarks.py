"""The benchmark scripts' --device option: on a machine without a GPU (mocked here, so this runs anywhere)
`--device cuda` stops at once with one `error:` line and exit status 2, before any model is built; the CUDA
timing helpers they share (dfine.ops.timing) time and measure what they say."""

import contextlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from dfine.ops import timing

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("bench_*.py"))


def _load(name):
    bench_dir = str(REPO / "benchmarks")
    if bench_dir not in sys.path:
        sys.path.insert(0, bench_dir)
    spec = importlib.util.spec_from_file_location(f"_bench_{name[:-3]}", REPO / "benchmarks" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_benchmark_is_covered():
    assert SCRIPTS == ["bench_compile.py", "bench_fdr_decode.py", "bench_golsd_losses.py", "bench_inference.py",
                       "bench_model.py", "bench_ms_deform_attn.py", "bench_train_step.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_device_cuda_without_a_gpu_is_one_error_line(script, monkeypatch, capsys):
    module = _load(script)
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stopped:
        module.main(["--device", "cuda"])
    torch.set_num_threads(threads)
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --device cuda: no CUDA GPU is visible"), err
    assert "\n" not in err


def test_resolve_device():
    assert timing.resolve_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "cuda:x", "mps"):
        with pytest.raises(timing.DeviceUnavailable, match="--device must be cpu, cuda or cuda:N"):
            timing.resolve_device(bad)


def test_resolve_device_with_a_mocked_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert timing.resolve_device("cuda") == torch.device("cuda", 0)
    assert timing.resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(timing.DeviceUnavailable, match="only 1 CUDA device"):
        timing.resolve_device("cuda:1")


class FakeEvent:
    """torch.cuda.Event stand-in on a fake clock: elapsed_time is the fake time between the records."""

    clock = [0.0]

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.at = None

    def record(self):
        self.at = FakeEvent.clock[0]

    def elapsed_time(self, end):
        return end.at - self.at


def test_cuda_timing_uses_events_and_synchronises(monkeypatch):
    """On a (mocked) GPU, times_ms brackets every call with events and synchronises before reading them."""
    synced = []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(len(calls)))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    calls = []

    def work():  # the n-th call takes n ms on the fake clock
        calls.append(1)
        FakeEvent.clock[0] += len(calls)

    got = timing.times_ms(work, "cuda:0", repeats=3, warmup=1)
    assert got == [2.0, 3.0, 4.0]  # the warm-up (1 ms) is not timed
    assert synced == [1, 4]  # after the warm-up, and once after the timed calls, before reading the events
    assert timing.median_ms(work, "cuda:0", repeats=3, warmup=0) == 6.0


def test_cuda_peak_bytes_reads_the_allocator_peak(monkeypatch):
    stats = {"allocated": 1000, "peak": 0}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: stats.update(peak=stats["allocated"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: stats["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: stats["peak"])

    def call():
        stats["peak"] = stats["allocated"] + 5000  # 5000 bytes at most during the call
        return torch.zeros(10), [torch.zeros(2, dtype=torch.float64)]

    assert timing.cuda_peak_bytes(call, "cuda:0") == (5000, 10 * 4 + 2 * 8)


def test_cpu_timing():
    assert all(t >= 0 for t in timing.times_ms(lambda: sum(range(100)), "cpu", repeats=3))
