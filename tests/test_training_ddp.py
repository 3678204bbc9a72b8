"""Two gloo processes (torchrun) train exactly like one process with the same global batch.

Stochastic depth and dropout are switched off: they draw per process and would make the runs equal only
in distribution. Everything else (batch order, crops, centers, clustering, prototype losses) is shared.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src_training import checkpoint as ckpt
from src_training.__main__ import main
from src_training.events import read_events
from napari_slpd.samples.token_cohort import write_synthetic_cohort

REPO = Path(__file__).resolve().parents[1]


def _args(cohort, run_dir, batch):
    return ["--cohort", str(cohort), "--out", str(run_dir), "--events", str(run_dir / "events.jsonl"),
            "--preset", "tiny", "--device", "cpu", "--global-crop", "3", "--local-crop", "2", "--n-local", "4",
            "--no-scale-crops", "--out-dim", "256", "--hidden-dim", "64", "--bottleneck-dim", "32",
            "--epochs", "2", "--warm-epoch", "0", "--min-num-region", "4", "--drop-path", "0", "--threads", "1",
            "--batch-size", str(batch), "--resume", "none"]


def test_two_gloo_processes_equal_one_process(tmp_path, capsys):
    pytest.importorskip("faiss")
    cohort = write_synthetic_cohort(tmp_path / "cohort", regions_per_slide=(8, 8, 8, 2), token_dim=16, grid=4,
                                    n_types=2, types_per_slide=1, seed=1)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")

    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    ddp = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "src_training", *_args(cohort.root, ddp_dir, 4), "--keep-every-epochs", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        # the single-process reference runs here meanwhile, through the same command line
        assert main(_args(cohort.root, single_dir, 8)) == 0
        _, ddp_err = ddp.communicate(timeout=240)
    finally:
        if ddp.poll() is None:
            ddp.kill()
    assert ddp.returncode == 0, ddp_err[-3000:]

    one, two = read_events(single_dir / "events.jsonl"), read_events(ddp_dir / "events.jsonl")
    start = next(e for e in two if e["event"] == "start")
    assert start["world_size"] == 2 and start["global_batch"] == 8
    steps_one = [e for e in one if e["event"] == "step"]
    steps_two = [e for e in two if e["event"] == "step"]
    assert [e["global_step"] for e in steps_two] == [e["global_step"] for e in steps_one] == list(range(6))
    assert all(e["intra_loss"] > 0 for e in steps_two if e["epoch"] == 1)
    for a, b in zip(steps_one, steps_two):
        for term in ("loss", "dino_loss", "intra_loss", "inter_loss"):
            assert b[term] == pytest.approx(a[term], rel=1e-4, abs=1e-5), (a["global_step"], term)
    clusters_one = next(e for e in one if e["event"] == "clusters")
    clusters_two = next(e for e in two if e["event"] == "clusters")
    assert clusters_two["n_slides_clustered"] == clusters_one["n_slides_clustered"] == 3
    assert clusters_two["mean_neighbour_similarity"] == pytest.approx(clusters_one["mean_neighbour_similarity"], abs=1e-4)

    # only rank 0 wrote events and checkpoints; the teachers agree
    assert sum(e["event"] == "start" for e in two) == 1
    t1 = ckpt.load_checkpoint(single_dir / "checkpoint.pth")["teacher"]
    t2 = ckpt.load_checkpoint(ddp_dir / "checkpoint.pth")["teacher"]
    for key in t1:
        assert torch.allclose(t1[key], t2[key], rtol=1e-3, atol=1e-5), key

    # Resumed on one process from the 2-process checkpoint of epoch 1, the global batch kept (4 x 2 -> 8 x 1):
    # the last epoch's losses equal the uninterrupted run's.
    resumed_dir = tmp_path / "resumed"
    args = _args(cohort.root, resumed_dir, 8)
    args[args.index("--resume") + 1] = str(ddp_dir / "checkpoint_epoch0001.pth")
    assert main(args) == 0
    steps_resumed = [e for e in read_events(resumed_dir / "events.jsonl") if e["event"] == "step"]
    assert [e["global_step"] for e in steps_resumed] == [3, 4, 5]
    for a, b in zip(steps_one[3:], steps_resumed):
        for term in ("loss", "dino_loss", "intra_loss", "inter_loss"):
            assert b[term] == pytest.approx(a[term], rel=1e-4, abs=1e-5), (a["global_step"], term)
    # another global batch is refused, saying which per-process batch keeps it
    args = _args(cohort.root, tmp_path / "refused", 4)
    args[args.index("--resume") + 1] = str(ddp_dir / "checkpoint_epoch0001.pth")
    capsys.readouterr()
    assert main(args) == 2
    assert "keep the global batch: resume with --batch-size 8 on 1 process" in capsys.readouterr().err
