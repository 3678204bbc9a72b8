"""Similar-slide queries at cohort scale: O(1) file checks while nothing changed (Session._cohort_stamp),
and every change still seen: a prototypes file rewritten or removed, a feature file added or updated in
place, the settings, the cohort file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import napari_slpd.session.status as session_module  # noqa: E402 (the cohort stamp lives there)
from napari_slpd.session import Session  # noqa: E402

N = 12
OLD_NS = 1_600_000_000 * 10**9  # 2020: far from "now", so the stamp is trusted


def _age(root: Path, step: int = 0) -> None:
    """Put the cache folders' times in the past (each call a distinct time), as on a cohort not written to
    for a while; their contents are unchanged."""
    for name in ("features", "prototypes"):
        folder = root / name
        if folder.exists():
            t = OLD_NS + step * 10**9
            os.utime(folder, ns=(t, t))


@pytest.fixture(scope="module")
def cohort_root(tmp_path_factory) -> Path:
    from scale import write_scale_cohort

    root = tmp_path_factory.mktemp("stamp") / "cohort"
    write_scale_cohort(root, N, 0)
    return root


@pytest.fixture
def session(cohort_root, tmp_path) -> Session:
    import shutil

    root = tmp_path / "cohort"
    shutil.copytree(cohort_root, root)
    _age(root)
    s = Session.open(root, slides=[])
    s.similar_slides("slide_00000")  # statuses read, index synced
    return s


def _count_stats(monkeypatch) -> list:
    calls = []
    real = os.stat

    def counting(path, *a, **k):
        calls.append(str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "stat", counting)
    return calls


def test_unchanged_cohort_query_costs_a_few_stat_calls(session, monkeypatch):
    calls = _count_stats(monkeypatch)
    hits = session.similar_slides("slide_00001")
    assert len(hits) == min(N - 1, session.settings.top_k)
    per_slide = [c for c in calls if "slide_0000" in c and "slide_00001" not in c]
    assert not per_slide, per_slide[:5]  # no file of another slide was looked at
    assert len(calls) < 20, calls


def test_rewritten_prototypes_are_seen(session):
    from napari_slpd.prototypes.cache import read_prototypes, save_prototypes

    root = session.root
    before = {h.slide_id: h.distance for h in session.similar_slides("slide_00000", top_k=N)}
    # Slide 5's prototypes replaced by slide 0's own: it becomes the nearest, at distance ~0.
    protos = read_prototypes(session.cohort.prototypes_path("slide_00005"))
    query = read_prototypes(session.cohort.prototypes_path("slide_00000"))
    protos.centroids = np.asarray(query.centroids).copy()
    save_prototypes(session.cohort.prototypes_path("slide_00005"), protos)
    _age(root, 1)
    after = session.similar_slides("slide_00000", top_k=N)
    assert after[0].slide_id == "slide_00005" and after[0].distance < 1e-3 < before["slide_00005"]


def test_removed_prototypes_and_features_are_seen(session):
    session.cohort.features_path("slide_00003").unlink()
    _age(session.root, 2)
    ids = {h.slide_id for h in session.similar_slides("slide_00000", top_k=N)}
    assert "slide_00003" not in ids and "slide_00004" in ids
    assert "slide_00003" not in session.slides_with_features()


def test_settings_change_is_seen(session):
    from dataclasses import replace

    assert session.slides_with_features()
    session.settings = replace(session.settings, features=replace(session.settings.features, region_encoder="hipt_vit4k"))
    assert session.slides_with_features() == []  # another region encoder: no slide has current features
    session.settings = replace(session.settings, features=replace(session.settings.features, region_encoder="mean"),
                               prototypes=replace(session.settings.prototypes, k=3))
    assert {st.prototypes for st in session._current_statuses()} == {"stale"}


def test_in_place_update_touches_the_folder(session):
    """A region-embedding version switch rewrites a feature file in place: its folder's time moves too."""
    from napari_slpd.features.store_versions import _touch

    path = session.cohort.features_path("slide_00002")
    stamp = session._cohort_stamp()
    assert stamp is not None
    _touch(path, path.stat().st_mtime_ns)
    assert session._cohort_stamp() != stamp  # None (too recent) or another time: checked again


def test_recent_change_is_not_trusted(session, monkeypatch):
    """Within RACY_NS of a folder's change the stamp is None and the per-slide checks run."""
    os.utime(session.root / "prototypes")  # now
    assert session._cohort_stamp() is None
    calls = _count_stats(monkeypatch)
    session.similar_slides("slide_00001")
    assert any("slide_00007" in c for c in calls)
    monkeypatch.setattr(session_module, "RACY_NS", 0)
    assert session._cohort_stamp() is not None

