"""scripts/gpu_check.sh: stops at once without a GPU; its time budget and its summaries of each step's output
(checked on output in the formats the steps print: the GPU run itself needs a GPU)."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dfine.ops import compare

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_it_stops_at_once_with_a_clear_message(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    start = time.monotonic()
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert time.monotonic() - start < 100  # no build, no step: Python and torch start-up only (slow on a busy CPU)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: scripts/gpu_check.sh needs a CUDA GPU"), done.stderr
    assert not (tmp_path / "out").exists()


def _step(gpu_check, name, budget, commands=(("true",),)):
    return gpu_check.Step(name, budget, list(commands), lambda out, d: f"summary of {out}")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_unused_time_passes_to_later_steps(gpu_check, tmp_path):
    clock = FakeClock()
    taken = {"a": 30, "b": 500, "c": 5}  # b overruns: it is stopped at its allowance
    allowed = {}

    def run(command, env, timeout_s):
        name = command[0]
        allowed[name] = timeout_s
        if taken[name] > timeout_s:
            clock.now += timeout_s
            return None, f"{name} partial"
        clock.now += taken[name]
        return 0, f"{name} done"

    steps = [_step(gpu_check, "A", 100, [("a",)]), _step(gpu_check, "B", 50, [("b",)]),
             _step(gpu_check, "C", 50, [("c",)])]
    gpu_check.run_steps(steps, 200, tmp_path, clock=clock, run=run)
    assert allowed["a"] == 100  # 200 - the 100 the later steps keep
    assert allowed["b"] == 120  # 50 + the 70 that A did not use
    assert allowed["c"] == 50  # B could not take what C keeps
    assert [s.status for s in steps] == ["ok", "TIMEOUT after 120 s", "ok"]
    assert steps[1].output == "b partial" and steps[1].result == "summary of b partial"
    table = gpu_check.table(steps, "Fake GPU", clock.now).splitlines()
    assert table[0] == "GPU check on Fake GPU: 155 s in all"
    assert table[2] == "| step | budget s | took s | status | result |"
    assert table[5] == "| B | 50 | 120 | TIMEOUT after 120 s | summary of b partial |"
    assert len(table) == 4 + 3


def test_a_step_without_time_left_is_skipped(gpu_check, tmp_path):
    """Start-up ate into the budget: a step whose allowance is under 10 s does not start."""
    ran = []
    steps = [_step(gpu_check, "A", 100, [("a",)]), _step(gpu_check, "B", 50, [("b",)])]
    gpu_check.run_steps(steps, 55, tmp_path, clock=FakeClock(),
                        run=lambda command, env, timeout_s: (ran.append(command[0]), (0, ""))[1])
    assert [s.status for s in steps] == ["skipped", "ok"] and ran == ["b"]
    assert steps[0].result == "no time left (5 s)"


def test_a_failing_command_ends_its_step(gpu_check, tmp_path):
    ran = []

    def run(command, env, timeout_s):
        ran.append(command[0])
        return (3, "boom") if command[0] == "first" else (0, "")

    steps = [_step(gpu_check, "S", 10, [("first",), ("second",)])]
    gpu_check.run_steps(steps, 100, tmp_path, clock=FakeClock(), run=run)
    assert ran == ["first"] and steps[0].status == "FAILED (exit 3)"


def test_steps_cover_the_check(gpu_check, tmp_path):
    steps = gpu_check.steps(sys.executable, tmp_path, 16)
    assert sum(s.budget_s for s in steps) <= gpu_check.TOTAL_BUDGET_S <= 8 * 60
    build = steps[0]
    assert build.env["TORCH_CUDA_ARCH_LIST"] is None  # unset: the build targets the GPU present
    joined = [" ".join(c) for s in steps for c in s.commands]
    assert any("-m cuda tests/ops" in c for c in joined)
    assert any("-m cuda tests/model tests/engine" in c for c in joined)
    assert all(s.env["CI"] == "true" and s.env["TRITON_INTERPRET"] == "0" for s in steps
               if s.commands[0][1:3] == ["-m", "pytest"])
    assert sum(s.commands[0][1:3] == ["-m", "pytest"] for s in steps) == 2
    assert any("dfine.ops.compare --device cuda" in c for c in joined)
    for script in ("bench_ms_deform_attn", "bench_fdr_decode", "bench_golsd_losses"):
        assert any(f"benchmarks/{script}.py --device cuda" in c for c in joined)
    assert any("bench_train_step.py --device cuda --sizes s" in c and "--amp off bfloat16" in c for c in joined)
    assert any("train.py" in c and "--use-amp" in c and f"--num-train {100 * 8}" not in c for c in joined)
    assert any(f"--num-train {gpu_check.TRAIN_STEPS * gpu_check.TRAIN_BATCH}" in c for c in joined)


def test_the_gpu_commands_parse(gpu_check, tmp_path, monkeypatch, capsys):
    """Every benchmark/compare command of the check takes its options: run here (no GPU, mocked), each one gets
    past its argument parser and stops at the device check (an unknown option would stop in argparse first)."""
    from tests.test_benchmarks import _load

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    threads = torch.get_num_threads()
    commands = [c for s in gpu_check.steps(sys.executable, tmp_path, 4) for c in s.commands]
    checked = 0
    for command in commands:
        if command[1].startswith("benchmarks/"):
            main = _load(command[1].split("/")[1]).main
            argv = command[2:]
        elif command[1:3] == ["-m", "dfine.ops.compare"]:
            main, argv = compare.main, command[3:]
        else:
            continue
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and err.startswith("error: --device cuda: no CUDA GPU"), (command, err)
        checked += 1
    torch.set_num_threads(threads)
    assert checked == 5
    train = next(c for c in commands if c[1] == "train.py")
    sys.path.insert(0, str(REPO))
    import train as train_script

    parsed = train_script.parse_args(train[2:])
    assert parsed.use_amp and parsed.device == "cuda" and "epochs=1" in parsed.update


# ------------------------------------------------------------------------------------------------
# summaries


def test_summarize_build(gpu_check, tmp_path):
    out = ("dfine: building CUDA kernels for compute_90,sm_90 (the visible GPUs (compute capability 9.0), "
           "detected by torch)\ncuda_archs=compute_90,sm_90 runs_here=True auto=cpp\n")
    assert gpu_check.summarize_build(out, tmp_path) == (
        "compiled for compute_90,sm_90 (the visible GPUs (compute capability 9.0), detected by torch); "
        "kernel image for this GPU: yes; backend auto on cuda -> cpp")


def test_summarize_pytest(gpu_check, tmp_path):
    out = "....F\n=========== short test summary info ===========\nFAILED x\n3 failed, 208 passed, 2 skipped in 91.20s\n"
    assert gpu_check.summarize_pytest(out, tmp_path) == "3 failed, 208 passed, 2 skipped in 91.20s"


def test_summarize_compare(gpu_check, tmp_path):
    rows = []
    for dtype, err, fused in (("float32", 3e-7, 1.0), ("bfloat16", 4e-3, 0.5)):
        r = compare.Comparison("ms_deform_attn", "cpp", "B=4", fused_ms=fused, reference_ms=6.0, device="cuda",
                               dtype=dtype)
        r.errors = [compare.TensorError("out", err, err), compare.TensorError("grad_value", err / 2, err / 2)]
        rows.append(r)
    rows.append(compare.Comparison("fdr_decode", "cpp", "rows", device="cuda", dtype="bfloat16",
                                   failure="no bf16 kernel"))
    out = compare.format_table(rows) + "\n\n" + compare.format_timing_table(rows)
    assert gpu_check.summarize_compare(out, tmp_path) == (
        "max rel err float32 3.0e-07, bfloat16 4.0e-03; fwd+bwd vs reference (float32/bfloat16): "
        "ms_deform_attn cpp 6.00x/12.00x, fdr_decode cpp n/a/n/a")


def test_summarize_kernel_bench(gpu_check, tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import _cuda_bench

    times = {("reference", torch.float32): 6.0, ("cpp", torch.float32): 1.5, ("reference", torch.bfloat16): 5.0,
             ("cpp", torch.bfloat16): 1.0}
    monkeypatch.setattr(_cuda_bench, "measure_cell", lambda call, device, runs: call())

    def make_call(shape, mode, variant, dtype):
        if variant == "triton" and dtype == torch.bfloat16:
            raise RuntimeError("no bf16 here")
        return lambda: (times.get((variant, dtype), 2.0) * (1 if mode == "fwd+bwd" else 0.5), 12.0)

    _cuda_bench.cuda_table([("train", "fwd"), ("train", "fwd+bwd"), ("infer", "fwd+bwd")], make_call, "cuda",
                           ["float32", "bfloat16"], ["reference", "cpp", "triton"], 5)
    out = capsys.readouterr().out
    assert "| train | fwd+bwd | cpp | 1.500 | 4.00x | 12.0 | 1.000 | 5.00x | 12.0 |" in out
    assert "- triton bfloat16 (train fwd): RuntimeError: no bf16 here" in out
    assert gpu_check.summarize_kernel_bench(out, tmp_path) == (
        "train, fwd+bwd ms (float32/bfloat16): reference 6.000/5.000, cpp 1.500/1.000, triton 2.000/n/a")


def test_summarize_train_step(gpu_check, tmp_path):
    out = ("one training step on NVIDIA H200 ...\n"
           "| size | variant | fp32 s | fp32 vs reference ops | fp32 peak GiB | bfloat16 s | bfloat16 vs reference ops "
           "| bfloat16 peak GiB |\n|---|---|---|---|---|---|---|---|\n"
           "| S | reference ops | 0.210 | 1.00x | 6.10 | 0.150 | 1.00x | 4.00 |\n"
           "| S | fused ops (auto) | 0.180 | 1.17x | 5.00 | 0.120 | 1.25x | 3.50 |\n")
    assert gpu_check.summarize_train_step(out, tmp_path) == (
        "S reference ops: fp32 0.210 s, bfloat16 0.150 s; S fused ops (auto): fp32 0.180 s, bfloat16 0.120 s")


def test_summarize_training(gpu_check, tmp_path):
    log = tmp_path / "train" / "log.jsonl"
    log.parent.mkdir()
    records = [{"type": "step", "epoch": 0, "step": 10 * i, "loss": 40.0 - i, "lr": 1e-4} for i in range(1, 11)]
    records.append({"type": "epoch", "epoch": 0, "train": {"loss": 33.0, "steps": 100, "skipped": 0, "seconds": 12.5},
                    "eval": {"AP": 0.012}})
    log.write_text("\n".join(json.dumps(r) for r in records))
    assert gpu_check.summarize_training("", tmp_path) == "100 steps, loss 39.000 -> 30.000, 125 ms/step, AP 0.012"
    assert gpu_check.summarize_training("", tmp_path / "none") == "no log.jsonl"
