"""``slpd-train`` / ``python -m src_training``: SLPD fine-tuning of the ViT-4K on a cohort's token grids.

Examples::

    slpd-train --cohort COHORT --preset tiny --epochs 4 --out RUN_DIR --events RUN_DIR/events.jsonl
    torchrun --nproc_per_node 4 -m src_training --cohort COHORT --preset nsclc --out RUN_DIR
    slpd-train --out RUN_DIR --export-only         # teacher of the latest checkpoint -> RUN_DIR/teacher_vit4k.pth

SIGINT (Ctrl+C) or SIGTERM stop the run after the current step, with a checkpoint and an exported
teacher; a second Ctrl+C aborts at once. Exit codes: 0 finished or stopped cleanly, 2 bad input,
3 the loss became non-finite (the last good checkpoint is kept).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from napari_slpd.errors import SlpdError

log = logging.getLogger("src_training")

# CLI flag -> dotted setting name (the value type comes from the flag's definition below)
OVERRIDES = {
    "epochs": "optim.epochs",
    "batch_size": "optim.batch_size_per_gpu",
    "lr": "optim.lr",
    "min_lr": "optim.min_lr",
    "warmup_epochs": "optim.warmup_epochs",
    "weight_decay": "optim.weight_decay",
    "weight_decay_end": "optim.weight_decay_end",
    "clip_grad": "optim.clip_grad",
    "freeze_last_layer": "optim.freeze_last_layer",
    "momentum_teacher": "optim.momentum_teacher",
    "warm_epoch": "cluster.warm_epoch",
    "num_clusters": "cluster.num_clusters",
    "min_num_region": "cluster.min_num_region",
    "neighbours": "cluster.neighbours",
    "out_dim": "head.out_dim",
    "hidden_dim": "head.hidden_dim",
    "bottleneck_dim": "head.bottleneck_dim",
    "drop_path": "model.drop_path_rate",
    "phi_dropout": "model.phi_dropout",
    "init_checkpoint": "model.init_checkpoint",
    "global_crop": "views.global_crop",
    "local_crop": "views.local_crop",
    "n_local": "views.n_local",
    "scale_crops": "views.scale_to_grid",
    "official_view_skip": "loss.official_view_skip",
    "shared_prototype_center": "loss.shared_prototype_center",
    "cluster_fp32": "cluster.fp32",
    "seed": "run.seed",
    "num_workers": "run.num_workers",
    "threads": "run.threads",
    "amp": "run.amp",
    "device": "run.device",
    "save_every_steps": "run.save_every_steps",
    "keep_every_epochs": "run.keep_every_epochs",
    "log_every_steps": "run.log_every_steps",
    "labels": "monitor.labels",
    "task": "monitor.task",
    "monitor_k": "monitor.k",
    "monitor_folds": "monitor.folds",
}


def build_parser() -> argparse.ArgumentParser:
    from src_training.config import PRESETS

    p = argparse.ArgumentParser(
        prog="slpd-train",
        description="Fine-tune the HIPT ViT-4K region encoder on a cohort's cached token grids with SLPD "
        "(DINO + intra-/inter-slide prototype distillation). Defaults are the official settings.",
        epilog="Run several processes with: torchrun --nproc_per_node N -m src_training ...",
    )
    io = p.add_argument_group("input and output")
    io.add_argument("--cohort", help="cohort folder whose features/ hold the token grids (`slpd extract`)")
    io.add_argument("--slides", nargs="+", metavar="ID", help="train on these slide ids only (default: all)")
    io.add_argument("--out", help="run folder for checkpoints and the exported teacher (default: COHORT/training/slpd-PRESET)")
    io.add_argument("--events", help="write JSON-lines progress events to this file, or '-' for stdout")
    io.add_argument("--resume", default="auto", help="'auto' (resume the run folder's checkpoint if any), 'none', or a checkpoint path")
    io.add_argument("--export-only", action="store_true", help="only export the teacher of the run folder's checkpoint")
    io.add_argument("-v", "--verbose", action="store_true")

    m = p.add_argument_group("KNN monitor (after every epoch: KNN AUC of the teacher's slide embeddings)")
    m.add_argument("--labels", help="labels CSV/TSV (slide_id, a class column, optional case_id) to monitor with")
    m.add_argument("--task", help="the class column of --labels (default: the first one)")
    m.add_argument("--monitor-k", type=int, help="neighbours of the KNN monitor (default 5)")
    m.add_argument("--monitor-folds", type=int, help="frozen folds of the KNN monitor (default 10; fewer if a "
                   "class has fewer cases)")

    s = p.add_argument_group("settings (defaults: the preset's)")
    s.add_argument("--preset", choices=PRESETS, default="nsclc", help="official nsclc (K=4) or brca (K=2) settings, or tiny")
    s.add_argument("--epochs", type=int)
    s.add_argument("--batch-size", type=int, help="regions per process and step (official: 128)")
    s.add_argument("--lr", type=float, help="peak lr for a global batch of 256 (scaled linearly)")
    s.add_argument("--min-lr", type=float)
    s.add_argument("--warmup-epochs", type=int, help="epochs of linear lr warm-up")
    s.add_argument("--weight-decay", type=float)
    s.add_argument("--weight-decay-end", type=float)
    s.add_argument("--clip-grad", type=float, help="per-parameter gradient norm clip (0: off)")
    s.add_argument("--freeze-last-layer", type=int, help="epochs with the head's last layer frozen")
    s.add_argument("--momentum-teacher", type=float)
    s.add_argument("--warm-epoch", type=int, help="prototype losses are active when epoch > this")
    s.add_argument("--num-clusters", "-k", type=int, help="prototypes per slide (K)")
    s.add_argument("--min-num-region", type=int, help="slides with fewer regions get no prototypes")
    s.add_argument("--neighbours", type=int, help="similar slides per slide for the inter-slide loss (r)")
    s.add_argument("--out-dim", type=int, help="DINO head output dimension")
    s.add_argument("--hidden-dim", type=int, help="DINO head hidden width")
    s.add_argument("--bottleneck-dim", type=int, help="DINO head bottleneck (the clustered embedding)")
    s.add_argument("--drop-path", type=float, help="stochastic depth rate of the student")
    s.add_argument("--phi-dropout", type=float)
    s.add_argument("--init-checkpoint", help="start the ViT-4K from this checkpoint (official DINO layout)")
    s.add_argument("--global-crop", type=int)
    s.add_argument("--local-crop", type=int)
    s.add_argument("--n-local", type=int, help="number of local views")
    s.add_argument("--scale-crops", action=argparse.BooleanOptionalAction, default=None,
                   help="scale the crop sizes by G/16 for token grids other than 16 x 16 (tiny preset: on)")
    s.add_argument("--official-view-skip", action=argparse.BooleanOptionalAction, default=None,
                   help="prototype losses skip the student's first global view like the official code (default: on)")
    s.add_argument("--shared-prototype-center", action=argparse.BooleanOptionalAction, default=None,
                   help="intra and inter losses share one center, as the official code (default: on)")
    s.add_argument("--cluster-fp32", action=argparse.BooleanOptionalAction, default=None,
                   help="run the clustering pass (teacher embeddings + K-means) in fp32 under mixed precision "
                   "(default: on)")
    s.add_argument("--seed", type=int)
    s.add_argument("--num-workers", type=int, help="data-loader worker processes per training process")
    s.add_argument("--threads", type=int, help="torch CPU threads per training process (0: torch's default)")
    s.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), help="mixed precision (auto: bf16 on CUDA)")
    s.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    s.add_argument("--save-every-steps", type=int, help="also checkpoint every this many steps")
    s.add_argument("--keep-every-epochs", type=int, help="keep a numbered checkpoint every this many epochs")
    s.add_argument("--log-every-steps", type=int, help="write a step event every this many steps")
    return p


def config_from_args(args):
    from src_training.config import preset

    cfg = preset(args.preset)
    overrides = {dotted: getattr(args, flag) for flag, dotted in OVERRIDES.items() if getattr(args, flag) is not None}
    cfg = cfg.override(overrides)
    cfg.validate()
    return cfg


def _install_signal_handlers(trainer) -> dict:
    """SIGINT/SIGTERM ask the trainer to stop; returns the previous handlers (to restore them)."""
    received = []

    def handler(signum, _frame):
        name = signal.Signals(signum).name
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl+C: abort now
        received.append(name)
        log.warning("%s received: stopping after the current step (checkpoint and export follow)", name)
        trainer.request_stop(f"signal {name}")

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    return previous


def run(args) -> int:
    from napari_slpd.cohort import Cohort
    from src_training import distributed
    from src_training.data import TokenGridIndex
    from src_training.events import EventWriter
    from src_training.trainer import Trainer, TrainingDiverged

    cfg = config_from_args(args)
    if args.export_only:
        if not args.out:
            raise SlpdError("--export-only needs --out RUN_DIR (the run folder holding checkpoint.pth)")
        return export_only(Path(args.out))
    if not args.cohort:
        raise SlpdError("--cohort is required: the cohort folder whose token grids to train on")
    cohort = Cohort(args.cohort, create=False)
    run_dir = Path(args.out) if args.out else cohort.training_dir / f"slpd-{cfg.preset}"
    ctx = distributed.init_distributed(cfg.run.device)
    events = EventWriter(args.events, enabled=ctx.is_main)
    try:
        try:
            index = TokenGridIndex.from_cohort(cohort, args.slides)
            trainer = Trainer(cfg, index, run_dir, events=events, resume=args.resume, ctx=ctx)
        except SlpdError as exc:
            events.emit("error", kind="input", message=str(exc), checkpoint=None)
            raise
        previous = _install_signal_handlers(trainer)
        try:
            result = trainer.fit()
        except TrainingDiverged:
            raise  # its error event is already written
        except SlpdError as exc:
            events.emit("error", kind="input", message=str(exc), checkpoint=None)
            raise
        except Exception as exc:
            events.emit("error", kind="internal", message=f"{type(exc).__name__}: {exc}", checkpoint=None)
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if ctx.is_main:
            print(f"slpd-train: {result.status} at epoch {result.epoch} (step {result.global_step}); "
                  f"checkpoint {result.checkpoint}; teacher exported to {result.export}", file=sys.stderr)
        return 0
    finally:
        events.close()
        distributed.shutdown()


def export_only(run_dir: Path) -> int:
    from src_training import checkpoint as ckpt

    state = ckpt.load_checkpoint(ckpt.checkpoint_path(run_dir))
    path = ckpt.export_teacher(
        state["teacher"], ckpt.export_path(run_dir),
        extra={"epoch": state["epoch"], "global_step": state["global_step"], "arch": state["config"]["model"]["arch"],
               "config": state["config"], "trained_with": "napari-slpd src_training (SLPD)"},
    )
    print(f"slpd-train: teacher of {ckpt.checkpoint_path(run_dir)} exported to {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import os

    rank = os.environ.get("RANK")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=("[rank %s] " % rank if rank else "") + "%(levelname)s %(name)s: %(message)s",
    )
    from src_training.trainer import TrainingDiverged

    try:
        return run(args)
    except TrainingDiverged as exc:
        print(f"slpd-train: error: {exc}", file=sys.stderr)
        return 3
    except SlpdError as exc:
        print(f"slpd-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slpd-train: aborted; the last checkpoint written is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
