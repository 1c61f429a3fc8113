"""Summarise a training run from its log.jsonl (the AP table and the training curve) and the last
evaluation's per-class analysis in OUTPUT_DIR/eval (per-class table, confusion matrix, PR plots).

    python -m dfine report output/dfine_hgnetv2_n_synthetic   # prints the tables, writes curve.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dfine.data.coco_analysis import ANALYSIS_FILE, plot_confusion, plot_pr_curves, read_analysis, summary_text

STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def read_epochs(output_dir) -> list[dict]:
    path = Path(output_dir) / "log.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (is {output_dir} a training output directory?)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    epochs = {}
    for r in records:
        if r.get("type") == "epoch":
            epochs[r["epoch"]] = r  # a resumed run may log an epoch again; the last one counts
    return [epochs[e] for e in sorted(epochs)]


def ap_table(epochs: list[dict]) -> str:
    rows = ["| epoch | train loss | " + " | ".join(STATS) + " |", "|---" * (len(STATS) + 2) + "|"]
    for r in epochs:
        if "eval" in r:
            rows.append(f"| {r['epoch']} | {r['train']['loss']:.3f} | "
                        + " | ".join(f"{r['eval'][k]:.3f}" for k in STATS) + " |")
    return "\n".join(rows)


def plot_curve(epochs: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["epoch"] for r in epochs], [r["train"]["loss"] for r in epochs], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="mean training loss", title="training loss")
    evals = [r for r in epochs if "eval" in r]
    for k in ("AP", "AP50", "AP75"):
        ax_ap.plot([r["epoch"] for r in evals], [r["eval"][k] for r in evals], marker="o", label=k)
    ax_ap.set(xlabel="epoch", ylabel="COCO metric", title="validation", ylim=(0, 1))
    ax_ap.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def show_analysis(eval_dir) -> bool:
    """Print the per-class table and confusion matrix of ``eval_dir/analysis.json``; draw the PNGs that are
    missing (an evaluation run with ``evaluator.plots`` off). False when there is no analysis."""
    eval_dir = Path(eval_dir)
    if not (eval_dir / ANALYSIS_FILE).exists():
        return False
    analysis = read_analysis(eval_dir)
    print(summary_text(analysis))
    if not (eval_dir / "pr_overall.png").exists():
        plot_pr_curves(analysis, eval_dir)
    if not (eval_dir / "confusion.png").exists():
        plot_confusion(analysis, eval_dir / "confusion.png")
    print(f"precision-recall: {eval_dir / 'pr_overall.png'}, per class in {eval_dir / 'pr_per_class'}; "
          f"confusion: {eval_dir / 'confusion.png'}")
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dfine report", description=__doc__.split("\n")[0])
    parser.add_argument("output_dir")
    parser.add_argument("--curve", help="PNG path (default: OUTPUT_DIR/curve.png)")
    args = parser.parse_args(argv)
    has_log = (Path(args.output_dir) / "log.jsonl").exists()
    epochs = read_epochs(args.output_dir) if has_log else []
    if epochs:
        print(ap_table(epochs))
        curve = args.curve or str(Path(args.output_dir) / "curve.png")
        plot_curve(epochs, curve)
        print(f"curve: {curve}")
    shown = show_analysis(Path(args.output_dir) / "eval")
    if not epochs and not shown:
        what = "no finished epochs in log.jsonl" if has_log else "no log.jsonl"
        print(f"error: {args.output_dir}: {what} and no eval/{ANALYSIS_FILE} (is it a training output directory?)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
