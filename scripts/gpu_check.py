"""The one-command GPU check (run it as `bash scripts/gpu_check.sh`): build, tests, compare, kernel benchmarks,
the D-FINE-S training step and a 100-step training run on one CUDA GPU, within a total time budget, then one
markdown table (printed, and written to $OUT/gpu_check.md with every step's own output below it).

Every step runs in its own process under a timeout. Time a step does not use passes to the later ones: a step
may run until the total budget minus the budgets of the steps after it. A step that runs out of time is killed
and reported as such (with what it printed so far); the check goes on. Exit status: 0 when every step passed,
1 when one failed or timed out, 2 at once when no CUDA GPU is visible.

Environment: OUT (default output/gpu_check), GPU_CHECK_BUDGET (total seconds, default 470), PYTHON, MAX_JOBS
(default: the CPU count). The Python packages must be installed already (scripts/setup.sh does it).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 470  # of the 8 minutes; the rest is Python start-up and the report
TRAIN_STEPS = 100
TRAIN_BATCH = 8


@dataclass
class Step:
    name: str
    budget_s: int
    commands: Sequence[Sequence[str]]  # run one after the other; the step fails at the first non-zero status
    summarize: Callable[[str, Path], str]  # (output, OUT) -> the table's result cell
    env: dict = field(default_factory=dict)
    status: str = "not run"
    seconds: float = 0.0
    output: str = ""
    result: str = ""


# ------------------------------------------------------------------------------------------------
# summaries of each step's output (unit-tested on recorded output in tests/test_gpu_check.py)


def _rows(text: str) -> List[List[str]]:
    """The cells of every markdown table row in ``text`` (separator rows excluded)."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|") and line.endswith("|") and not re.fullmatch(r"\|[-|: ]*\|", line):
            rows.append([c.strip() for c in line[1:-1].split("|")])
    return rows


def summarize_build(output: str, out_dir: Path) -> str:
    built = re.search(r"dfine: building CUDA kernels for (\S+) \((.*)\)", output)
    check = re.search(r"cuda_archs=(\S*) runs_here=(\w+) auto=(\w+)", output)
    parts = []
    if built:
        parts.append(f"compiled for {built.group(1)} ({built.group(2)})")
    if check:
        parts.append(f"kernel image for this GPU: {'yes' if check.group(2) == 'True' else 'NO'}; "
                     f"backend auto on cuda -> {check.group(3)}")
    return "; ".join(parts) or "no build summary found"


def summarize_pytest(output: str, out_dir: Path) -> str:
    lines = [ln.strip().strip("=").strip() for ln in output.splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.search(r"\d+ (passed|failed|error|errors|skipped|deselected)", line):
            return line
    return "no pytest summary found"


def summarize_compare(output: str, out_dir: Path) -> str:
    """Worst relative error per dtype, and each op's fused-vs-reference speed per backend and dtype."""
    worst = {}
    speed = []
    rows = _rows(output)
    for cells in rows:
        if len(cells) == 9 and cells[0] != "op" and cells[6] != "n/a":  # the errors table
            dtype = cells[3]
            try:
                worst[dtype] = max(worst.get(dtype, 0.0), float(cells[7]))
            except ValueError:
                pass
    timing_header = next((c for c in rows if c[:3] == ["op", "backend", "device"] and len(c) > 9), None)
    if timing_header:
        dtypes = [h[: -len(" vs ref")] for h in timing_header if h.endswith(" vs ref")]
        for cells in rows:
            if len(cells) == len(timing_header) and cells[0] != "op":
                ratios = [cells[timing_header.index(f"{d} vs ref")] for d in dtypes]
                speed.append(f"{cells[0]} {cells[1]} {'/'.join(ratios)}")
    text = "max rel err " + ", ".join(f"{d} {v:.1e}" for d, v in worst.items()) if worst else "no errors table"
    if speed:
        text += f"; fwd+bwd vs reference ({'/'.join(dtypes)}): " + ", ".join(speed)
    return text


def summarize_kernel_bench(output: str, out_dir: Path) -> str:
    """From a benchmarks/_cuda_bench.py table: the first forward+backward shape, ms per variant and dtype."""
    rows = _rows(output)
    header = next((r for r in rows if r[:3] == ["shape", "pass", "variant"]), None)
    if header is None:
        return "no table found"
    dtypes = [h[: -len(" ms")] for h in header if h.endswith(" ms")]
    body = [r for r in rows if len(r) == len(header) and r[0] != "shape"]
    first = next((r[0] for r in body if r[1] == "fwd+bwd"), None)
    cells = []
    for r in body:
        if r[0] == first and r[1] == "fwd+bwd":
            times = "/".join(r[header.index(f"{d} ms")] for d in dtypes)
            cells.append(f"{r[2]} {times}")
    return f"{first}, fwd+bwd ms ({'/'.join(dtypes)}): " + ", ".join(cells)


def summarize_train_step(output: str, out_dir: Path) -> str:
    rows = _rows(output)
    header = next((r for r in rows if r[:2] == ["size", "variant"]), None)
    if header is None:
        return "no table found"
    settings = [h[: -len(" s")] for h in header if h.endswith(" s")]
    parts = []
    for r in rows:
        if len(r) == len(header) and r[0] != "size" and r[1] in ("reference ops", "fused ops (auto)"):
            values = ", ".join(f"{s} {r[header.index(f'{s} s')]} s" for s in settings)
            parts.append(f"{r[0]} {r[1]}: {values}")
    return "; ".join(parts) or "no rows"


def summarize_training(output: str, out_dir: Path) -> str:
    """Steps, first and last logged loss, the epoch's ms per step (data loading included) and AP, from log.jsonl."""
    log = out_dir / "train" / "log.jsonl"
    if not log.exists():
        return "no log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    steps = [r for r in records if r.get("type") == "step"]
    epochs = [r for r in records if r.get("type") == "epoch"]
    done = sum(r["train"].get("steps", 0) for r in epochs)
    text = f"{done} steps"
    if steps:
        text += f", loss {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}"
    seconds = sum(r["train"].get("seconds", 0.0) for r in epochs)
    if done:
        text += f", {seconds / done * 1e3:.0f} ms/step"
    evals = [r["eval"] for r in epochs if r.get("eval")]
    if evals:
        text += f", AP {evals[-1].get('AP', float('nan')):.3f}"
    return text


# ------------------------------------------------------------------------------------------------
# the steps


def steps(py: str, out_dir: Path, jobs: int) -> List[Step]:
    data = out_dir / "synthetic"
    cfg = "configs/dfine/dfine_hgnetv2_n_synthetic.yml"
    build_check = (
        "import torch\n"
        "from dfine.ops import _backend, cuda_arch\n"
        "ext = _backend.load_extension()\n"
        "archs = ext.cuda_archs() if ext is not None and hasattr(ext, 'cuda_archs') else ''\n"
        "runs = cuda_arch.runs_on(cuda_arch.parse_targets(archs), torch.cuda.get_device_capability())\n"
        "print(f'cuda_archs={archs} runs_here={runs} auto={_backend.resolve_backend(\"auto\", torch.device(\"cuda\"), \"check\")}')\n"
    )
    bench = ["--device", "cuda", "--runs", "10", "--variants", "reference", "cpp", "triton"]
    # CI=true: a CUDA case whose backend cannot run fails instead of skipping; Triton runs natively
    test_env = {"CI": "true", "DFINE_TEST_CUDA": "1", "TRITON_INTERPRET": "0"}
    return [
        Step("build dfine._C for this GPU", 175, [
            [py, "setup.py", "-q", "build_ext", "--inplace"],
            [py, "-c", build_check],
        ], summarize_build, env={"DFINE_WITH_CUDA": "1", "MAX_JOBS": str(jobs), "TORCH_CUDA_ARCH_LIST": None}),
        Step("op tests on CUDA (tests/ops, -m cuda)", 70, [
            [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests/ops"],
        ], summarize_pytest, env=test_env),
        Step("model and training tests on CUDA (tests/model, tests/engine, -m cuda)", 60, [
            [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests/model", "tests/engine"],
        ], summarize_pytest, env=test_env),
        Step("python -m dfine.ops.compare --device cuda", 25, [
            [py, "-m", "dfine.ops.compare", "--device", "cuda", "--no-compile"],
        ], summarize_compare),
        # (torch.compile(reference) columns: run the benchmarks without --variants; compiling each cell would
        # not fit the 8 minutes)
        Step("benchmarks/bench_ms_deform_attn.py", 30, [
            [py, "benchmarks/bench_ms_deform_attn.py", *bench, "--shapes", "train"],
        ], summarize_kernel_bench),
        Step("benchmarks/bench_fdr_decode.py", 15, [
            [py, "benchmarks/bench_fdr_decode.py", *bench],
        ], summarize_kernel_bench),
        Step("benchmarks/bench_golsd_losses.py", 15, [
            [py, "benchmarks/bench_golsd_losses.py", *bench],
        ], summarize_kernel_bench),
        Step("D-FINE-S training step, 4x3x640x640", 35, [
            [py, "benchmarks/bench_train_step.py", "--device", "cuda", "--sizes", "s", "--runs", "5",
             "--warmup", "2", "--amp", "off", "bfloat16", "--variants", "reference", "fused"],
        ], summarize_train_step),
        Step(f"{TRAIN_STEPS}-step fused training, D-FINE-N synthetic, bf16 AMP", 45, [
            [py, "-m", "dfine.data.synthetic", "--out", str(data), "--num-train", str(TRAIN_STEPS * TRAIN_BATCH),
             "--num-val", "32"],
            [py, "train.py", "-c", cfg, "--output-dir", str(out_dir / "train"), "--device", "cuda",
             "--use-amp", "--backend", "auto", "--no-progress", "-u", "epochs=1", "eval_freq=1", "print_freq=10",
             f"train_dataloader.total_batch_size={TRAIN_BATCH}", "train_dataloader.num_workers=4",
             f"train_dataloader.dataset.img_folder={data}/train",
             f"train_dataloader.dataset.ann_file={data}/annotations/instances_train.json",
             f"val_dataloader.dataset.img_folder={data}/val",
             f"val_dataloader.dataset.ann_file={data}/annotations/instances_val.json"],
        ], summarize_training),
    ]


def _run(command: Sequence[str], env: dict, timeout_s: float) -> tuple:
    """(exit status or None on timeout, output). The process group is killed on timeout."""
    proc = subprocess.Popen(list(command), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(timeout_s, 1))
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out


def run_steps(all_steps: List[Step], total_budget_s: float, out_dir: Path, clock=time.monotonic, run=_run) -> None:
    """Run the steps in order under the budget rule of the module docstring; fills status, seconds, output."""
    start = clock()
    for i, step in enumerate(all_steps):
        later = sum(s.budget_s for s in all_steps[i + 1:])
        allowed = total_budget_s - (clock() - start) - later
        if allowed < min(step.budget_s, 10):
            step.status, step.result = "skipped", f"no time left ({allowed:.0f} s)"
            continue
        env = dict(os.environ)
        for key, value in step.env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        t0 = clock()
        step.status = "ok"
        outputs = []
        for command in step.commands:
            remaining = allowed - (clock() - t0)
            code, out = run(command, env, remaining)
            outputs.append(out)
            if code is None:
                step.status = f"TIMEOUT after {allowed:.0f} s"
                break
            if code != 0:
                step.status = f"FAILED (exit {code})"
                break
        step.seconds = clock() - t0
        step.output = "\n".join(outputs)
        try:
            step.result = step.summarize(step.output, out_dir)
        except Exception as err:  # a summary must not hide the step's status
            step.result = f"(no summary: {type(err).__name__}: {err})"


def table(all_steps: Sequence[Step], gpu: str, total_s: float) -> str:
    lines = [f"GPU check on {gpu}: {total_s:.0f} s in all", "",
             "| step | budget s | took s | status | result |", "|---|---|---|---|---|"]
    for s in all_steps:
        result = s.result.replace("|", "/")
        lines.append(f"| {s.name} | {s.budget_s} | {s.seconds:.0f} | {s.status} | {result} |")
    return "\n".join(lines)


def gpu_name() -> Optional[str]:
    """The GPU's name, or None when torch sees no CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return None
    capability = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return f"{torch.cuda.get_device_name(0)} (compute capability {capability}), torch {torch.__version__}"


def main(argv=None) -> int:
    started = time.monotonic()
    gpu = gpu_name()
    if gpu is None:
        print("error: scripts/gpu_check.sh needs a CUDA GPU, and torch sees none here (torch.cuda.is_available() "
              "is False); run it on a GPU machine", file=sys.stderr)
        return 2
    out_dir = Path(os.environ.get("OUT") or REPO / "output" / "gpu_check").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    budget = float(os.environ.get("GPU_CHECK_BUDGET", TOTAL_BUDGET_S))
    py = os.environ.get("PYTHON") or sys.executable
    all_steps = steps(py, out_dir, int(os.environ.get("MAX_JOBS") or os.cpu_count() or 4))
    run_steps(all_steps, budget - (time.monotonic() - started), out_dir)
    report = table(all_steps, gpu, time.monotonic() - started)
    print(report, flush=True)
    details = [report, ""]
    for s in all_steps:
        details += [f"## {s.name}: {s.status}", "", "```", s.output.strip()[-20000:], "```", ""]
    (out_dir / "gpu_check.md").write_text("\n".join(details))
    print(f"\n(table and every step's output: {out_dir / 'gpu_check.md'})")
    return 0 if all(s.status == "ok" for s in all_steps) else 1


if __name__ == "__main__":
    sys.exit(main())
