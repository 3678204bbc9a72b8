"""Fault 4: every kind of cache file damaged on disk (bytes overwritten, cut short, replaced by garbage).

Each is detected with a message naming the file and what happens next; what can be rebuilt from intact
files is rebuilt; prototype names come back from the backup kept before every rewrite, and a damaged file
is set aside (never deleted).
"""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest

from faults.faults_support import embedding_cohort

pytestmark = pytest.mark.faults


def _clobber(path, at: int = 0, n: int = 512) -> None:
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write(os.urandom(n))


@pytest.fixture
def cohort(tmp_path):
    from napari_slpd.similarity.index import CohortIndex

    cohort = embedding_cohort(tmp_path / "cohort", n_slides=6, k=3)
    CohortIndex.open(cohort)
    return cohort


def test_feature_file_header_and_prototypes(cohort):
    from napari_slpd.errors import PrototypeError
    from napari_slpd.prototypes.cache import compute_cohort_prototypes, load_prototypes
    from napari_slpd.session import Session

    a, b = cohort.slide_ids()[:2]
    _clobber(cohort.features_path(a))  # the HDF5 superblock
    cohort.prototypes_path(b).write_bytes(b"\x89HDF\r\n" + os.urandom(300))
    status = Session.open(cohort.root).status(a)
    assert status.features == "damaged" and str(cohort.features_path(a)) in status.detail, status
    with pytest.raises(PrototypeError) as info:
        load_prototypes(cohort, b)
    assert str(cohort.prototypes_path(b)) in str(info.value) and "again" in str(info.value)
    report = {r.slide_id: r for r in compute_cohort_prototypes(cohort, k=3, device="cpu").results}
    assert report[a].status == "failed" and str(cohort.features_path(a)) in report[a].message
    assert "extract" in report[a].message  # what to do
    assert report[b].status == "computed"  # rebuilt from its intact features
    assert load_prototypes(cohort, b).k == 3


@pytest.mark.parametrize("part", ["manifest", "arrays"])
def test_index_is_rebuilt_from_the_prototypes(cohort, part, caplog):
    from napari_slpd.similarity.index import CohortIndex

    manifest = cohort.index_dir / "cohort.json"
    target = manifest if part == "manifest" else next(cohort.index_dir.glob("*.npz"))
    if part == "manifest":
        target.write_text('{"format": "napari-slpd-vector-ind')
    else:
        _clobber(target, at=0, n=64)
    with caplog.at_level(logging.WARNING):
        index = CohortIndex.open(cohort)
    assert sorted(index.slide_ids) == cohort.slide_ids()
    assert str(target) in caplog.text and "rebuilding" in caplog.text
    assert CohortIndex.load(cohort.index_dir).slide_ids  # saved whole again


def test_names_come_back_from_their_backup(cohort):
    from napari_slpd.labeling.names import PrototypeAnnotations

    a = cohort.slide_ids()[0]
    names = PrototypeAnnotations.load(cohort)
    names.rename(a, 0, "tumour")
    names.recolor(a, 0, "#123456")
    names.rename(a, 1, "stroma")  # the backup now holds tumour (+ colour)
    cohort.annotations_path.write_bytes(cohort.annotations_path.read_bytes()[:37])  # cut short
    again = PrototypeAnnotations.load(cohort)
    assert again.notice and str(cohort.annotations_path) in again.notice and "backup" in again.notice
    labels = again.labels(a)
    assert labels[0].name == "tumour" and labels[0].color == "#123456"
    aside = list(cohort.root.glob("annotations.json.damaged-*"))
    assert len(aside) == 1 and len(aside[0].read_bytes()) == 37  # the damaged file is kept
    # garbage in both: start without names, never a traceback, the damaged file still kept
    cohort.annotations_path.write_text("{")
    (cohort.root / "annotations.json.bak").write_text("nonsense")
    empty = PrototypeAnnotations.load(cohort)
    assert "no usable backup" in empty.notice and empty.labels(a) == {}


def test_embedding_map_cache_is_recomputed(cohort, caplog):
    from napari_slpd.similarity.embedding_map import cache_path, load_or_compute_map

    rng = np.random.default_rng(0)
    slides = [("a", "k", rng.normal(size=(5, 8)).astype(np.float32))]
    first, cached = load_or_compute_map(cohort.root, "all", slides)
    path = cache_path(cohort.root, "all")
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        again, cached = load_or_compute_map(cohort.root, "all", slides)
    assert not cached and str(path) in caplog.text and "recomputing" in caplog.text
    np.testing.assert_allclose(again.xy, first.xy, atol=1e-5)


def test_fine_tune_run_state(tmp_path, caplog):
    from napari_slpd.errors import CheckpointError
    from napari_slpd.training.run import TrainingRun
    from src_training.checkpoint import load_checkpoint

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_bytes(b'{"pid": 12\x00\x00')
    (run_dir / "events.jsonl").write_text('{"event": "start", "schema": 1}\n')
    with caplog.at_level(logging.WARNING):
        run = TrainingRun.attach(run_dir)
    assert run is not None and "run.json" in caplog.text and "events file" in caplog.text
    assert list(run_dir.glob("run.json.damaged-*"))
    (run_dir / "checkpoint.pth").write_bytes(b"PK\x03\x04" + os.urandom(200))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(run_dir / "checkpoint.pth")
    assert str(run_dir / "checkpoint.pth") in str(info.value) and "--resume none" in str(info.value)


def test_cohort_file_is_recovered_from_backup_and_feature_files(cohort):
    from napari_slpd.cohort import Cohort

    ids = cohort.slide_ids()
    cohort.add_slide(cohort.root / "slides" / "extra.svs")
    cohort.save_settings({"note": "x"})  # the backup (the file before this write) holds "extra"
    cohort.registry_path.write_text('{"slides": {"slide_000')
    again = Cohort(cohort.root)
    assert again.slide_ids() == sorted(ids + ["extra"])
    assert again.notice and str(again.registry_path) in again.notice and "recovered" in again.notice
    assert list(cohort.root.glob("cohort.json.damaged-*"))
    # no backup either: every slide is still registered, each by its own record (registry/<id>.json)
    for p in list(cohort.root.glob("cohort.json*")):
        p.unlink()
    (cohort.root / "cohort.json").write_text("garbage")
    third = Cohort(cohort.root)
    assert third.slide_ids() == sorted(ids + ["extra"]) and "damaged" in third.notice
    assert third.slide("extra").path == cohort.root / "slides" / "extra.svs"
    # a cohort of a version before per-slide records (slides only in cohort.json), no backup: the slides
    # come back from the feature files (each records its slide's path)
    shutil.rmtree(cohort.root / "registry")
    for p in list(cohort.root.glob("cohort.json*")):
        p.unlink()
    (cohort.root / "cohort.json").write_text("garbage")
    fourth = Cohort(cohort.root)
    assert fourth.slide_ids() == ids and "feature file" in fourth.notice
    assert "without a recorded slide path" in fourth.notice  # synthetic feature files record none
