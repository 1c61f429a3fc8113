"""Train or evaluate D-FINE.

    python train.py -c configs/dfine/dfine_hgnetv2_n_synthetic.yml
    python train.py -c CFG -r output/last.pth                   # resume exactly where it stopped
    python train.py -c CFG -t dfine_n_coco.pth                  # fine-tune released weights (other class count ok)
    python train.py -c configs/dfine/objects365/dfine_hgnetv2_s_obj2coco.yml -t dfine_s_obj365.pth   # Objects365 -> COCO
    python train.py -c CFG -r best.pth --test-only              # COCO AP, per-class table, PR curves, confusion
    torchrun --nproc_per_node=2 train.py -c CFG                 # DistributedDataParallel (gloo on CPU)
    python train.py -c CFG -u epochs=3 train_dataloader.total_batch_size=4
    python train.py -c CFG --batch-size 8                       # 8 images per step; lrs x 8/config's, warm-ups x config's/8
    python train.py -c CFG --accumulate-steps 4                 # the config's batch in 4 smaller ones per step
"""

from __future__ import annotations

import argparse
import json
import sys

import dfine
from dfine.config import ConfigError, config_value
from dfine.data.coco_analysis import summary_text
from dfine.deploy import DeployError
from dfine.engine import Trainer
from dfine.engine import distributed as du
from dfine.engine.trainer import NonFiniteLossError, NonFiniteWeightsError, NothingToTrainError, PartialLoadError
from dfine.model.checkpoint import UntrustedCheckpointError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train or evaluate D-FINE")
    p.add_argument("-c", "--config", required=True, help="config YAML")
    group = p.add_mutually_exclusive_group()
    group.add_argument("-r", "--resume", help="training checkpoint to resume from (or to evaluate with --test-only)")
    group.add_argument("-t", "--tuning", help="weights to fine-tune from: Objects365 (366 classes) <-> COCO (80) class "
                                              "rows are mapped by the published table; class heads of any other "
                                              "class count are re-initialised (listed in the log)")
    p.add_argument("--test-only", action="store_true",
                   help="only evaluate (weights from -r or -t): COCO stats, per-class table, precision-recall and "
                        "confusion plots in OUTPUT_DIR/eval")
    p.add_argument("--confusion-threshold", type=float, metavar="SCORE",
                   help="score a detection needs to enter the confusion matrix (evaluator.confusion_score_threshold, "
                        "default 0.5)")
    p.add_argument("-u", "--update", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. epochs=3 train_dataloader.total_batch_size=4")
    p.add_argument("--output-dir", help="where checkpoints and logs go (default: the config's output_dir)")
    p.add_argument("-d", "--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--seed", type=int, help="random seed (default: the config's seed or 0)")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="images per optimizer step over all processes and accumulation steps, instead of the config's "
                        "train_dataloader.total_batch_size; learning rates and warm-ups are rescaled (--lr-scaling)")
    p.add_argument("--lr-scaling", choices=["linear", "sqrt", "none"], default="linear",
                   help="with --batch-size: lr x new/old batch (linear, default), x sqrt(new/old), or unchanged; "
                        "step-counted warm-ups x old/new unless none (docs/training.md)")
    p.add_argument("--accumulate-steps", type=int, metavar="K",
                   help="batches per optimizer step (gradient accumulation; the config's accumulate_steps): the "
                        "same images per step in K smaller batches, for small GPUs")
    p.add_argument("--use-amp", action="store_true", default=None,
                   help="mixed precision: autocast in the config's amp_dtype (default bfloat16 where the device has "
                        "it natively, else float16 + GradScaler; -u amp_dtype=float16 to choose)")
    p.add_argument("--backend", choices=["auto", "reference", "cpp", "triton"],
                   help="fused-op backend (default: the config's ops_backend)")
    p.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--allow-partial-load", action="store_true",
                   help="with -t: train even when the weights leave part of the backbone or encoder at random "
                        "initialisation (by default that is refused: weights of another model size)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow -r/-t files that need arbitrary pickle to load (they can run code; only for files "
                        "you trust). Without it checkpoints load with torch.load(weights_only=True)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    if args.confusion_threshold is not None:
        if not 0.0 <= args.confusion_threshold <= 1.0:
            print(f"error: --confusion-threshold must be in [0, 1], got {args.confusion_threshold}", file=sys.stderr)
            return 2
        args.update = [*args.update, f"evaluator.confusion_score_threshold={args.confusion_threshold}"]
    overrides = list(args.update)
    if args.accumulate_steps is not None:
        overrides.append(f"accumulate_steps={args.accumulate_steps}")
    try:
        cfg = dfine.load_config(args.config, overrides=overrides)
    except (ConfigError, FileNotFoundError) as err:  # one clean line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        trainer = Trainer(cfg, output_dir=args.output_dir, device=args.device, seed=args.seed, use_amp=args.use_amp,
                          backend=args.backend, deterministic=args.deterministic, progress=not args.no_progress,
                          batch_size=args.batch_size, lr_scaling=args.lr_scaling)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        if args.test_only:
            if args.resume:  # the same loader as predict/export: EMA weights preferred, strict
                backend = args.backend or config_value(cfg, "ops_backend")
                try:
                    module = dfine.load_detector(cfg, args.resume, device=trainer.device, backend=backend,
                                                 deploy=False, optimize=False, trusted=args.trust_checkpoint).model
                except DeployError as err:
                    print(f"error: {err}", file=sys.stderr)
                    return 2
            elif args.tuning:
                try:
                    trainer.tune_from(args.tuning, trusted=args.trust_checkpoint, allow_partial=args.allow_partial_load)
                except (UntrustedCheckpointError, FileNotFoundError, PartialLoadError) as err:
                    print(f"error: {err}", file=sys.stderr)
                    return 2
                module = trainer.model
            else:
                print("--test-only needs weights: pass -r CHECKPOINT", file=sys.stderr)
                return 2
            analysis_dir = trainer.output_dir / "eval"
            try:
                stats = trainer.evaluate(module, analysis_dir=analysis_dir, plots=trainer.eval_plots != "none")
            except NonFiniteWeightsError as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
            if du.is_main():
                print(summary_text(trainer.last_analysis))
                print(f"per-class table, confusion matrix and plots: {analysis_dir}")
                print(json.dumps(stats, indent=1))  # last: scripts read the stats from the first "{"
            return 0
        try:
            if args.resume:
                trainer.resume(args.resume, trusted=args.trust_checkpoint)
            elif args.tuning:
                trainer.tune_from(args.tuning, trusted=args.trust_checkpoint, allow_partial=args.allow_partial_load)
        except (UntrustedCheckpointError, FileNotFoundError, PartialLoadError) as err:  # one clean message
            print(f"error: {err}", file=sys.stderr)
            return 2
        try:
            trainer.fit()
        except (NonFiniteLossError, NonFiniteWeightsError, OSError) as err:  # names the epoch, step and last.pth
            print(f"error: {err}", file=sys.stderr)
            return 1
        except NothingToTrainError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    finally:
        du.cleanup()


if __name__ == "__main__":
    sys.exit(main())
