"""SLPD training: data and views, clustering, the loop, checkpoints, resume, events, export, CLI.

Most tests use a synthetic cohort of small token grids (4 x 4 tokens of 16 dims, crops 3 and 2, 4 local
views, a small head) because the ViT-4K itself is kept at its real size; the real-slide test runs the
``tiny`` preset on grids extracted from the slides in ../shared/data/slides.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_slpd.errors import SlpdError
from src_training import checkpoint as ckpt
from src_training.config import ConfigError, TrainConfig, ViewConfig, preset
from src_training.data import (
    EpochBatchSampler,
    MultiCropViews,
    ShardSampler,
    TokenGridDataset,
    TokenGridIndex,
    center_crop,
)
from src_training.events import read_events
from napari_slpd.samples.token_cohort import write_synthetic_cohort
from src_training.trainer import Trainer, TrainingDiverged

REPO = Path(__file__).resolve().parents[1]


def fast_config(**overrides) -> TrainConfig:
    """The tiny preset shrunk further for tests (the ViT-4K keeps its real size)."""
    values = {
        "views.global_crop": 3, "views.local_crop": 2, "views.n_local": 4, "views.scale_to_grid": False,
        "head.out_dim": 256, "head.hidden_dim": 64, "head.bottleneck_dim": 32,
        "optim.batch_size_per_gpu": 8, "optim.epochs": 3, "cluster.warm_epoch": 0, "cluster.min_num_region": 4,
        "run.threads": 1,
    }
    values.update(overrides)
    return preset("tiny").override(values)


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    # 26 regions: three slides of 8 (slides 0 and 2 share tissue types) and one of 2 (below min_num_region)
    return write_synthetic_cohort(tmp_path_factory.mktemp("cohort"), regions_per_slide=(8, 8, 8, 2), token_dim=16,
                                  grid=4, n_types=2, types_per_slide=1, seed=1)


@pytest.fixture(scope="module")
def small_index(small_cohort):
    return TokenGridIndex.from_cohort(small_cohort)


# ------------------------------------------------------------------------------------------------ data


def test_views_follow_random_crop_and_flip():
    grid = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 8, 8)
    views = MultiCropViews(6, 3, n_global=2, n_local=8)
    a = views(grid, torch.Generator().manual_seed(5))
    b = views(grid, torch.Generator().manual_seed(5))
    assert [tuple(v.shape) for v in a] == [(2, 6, 6)] * 2 + [(2, 3, 3)] * 8
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # same seed, same crops
    c = views(grid, torch.Generator().manual_seed(6))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # every view is a (possibly mirrored) window of the grid
    for v in a:
        size = v.shape[-1]
        windows = [grid[:, i:i + size, j:j + size] for i in range(9 - size) for j in range(9 - size)]
        assert any(torch.equal(v, w) or torch.equal(v, w.flip(-1)) for w in windows)


def test_center_crop_offsets_are_torchvisions():
    # torchvision CenterCrop: top = int(round((G - c) / 2)), Python rounding (half to even)
    for g, c, top in ((16, 14, 1), (8, 7, 0), (8, 6, 1), (5, 2, 2), (7, 4, 2)):
        grid = torch.arange(g * g, dtype=torch.float32).reshape(1, g, g)
        assert torch.equal(center_crop(grid, c), grid[:, top:top + c, top:top + c]), (g, c)


def test_crop_sizes_scale_for_small_grids_or_explain():
    assert ViewConfig().crop_sizes(16) == (14, 6)
    assert ViewConfig(scale_to_grid=True).crop_sizes(8) == (7, 3)
    with pytest.raises(ConfigError, match="do not fit the cached token grids of 8 x 8"):
        ViewConfig().crop_sizes(8)


def test_global_batches_do_not_depend_on_world_size_and_resume_mid_epoch():
    one = EpochBatchSampler(50, 16, rank=0, world_size=1, seed=3)
    two = [EpochBatchSampler(50, 8, rank=r, world_size=2, seed=3) for r in range(2)]
    for sampler in (one, *two):
        sampler.set_epoch(2)
    assert len(one) == 3 == len(two[0])
    for full, part0, part1 in zip(one, *two):
        assert full == part0 + part1
    resumed = EpochBatchSampler(50, 16, seed=3)
    resumed.set_epoch(2, start_step=1)
    assert list(resumed) == list(one)[1:]
    one.set_epoch(3)
    assert list(one) != list(resumed)  # another epoch, another order and other crops
    shards = [list(ShardSampler(10, 3, r, 3)) for r in range(3)]
    items = [i for shard in shards for batch in shard for i, _ in batch]
    assert items == list(range(10))


def test_index_reads_token_grids_lazily_and_reports_missing(small_cohort, small_index, tmp_path):
    from napari_slpd.features.store import FeatureStore

    index = small_index
    assert index.slide_ids == ["slide0", "slide1", "slide2", "slide3"]
    assert index.counts.tolist() == [8, 8, 8, 2] and len(index) == 26 and (index.token_dim, index.grid) == (16, 4)
    dataset = TokenGridDataset(index, eval_crop=4)
    with FeatureStore.open(small_cohort.features_path("slide1")) as store:
        expected = np.asarray(store.region_tokens[5], dtype=np.float32)
    item = int(index.offsets[1]) + 5
    assert torch.equal(dataset.read_grid(item), torch.from_numpy(expected))
    dataset.close()
    # a registered slide without features is left out and reported
    (tmp_path / "x.svs").touch()
    small_cohort.add_slide(tmp_path / "x.svs")
    try:
        partial = TokenGridIndex.from_cohort(small_cohort)
        assert [m["slide_id"] for m in partial.missing] == ["x"] and "slpd extract" in partial.missing[0]["reason"]
    finally:
        small_cohort.remove_slide("x")


def test_index_without_any_features_says_what_to_do(tmp_path):
    from napari_slpd.cohort import Cohort

    cohort = Cohort(tmp_path / "empty")
    with pytest.raises(SlpdError, match="no slides"):
        TokenGridIndex.from_cohort(cohort)
    (tmp_path / "a.svs").touch()
    cohort.add_slide(tmp_path / "a.svs")
    with pytest.raises(SlpdError, match="no slide of .* has cached token grids"):
        TokenGridIndex.from_cohort(cohort)


# ------------------------------------------------------------------------------------------ clustering


def test_clustering_neighbours_and_exclusion(small_index):
    pytest.importorskip("faiss")
    from napari_slpd.similarity import cross_assignment, prototype_set_similarity
    from src_training.clustering import cluster_slides, find_neighbours

    index = small_index
    rng = np.random.default_rng(0)
    # two well separated directions per "tissue type"; slides 0 and 2 use types {0, 1}, slide 1 types {2, 3}
    centres = np.eye(8, dtype=np.float32)[:4]
    emb = []
    for s, n in enumerate(index.counts):
        types = (0, 1) if s in (0, 2) else (2, 3)
        emb.append(centres[np.array(types)[np.arange(n) % 2]] + 0.05 * rng.normal(size=(n, 8)).astype(np.float32))
    emb = torch.nn.functional.normalize(torch.as_tensor(np.concatenate(emb)), dim=1)
    assignments, centroids, has, excluded = cluster_slides(emb, index, k=2, min_num_region=4)
    assert has.tolist() == [True, True, True, False]
    assert excluded == [{"slide_id": "slide3", "n_regions": 2, "reason": "fewer than 4 regions"}]
    assert (assignments[24:] == -1).all() and (assignments[:24] >= 0).all()
    neighbours, sim, l_star = find_neighbours(centroids, has, r=1)
    assert neighbours[:, 0].tolist() == [2, 0, 0, -1]  # slide 1 is far from both, slide 3 has no prototypes
    s02, _ = prototype_set_similarity(centroids[0].numpy(), centroids[2].numpy())
    assert sim[0, 0].item() == pytest.approx(s02, abs=1e-5) and sim[0, 0].item() == pytest.approx(2.0, abs=0.02)
    assert math.isnan(sim[3, 0].item())
    assert l_star[0, :, 0].tolist() == cross_assignment(centroids[0].numpy(), centroids[2].numpy()).tolist()
    assert (l_star[3] == -1).all()


# ---------------------------------------------------------------------------------------------- the loop


@pytest.fixture(scope="module")
def tiny_run(small_index, tmp_path_factory):
    """One short run: epoch 0 DINO only, prototype losses from epoch 1 (warm_epoch 0), 3 epochs of 3 steps."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = fast_config(**{"run.save_every_steps": 4})
    result = Trainer(cfg, small_index, run_dir, events=run_dir / "events.jsonl", resume="none").fit()
    return cfg, run_dir, result, read_events(run_dir / "events.jsonl")


def test_run_switches_prototype_losses_on_after_the_warm_up(tiny_run):
    cfg, run_dir, result, events = tiny_run
    assert result.status == "done" and result.global_step == 9
    steps = [e for e in events if e["event"] == "step"]
    assert [e["global_step"] for e in steps] == list(range(9))
    for e in steps:
        assert e["prototype_losses"] == (e["epoch"] > 0)
        if e["epoch"] == 0:
            assert e["intra_loss"] == 0 and e["inter_loss"] == 0
        else:
            assert e["intra_loss"] > 0 and e["inter_loss"] > 0
        assert e["loss"] == pytest.approx(e["dino_loss"] + e["intra_loss"] + e["inter_loss"], rel=1e-5)
        assert cfg.optim.momentum_teacher <= e["momentum"] < 1 and e["teacher_temp"] == pytest.approx(0.04)
    lrs = [e["lr"] for e in steps]  # DINO's schedule: linear warm-up from 0 over epoch 0, then cosine down
    peak = cfg.optim.lr * 8 / 256
    assert lrs[0] == 0 and lrs[2] == pytest.approx(peak) and lrs[3] == pytest.approx(peak) and lrs[-1] < lrs[3]
    assert steps[-1]["eta_s"] == pytest.approx(0, abs=1e-6) and steps[-1]["regions_per_s"] > 0
    clusters = [e for e in events if e["event"] == "clusters"]
    assert [c["epoch"] for c in clusters] == [1, 2]
    assert clusters[0]["n_slides_clustered"] == 3 and clusters[0]["excluded"][0]["slide_id"] == "slide3"
    data = next(e for e in events if e["event"] == "data")
    assert data["below_min_regions"] == [{"slide_id": "slide3", "n_regions": 2}]


def test_run_writes_checkpoints_and_exports_a_loadable_teacher(tiny_run, small_index):
    from napari_slpd.models.encoders import build_region_encoder

    cfg, run_dir, result, events = tiny_run
    reasons = [(e["reason"], e["global_step"]) for e in events if e["event"] == "checkpoint"]
    assert reasons == [("epoch", 3), ("step", 4), ("epoch", 6), ("step", 8), ("epoch", 9)]
    state = ckpt.load_checkpoint(run_dir / "checkpoint.pth")  # weights_only=True
    assert state["epoch"] == 3 and state["step_in_epoch"] == 0 and not any(k.startswith("module.") for k in state["student"])
    assert {"student", "teacher", "optimizer", "dino_loss", "epoch"} <= set(state)
    export = next(e for e in events if e["event"] == "export")["path"]
    encoder = build_region_encoder("hipt_vit4k", checkpoint=export, device="cpu", in_dim=16)
    grids = torch.randn(3, 16, 4, 4)
    from napari_slpd.models.vit import vit4k_xs

    # the exported weights are the checkpoint's teacher backbone

    reference = vit4k_xs(input_embed_dim=16).eval()
    reference.load_state_dict({k[len("backbone."):]: v for k, v in state["teacher"].items() if k.startswith("backbone.")})
    with torch.no_grad():
        assert torch.allclose(encoder.encode(grids), reference(grids), atol=1e-5)
    assert json.loads((run_dir / "config.json").read_text())["optim"]["epochs"] == 3


def test_resume_from_a_step_checkpoint_gives_the_same_losses(tiny_run, small_index, tmp_path):
    """Stop (cancel) after step 4, resume, and compare every later step with the uninterrupted run."""
    cfg, _, reference, _ = tiny_run
    run_dir = tmp_path / "run"
    trainer = Trainer(cfg, small_index, run_dir, events=run_dir / "events.jsonl", resume="none")
    # The stop request is seen while a step runs; that step is finished, then the run stops: after step 4.
    first = trainer.fit(cancel=lambda: len(trainer.history) >= 4)
    assert first.status == "stopped" and first.global_step == 5
    events = read_events(run_dir / "events.jsonl")
    assert events[-1]["event"] == "stopped" and events[-1]["reason"] == "cancel requested"
    second = Trainer(cfg, small_index, run_dir, events=run_dir / "events.jsonl", resume="auto").fit()
    assert second.status == "done"
    assert [h["global_step"] for h in second.history] == list(range(5, 9))
    for got, want in zip(second.history, reference.history[5:]):
        for term in ("loss", "dino_loss", "intra_loss", "inter_loss"):
            assert got[term] == pytest.approx(want[term], rel=1e-5, abs=1e-6), (got["global_step"], term)
    start = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "start"][-1]
    assert start["resumed_from"].endswith("checkpoint.pth") and start["start_step"] == 5


def test_resume_refuses_other_settings(tiny_run, small_index):
    cfg, run_dir, _, _ = tiny_run
    other = cfg.override({"optim.lr": 2 * cfg.optim.lr})
    with pytest.raises(SlpdError, match="other training settings .*optim.lr"):
        Trainer(other, small_index, run_dir, resume="auto").fit()


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(small_index, tmp_path, monkeypatch):
    from src_training import losses

    run_dir = tmp_path / "run"
    original = losses.DINOLoss.forward

    def poisoned(self, student_logits, teacher_logits, epoch):
        value = original(self, student_logits, teacher_logits, epoch)
        return value * float("nan") if epoch == 1 else value

    monkeypatch.setattr(losses.DINOLoss, "forward", poisoned)
    cfg = fast_config(**{"cluster.warm_epoch": 5})
    with pytest.raises(TrainingDiverged, match="not finite at epoch 1, step 0.*checkpoint.pth is kept"):
        Trainer(cfg, small_index, run_dir, events=run_dir / "events.jsonl", resume="none").fit()
    state = ckpt.load_checkpoint(run_dir / "checkpoint.pth")
    assert state["epoch"] == 1 and state["step_in_epoch"] == 0  # the end of epoch 0, nothing after
    assert all(torch.isfinite(v).all() for v in state["student"].values())
    error = read_events(run_dir / "events.jsonl")[-1]
    assert error["event"] == "error" and error["kind"] == "non_finite_loss"


def test_cli_reports_bad_input_with_exit_code_2(tmp_path):
    from src_training.__main__ import main

    assert main(["--cohort", str(tmp_path / "nope"), "--preset", "tiny"]) == 2
    events = tmp_path / "ev.jsonl"
    (tmp_path / "c").mkdir()
    assert main(["--cohort", str(tmp_path / "c"), "--events", str(events), "--out", str(tmp_path / "r")]) == 2
    error = read_events(events)[-1]
    assert error["event"] == "error" and error["kind"] == "input" and "no slides" in error["message"]


# ------------------------------------------------------------------------------------- kill and resume


def _train_cmd(cohort, run_dir, *extra):
    return [sys.executable, "-m", "src_training", "--cohort", str(cohort), "--out", str(run_dir),
            "--events", str(run_dir / "events.jsonl"), "--preset", "tiny", "--device", "cpu",
            "--global-crop", "3", "--local-crop", "2", "--n-local", "4", "--no-scale-crops",
            "--out-dim", "256", "--hidden-dim", "64", "--bottleneck-dim", "32", "--batch-size", "8", "--epochs", "3", "--warm-epoch", "0",
            "--min-num-region", "4", "--threads", "1", *extra]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_sigkill_after_a_checkpoint_then_resume_gives_the_same_losses(tiny_run, small_cohort, small_index, tmp_path):
    cfg, _, reference, _ = tiny_run
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    proc = subprocess.Popen(_train_cmd(small_cohort.root, run_dir, "--save-every-steps", "4"),
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    events_file = run_dir / "events.jsonl"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if events_file.exists() and any(
                e["event"] == "checkpoint" and e["reason"] == "step" for e in read_events(events_file)
            ):
                break
            if proc.poll() is not None:
                pytest.fail(f"training ended before the kill: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        else:
            pytest.fail("no step checkpoint within 120 s")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    state = ckpt.load_checkpoint(run_dir / "checkpoint.pth")
    assert state["global_step"] == 4
    # Resume here, in this process, with the same settings (a mismatch would be refused).
    resumed = Trainer(cfg, small_index, run_dir, events=events_file, resume="auto").fit()
    assert resumed.status == "done"
    events = read_events(events_file)
    last_start = max(i for i, e in enumerate(events) if e["event"] == "start")
    assert events[last_start]["start_step"] == 4
    assert [h["global_step"] for h in resumed.history] == list(range(4, 9))
    for got, want in zip(resumed.history, reference.history[4:]):
        for term in ("loss", "dino_loss", "intra_loss", "inter_loss"):
            assert got[term] == pytest.approx(want[term], rel=1e-5, abs=1e-6), (got["global_step"], term)
    assert events[-1]["event"] == "done"


def test_sigterm_stops_cleanly_with_a_checkpoint(small_cohort, tmp_path):
    run_dir = tmp_path / "term"
    run_dir.mkdir()
    proc = subprocess.Popen(_train_cmd(small_cohort.root, run_dir, "--epochs", "50", "--warm-epoch", "100"),
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    events_file = run_dir / "events.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (
        events_file.exists() and any(e["event"] == "step" for e in read_events(events_file))
    ):
        if proc.poll() is not None:
            pytest.fail(proc.stderr.read().decode()[-2000:])
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    events = read_events(events_file)
    kinds = [e["event"] for e in events]
    assert kinds[-3:] == ["checkpoint", "export", "stopped"] and events[-1]["reason"] == "signal SIGTERM"
    state = ckpt.load_checkpoint(run_dir / "checkpoint.pth")
    assert state["global_step"] == events[-3]["global_step"] >= 1
    assert (run_dir / "teacher_vit4k.pth").exists()


# ------------------------------------------------------------------------------------------ real slides


def test_tiny_preset_on_real_slides_trains_and_the_features_engine_loads_the_result(tmp_path):
    """Token grids from three real slides (512-px regions of 8 x 8 64-px patches), then `--preset tiny`."""
    from conftest import real_slide

    pytest.importorskip("faiss")
    engine = pytest.importorskip("napari_slpd.features.engine")
    from napari_slpd.cohort import Cohort
    from napari_slpd.slides.grid import GridConfig
    from napari_slpd.models.encoders import build_patch_encoder, build_region_encoder

    cohort = Cohort(tmp_path / "cohort")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # ViT-256 at 32 px input (random init; same architecture), regions of 512 px = 8 x 8 patches of 64 px
    patch_encoder = build_patch_encoder("hipt_vit256", device="cpu", input_size=32)
    region_encoder = build_region_encoder("mean", device="cpu")
    grid = GridConfig(region_px=512, patch_px=64, target_mpp=0.5, min_tissue=0.25)

    def config(mpp=None):
        return engine.ExtractionConfig(grid=grid, batch_size=128, num_workers=1, torch_threads=1, mpp=mpp)

    try:
        # the breast TIFF's pixel size is bogus and the TCGA slide has none: give them 0.5 um/px
        for name, mpp in (("cmu_svs", None), ("breast_tiff", 0.5), ("tcga_jp2k_svs", 0.5)):
            record = cohort.add_slide(real_slide(name))
            result = engine.extract_slide(record.path, cohort.features_path(record.slide_id), patch_encoder,
                                          region_encoder, config(mpp))
            assert result.status == "extracted", result.message
    finally:
        torch.set_num_threads(threads)
    index = TokenGridIndex.from_cohort(cohort)
    assert index.grid == 8 and len(index) >= 32

    from src_training.__main__ import main

    run_dir = tmp_path / "run"
    argv = ["--cohort", str(cohort.root), "--preset", "tiny", "--epochs", "4", "--out", str(run_dir),
            "--events", str(run_dir / "events.jsonl"), "--device", "auto", "--threads", "1"]
    assert main(argv) == 0  # slpd-train, in this process
    events = read_events(run_dir / "events.jsonl")
    epochs = [e for e in events if e["event"] == "epoch"]
    assert len(epochs) == 4
    dino = [e["dino_loss"] for e in epochs]
    assert dino[-1] < dino[0] and min(dino[1:]) < dino[0] - 0.5, dino  # the loss goes down
    assert [e["intra_loss"] > 0 for e in epochs] == [False, False, True, True]  # on after warm_epoch 1
    assert any(e["event"] == "clusters" and e["epoch"] == 2 for e in events)
    assert any(e["event"] == "checkpoint" for e in events)
    export = next(e for e in events if e["event"] == "export")["path"]

    # the features engine extracts with the fine-tuned ViT-4K like with any other checkpoint
    tuned = build_region_encoder("hipt_vit4k", checkpoint=export, device="cpu", in_dim=index.token_dim)
    assert tuned.checkpoint_sha256 is not None
    out = tmp_path / "tuned.h5"
    record = cohort.slide("cmu_small_region")
    result = engine.extract_slide(record.path, out, patch_encoder, tuned, config())
    assert result.status == "extracted"
    from napari_slpd.features.store import FeatureStore

    with FeatureStore.open(out) as store:
        assert store.region_embeddings.shape == (result.n_regions, 192)
        assert np.isfinite(store.region_embeddings).all()
        assert store.attrs["region_encoder_sha256"] == tuned.checkpoint_sha256
