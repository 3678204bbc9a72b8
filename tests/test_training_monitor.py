"""KNN monitor of a fine-tune (issue 11, items 6-7): frozen folds, one ``monitor`` event before training and
after every epoch, figures equal to the evaluation engine's KNN on the exported teacher's embeddings; the
official defaults (one shared prototype-loss center, fp32 clustering) and the preset a cohort should use."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from src_training import TokenGridIndex, Trainer, preset
from src_training.events import read_events
from napari_slpd.samples.token_cohort import write_synthetic_cohort


def fast_config(**overrides):
    values = {
        "views.global_crop": 3, "views.local_crop": 2, "views.n_local": 2, "views.scale_to_grid": False,
        "head.out_dim": 128, "head.hidden_dim": 32, "head.bottleneck_dim": 16,
        "optim.batch_size_per_gpu": 16, "optim.epochs": 2, "cluster.warm_epoch": 0, "cluster.min_num_region": 4,
        "run.threads": 1,
    }
    values.update(overrides)
    return preset("tiny").override(values)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitor")
    # Slide s holds tissue type s mod 2 only: the class is the type (8 slides, 4 per class in 2 cases of 2 slides).
    cohort = write_synthetic_cohort(root / "cohort", regions_per_slide=(5,) * 8, token_dim=8, grid=4, n_types=2,
                                    types_per_slide=1, seed=3)
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "case_id", "kind"])
        for s in range(8):
            w.writerow([f"slide{s}", f"case{s % 2}_{s // 4}", ["a", "b"][s % 2]])
        w.writerow(["not_in_run", "x", "a"])
    return cohort, labels


def test_monitor_events_before_and_after_each_epoch(labelled, tmp_path):
    from napari_slpd.models.encoders import build_region_encoder
    from src_training.monitor import knn_scores, prepare_monitor

    cohort, labels = labelled
    index = TokenGridIndex.from_cohort(cohort)
    cfg = fast_config(**{"monitor.labels": str(labels), "monitor.task": "kind"})
    run_dir = tmp_path / "run"
    result = Trainer(cfg, index, run_dir, events=run_dir / "events.jsonl", resume="none").fit()
    events = read_events(run_dir / "events.jsonl")
    monitor = [e for e in events if e["event"] == "monitor"]
    assert [m["epoch"] for m in monitor] == [-1, 0, 1]
    m = monitor[-1]
    assert m["task"] == "kind" and m["classes"] == ["a", "b"] and m["n_slides"] == 8 and m["n_unknown"] == 1
    assert m["n_folds"] == 2 and m["k"] == 5 and 0 <= m["knn_auc"] <= 1 and 0 <= m["balanced_accuracy"] <= 1
    # Each loss term is its targets' entropy plus a KL divergence: never below that entropy.
    steps = [e for e in events if e["event"] == "step"]
    for e in steps:
        assert e["dino_loss"] >= e["dino_target_entropy"] - 1e-4 > 0
        if e["prototype_losses"]:
            assert e["intra_loss"] >= e["intra_target_entropy"] - 1e-4 and e["inter_loss"] >= e["inter_target_entropy"] - 1e-4
        else:
            assert e["intra_target_entropy"] == 0
    # Frozen folds, written once; no case in two folds.
    folds = json.loads((run_dir / "monitor_folds.json").read_text())["fold_of_slide"]
    assert len(folds) == 8
    # The last figure is the evaluation engine's KNN on the exported teacher's mean region embeddings.
    encoder = build_region_encoder("hipt_vit4k", checkpoint=result.export, device="cpu", in_dim=8)
    X = np.stack([encoder.encode(_tokens(cohort, sid)).numpy().mean(0) for sid in index.slide_ids])
    setup = prepare_monitor(labels, "kind", list(index.slide_ids), k=5, folds=10, seed=0)
    direct = knn_scores(setup, X[setup.slide_rows])
    assert direct["knn_auc"] == pytest.approx(m["knn_auc"], abs=1e-6)
    assert direct["balanced_accuracy"] == pytest.approx(m["balanced_accuracy"], abs=1e-6)

    # The runner's progress keeps the monitor and knows where the warm-up ends.
    from src_training.event_reader import RunProgress

    progress = RunProgress()
    lines = [progress.update(e) for e in events]
    assert [r["epoch"] for r in progress.monitor] == [-1, 0, 1]
    assert len(progress.entropy_curves["dino_target_entropy"][0]) == len(steps)
    assert len(progress.entropy_curves["intra_target_entropy"][0]) == sum(e["prototype_losses"] for e in steps)
    start = next(e for e in events if e["event"] == "start")
    assert progress.warmup_end_step == start["steps_per_epoch"]  # warm_epoch 0: prototype losses from epoch 1
    assert any(line and "before training: KNN AUC" in line for line in lines)


def _tokens(cohort, sid):
    from napari_slpd.features.store import FeatureStore

    with FeatureStore.open(cohort.features_path(sid)) as store:
        return store.tokens()


def test_bad_monitor_labels_are_input_errors(labelled, tmp_path):
    from src_training.monitor import MonitorError, prepare_monitor

    cohort, labels = labelled
    ids = [f"slide{s}" for s in range(8)]
    with pytest.raises(MonitorError, match="no column 'nope'"):
        prepare_monitor(labels, "nope", ids)
    with pytest.raises(MonitorError, match="two classes"):
        prepare_monitor(labels, "kind", ["slide0", "slide2"])
    one_case = tmp_path / "one.csv"
    one_case.write_text("slide_id,kind\nslide0,a\nslide1,b\nslide2,a\n")
    with pytest.raises(MonitorError, match="at least 2"):
        prepare_monitor(one_case, "kind", ids)


def test_official_defaults_and_preset_choice():
    from src_training.config import PRESET_LABELS, default_preset, official_preset_fits

    cfg = preset("nsclc")
    assert cfg.loss.shared_prototype_center is True  # main_SLPD.py: one prototype-loss object
    assert cfg.cluster.fp32 is True
    assert official_preset_fits(16) and official_preset_fits(14) and not official_preset_fits(4)
    assert default_preset(16) == "nsclc" and default_preset(4) == "tiny" and default_preset(None) == "tiny"
    assert "quick check" in PRESET_LABELS["tiny"] and "official" in PRESET_LABELS["nsclc"]


def test_shared_center_is_one_object_and_switchable(labelled, tmp_path):
    cohort, _ = labelled
    index = TokenGridIndex.from_cohort(cohort)
    shared = Trainer(fast_config(), index, tmp_path / "a", resume="none")
    shared._setup()
    assert shared.intra_loss is shared.inter_loss
    own = Trainer(fast_config(**{"loss.shared_prototype_center": False}), index, tmp_path / "b", resume="none")
    own._setup()
    assert own.intra_loss is not own.inter_loss
    for t in (shared, own):
        t.train_set.close()
        t.eval_set.close()
