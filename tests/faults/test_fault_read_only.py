"""Fault 3: a cohort on a read-only share (a tmpfs remounted read-only: even root cannot write to it).

Browsing, prototypes, similar slides and evaluation work; what must be written goes to the cache folder
(--cache DIR / SLPD_CACHE_DIR) and is read back from there; without a writable cache folder the message
says where it tried to write and how to choose one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from faults.faults_support import embedding_cohort, leftovers
from napari_slpd.errors import StorageError

pytestmark = pytest.mark.faults


@pytest.fixture
def read_only_cohort(small_disk, tmp_path, monkeypatch):
    from napari_slpd.labeling.names import PrototypeAnnotations
    from napari_slpd.similarity.index import CohortIndex

    disk = small_disk(16 << 20)
    cohort = embedding_cohort(disk.path / "cohort", n_slides=16, k=4, n_classes=2)
    CohortIndex.open(cohort)
    PrototypeAnnotations.load(cohort).rename(cohort.slide_ids()[0], 0, "tumour")
    before = {str(p.relative_to(disk.path)): p.read_bytes() for p in disk.path.rglob("*") if p.is_file()}
    disk.read_only()
    cache = tmp_path / "cache"
    monkeypatch.setenv("SLPD_CACHE_DIR", str(cache))
    return disk, cohort.root, cache, before


def test_browsing_prototypes_similar_and_names_on_a_read_only_cohort(read_only_cohort):
    from napari_slpd.labeling.names import PrototypeAnnotations
    from napari_slpd.session import PrototypeSettings, Session, SessionSettings
    from napari_slpd.similarity.index import CohortIndex

    disk, root, cache, before = read_only_cohort
    session = Session.open(root)
    assert session.cohort.read_only and str(cache) in session.cohort.read_only_note()
    ids = session.slide_ids()
    assert {s.features for s in session.statuses()} <= {"done", "other-settings"}  # synthetic features
    first = ids[0]
    assert session.prototypes(first, compute=False).k == 4  # read where it is
    # (the synthetic features were not made with the session's encoders: the cohort index answers directly)
    matches = CohortIndex.open(session.cohort).query(first, n=3)
    assert len(matches) == 3 and all(np.isfinite(m.distance) for m in matches)
    names = PrototypeAnnotations.load(session)
    assert names.labels(first)[0].name == "tumour"

    names.rename(first, 1, "stroma")
    assert PrototypeAnnotations.load(Session.open(root)).labels(first)[1].name == "stroma"
    # Writing: other prototypes (K = 3), a new name: they go to the cache folder, the share is untouched.
    session.settings = SessionSettings(prototypes=PrototypeSettings(k=3))
    assert session.prototypes(first).k == 3
    from napari_slpd.prototypes.cache import compute_cohort_prototypes

    compute_cohort_prototypes(session.cohort, k=3, device="cpu")
    index = CohortIndex.open(session.cohort)  # rebuilt from the new prototypes, saved in the cache folder
    assert index.save_error is None and len(index.query(first, n=2)) == 2
    written = sorted(str(p.relative_to(session.cohort.cache_root)) for p in session.cohort.cache_root.rglob("*")
                     if p.is_file())
    assert "annotations.json" in written and f"prototypes/{first}.h5" in written, written
    assert any(w.startswith("index/") for w in written), written
    after = {str(p.relative_to(disk.path)): p.read_bytes() for p in disk.path.rglob("*") if p.is_file()}
    assert after == before
    assert leftovers(cache) == []


def test_without_a_writable_cache_the_message_says_where_and_how(read_only_cohort, monkeypatch):
    from napari_slpd.cohort import Cohort
    from napari_slpd.labeling.names import PrototypeAnnotations

    disk, root, cache, _ = read_only_cohort
    monkeypatch.setenv("SLPD_CACHE_DIR", str(disk.path / "cache-on-the-share"))  # read-only too
    cohort = Cohort(root)
    names = PrototypeAnnotations.load(cohort)
    with pytest.raises(StorageError) as info:
        names.rename(cohort.slide_ids()[0], 2, "necrosis")
    text = str(info.value)
    assert info.value.kind == "read-only" and "cache-on-the-share" in text and "--cache" in text, text


def test_cli_prototypes_similar_and_evaluate_with_cache_option(read_only_cohort, tmp_path, capsys, monkeypatch):
    from napari_slpd.cli import main

    disk, root, _, before = read_only_cohort
    monkeypatch.delenv("SLPD_CACHE_DIR")
    cache = tmp_path / "cli-cache"
    assert main(["--cache", str(cache), "prototypes", str(root), "-k", "2"]) == 0
    assert main(["--cache", str(cache), "similar", str(root), "slide_00001", "-n", "2", "--json"]) == 0
    out = capsys.readouterr().out
    assert "slide_" in out
    assert any(cache.rglob("prototypes/slide_00001.h5"))
    report = tmp_path / "report"
    code = main(["--cache", str(cache), "evaluate", str(root), "--labels", str(root / "labels.csv"),
                 "--protocol", "knn", "--folds", "2", "--bootstrap", "20", "--no-plots", "--quiet",
                 "--out", str(report)])
    assert code == 0
    assert json.loads((report / "results.json").read_text())
    after = {str(p.relative_to(disk.path)): p.read_bytes() for p in disk.path.rglob("*") if p.is_file()}
    assert after == before


def test_kept_prototype_versions_and_training_runs_go_to_the_cache_folder(read_only_cohort):
    from napari_slpd.cohort import Cohort
    from napari_slpd.session.versions import restore_prototypes, stash_path, stash_prototypes
    from napari_slpd.training.run import find_runs
    from napari_slpd.training.settings import default_run_dir

    disk, root, cache, before = read_only_cohort
    cohort = Cohort(root)
    first = cohort.slide_ids()[0]
    # The synthetic prototypes match their features: each is kept under its version, in the cache folder.
    assert stash_prototypes(cohort) == len(cohort.slide_ids())
    kept = [p for p in cohort.cache_root.rglob("prototypes/versions/*/*.h5")]
    assert len(kept) == len(cohort.slide_ids())
    assert all(cohort.cache_root in p.parents for p in kept)
    key = kept[0].parent.name
    assert stash_path(cohort, key, kept[0].stem) == kept[0]
    assert restore_prototypes(cohort) == []  # the current files are the kept ones
    run_dir = default_run_dir(root, "tiny")
    assert cohort.cache_root in run_dir.parents, run_dir
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text("{}")
    assert run_dir in find_runs(root)
    assert first
    after = {str(p.relative_to(disk.path)): p.read_bytes() for p in disk.path.rglob("*") if p.is_file()}
    assert after == before
