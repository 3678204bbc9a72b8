"""Benchmark of SLPD training (src_training). Prints ONE JSON line last.

(a) ``cpu_tiny_steps_per_s`` / ``cpu_tiny_regions_per_s``: the ``tiny`` preset on CPU (8 x 8 token grids of
    384 dims, crops 7 and 3, batch 16, head 1024/256/64), through the real Trainer: data loading from
    HDF5 feature files, teacher and student passes, DINO + prototype losses, AdamW, EMA.
(b) ``cuda_steps_per_s`` / ``cuda_regions_per_s``: with CUDA, the official configuration (16 x 16 grids,
    crops 14 and 6, 2 + 8 views, head 65536/2048/256, batch 128 per GPU) in bf16; null without CUDA.

Baseline, measured in the same process: each run starts with a DINO-only epoch (the warm-up) and goes on
with epochs where the intra- and inter-slide prototype losses are active, so ``*_slpd_vs_dino_step_time``
is the cost of SLPD's prototype losses over plain DINO training steps (> 1 means slower). Re-clustering
time per epoch is reported separately (``*_cluster_s``). Step times exclude each epoch's first step
(data-loader start, clustering) and are medians.

Token grids are synthetic (``napari_slpd.samples.token_cohort``: Gaussian "tissue types"), written as real
FeatureStore files under a temporary folder; the numbers do not depend on their content.

Usage: python benchmarks/train.py [--quick] [--device auto|cpu|cuda] [--threads N] [--cuda-regions N] [--cpu-regions N]
(``--device cuda`` fails without a CUDA device instead of printing null; ``cpu`` skips (b).)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def run_phase_timed(cfg, cohort_root: Path, run_dir: Path) -> dict:
    """Train ``cfg`` and return per-phase median step times (DINO-only vs SLPD) and cluster times."""
    from napari_slpd.cohort import Cohort
    from src_training.data import TokenGridIndex
    from src_training.events import EventWriter, read_events
    from src_training.trainer import Trainer

    index = TokenGridIndex.from_cohort(Cohort(cohort_root, create=False))
    stamps: list[float] = []
    events_path = run_dir / "events.jsonl"
    trainer = Trainer(cfg, index, run_dir, events=EventWriter(events_path), resume="none")
    result = trainer.fit(progress=lambda done, total: stamps.append(time.perf_counter()))
    assert result.status == "done"
    spe = trainer.steps_per_epoch
    warm = cfg.cluster.warm_epoch
    dino, slpd = [], []
    for step in range(1, len(stamps)):
        if step % spe == 0:
            continue  # first step of an epoch: loader start and clustering
        (dino if step // spe <= warm else slpd).append(stamps[step] - stamps[step - 1])
    clusters = [e["seconds"] for e in read_events(events_path) if e["event"] == "clusters"]
    dino_s = statistics.median(dino) if dino else None
    slpd_s = statistics.median(slpd) if slpd else None
    return {
        "global_batch": trainer.global_batch,
        "steps_per_epoch": spe,
        "dino_step_s": dino_s,
        "slpd_step_s": slpd_s,
        "steps_per_s": 1.0 / slpd_s if slpd_s else (1.0 / dino_s if dino_s else None),
        "regions_per_s": trainer.global_batch / slpd_s if slpd_s else (trainer.global_batch / dino_s if dino_s else None),
        "slpd_vs_dino_step_time": slpd_s / dino_s if (slpd_s and dino_s) else None,
        "cluster_s": statistics.median(clusters) if clusters else None,
        "final_loss": result.history[-1]["loss"] if result.history else None,
    }


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def bench_cpu_tiny(tmp: Path, n_regions: int, epochs: int, threads: int) -> dict:
    from src_training.config import preset
    from napari_slpd.samples.token_cohort import write_synthetic_cohort

    per_slide = 16
    slides = max(2, n_regions // per_slide)
    write_synthetic_cohort(tmp / "cpu", regions_per_slide=[per_slide] * slides, token_dim=384, grid=8, seed=0)
    overrides = {"optim.epochs": epochs, "cluster.warm_epoch": 0, "run.device": "cpu", "run.threads": threads,
                 "run.num_workers": 0}
    if not faiss_available():
        overrides["cluster.warm_epoch"] = epochs  # no K-means without faiss: DINO steps only
    return run_phase_timed(preset("tiny").override(overrides), tmp / "cpu", tmp / "cpu_run")


def bench_cuda_official(tmp: Path, n_regions: int, epochs: int) -> dict:
    from src_training.config import preset
    from napari_slpd.samples.token_cohort import write_synthetic_cohort

    per_slide = 64
    slides = max(2, n_regions // per_slide)
    write_synthetic_cohort(tmp / "cuda", regions_per_slide=[per_slide] * slides, token_dim=384, grid=16,
                           n_types=8, types_per_slide=4, seed=0)
    overrides = {"optim.epochs": epochs, "cluster.warm_epoch": 0, "cluster.min_num_region": 32,
                 "run.device": "cuda", "run.amp": "bf16", "run.num_workers": 6}
    if not faiss_available():
        overrides["cluster.warm_epoch"] = epochs
    cfg = preset("nsclc").override(overrides)  # official settings: batch 128 per GPU, head 65536
    return run_phase_timed(cfg, tmp / "cuda", tmp / "cuda_run")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer regions and epochs (smoke run)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--cpu-regions", type=int, default=128)
    parser.add_argument("--cuda-regions", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=3, help="epoch 0 is DINO-only, the rest SLPD")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: (b) when CUDA is present; cuda: require it; cpu: (a) only")
    args = parser.parse_args(argv)
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device", file=sys.stderr)
        return 3
    cpu_regions = 64 if args.quick else args.cpu_regions
    epochs = 2 if args.quick else args.epochs
    out: dict = {"faiss": faiss_available(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="slpd-bench-train-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        cpu = bench_cpu_tiny(tmp, cpu_regions, epochs, args.threads)
        print(f"CPU tiny preset: {cpu['steps_per_s']:.2f} steps/s, {cpu['regions_per_s']:.1f} regions/s "
              f"(batch {cpu['global_batch']}, {cpu['steps_per_epoch']} steps/epoch, "
              f"{torch.get_num_threads() if not args.threads else args.threads} threads, {time.perf_counter() - t0:.0f} s)")
        if cpu["slpd_vs_dino_step_time"] is not None:
            print(f"  SLPD step / DINO-only step time: {cpu['slpd_vs_dino_step_time']:.2f}x "
                  f"(dino {cpu['dino_step_s'] * 1e3:.0f} ms, slpd {cpu['slpd_step_s'] * 1e3:.0f} ms); "
                  f"re-clustering {cpu['cluster_s']:.2f} s per epoch")
        out.update({f"cpu_tiny_{k}": v for k, v in cpu.items()})
        cuda = None
        if args.device != "cpu" and torch.cuda.is_available():
            cuda = bench_cuda_official(tmp, 512 if args.quick else args.cuda_regions, epochs)
            print(f"CUDA official (batch 128, bf16, {torch.cuda.get_device_name(0)}): {cuda['steps_per_s']:.2f} "
                  f"steps/s, {cuda['regions_per_s']:.0f} regions/s")
            if cuda["slpd_vs_dino_step_time"] is not None:
                print(f"  SLPD step / DINO-only step time: {cuda['slpd_vs_dino_step_time']:.2f}x; "
                      f"re-clustering {cuda['cluster_s']:.2f} s per epoch")
            out.update({f"cuda_{k}": v for k, v in cuda.items()})
            out["cuda_device"] = torch.cuda.get_device_name(0)
        else:
            print("CUDA: not available (cuda_steps_per_s = null)")
        out["cuda_steps_per_s"] = cuda["steps_per_s"] if cuda else None
        out["cuda_regions_per_s"] = cuda["regions_per_s"] if cuda else None
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
