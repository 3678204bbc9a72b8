"""Fault 2: a slide disappears (share unmounted, file moved) or turns unreadable (truncated, overwritten in
place) while a cohort is being extracted: that slide ends with an error saying so, the others go on, and a
later run resumes it."""

from __future__ import annotations

import os
import shutil

import pytest

from faults.faults_support import INPUT_PX

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def three_slides(tmp_path_factory):
    from napari_slpd.samples.synthetic import write_synthetic_slide

    folder = tmp_path_factory.mktemp("slides")
    sizes = {"a": (1024, 768), "b": (3072, 2048), "c": (1024, 768), "d": (1024, 768)}
    for i, (name, size) in enumerate(sizes.items()):
        write_synthetic_slide(folder / f"{name}.svs", *size, seed=i)
    return folder


def _regions_done(path) -> int:
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            return int(fh.attrs.get("n_regions_done", 0))
    except OSError:
        return 0


def _session(root, slides):
    from napari_slpd.session import FeatureSettings, Session, SessionSettings

    settings = SessionSettings(features=FeatureSettings(
        patch_input_px=INPUT_PX, region_encoder="mean", region_px=128, patch_px=32, target_mpp=1.0,
        device="cpu", num_workers=1, batch_size=64))
    return Session.open(root, slides=slides, settings=settings)


def test_slide_truncated_or_gone_mid_extraction(tmp_path, three_slides):
    slides = tmp_path / "slides"
    shutil.copytree(three_slides, slides)
    session = _session(tmp_path / "cohort", slides)
    # c is opened while b is extracted (the next slide is prepared ahead), so the one that vanishes is d
    b, c = slides / "b.svs", slides / "d.svs"
    b_bytes = b.read_bytes()
    seen = []

    partial = session.cohort.features_path("b").with_name("b.h5.partial")

    def on_progress(done, total):
        # Slide b has its first chunk of 16 regions written: its file is cut short in place (what a share
        # that drops out, or a copy over it, looks like to an open file), and c vanishes (moved away).
        seen.append(done)
        if partial.exists() and b.stat().st_size == len(b_bytes) and _regions_done(partial) >= 16:
            os.truncate(b, 4096)
            c.rename(tmp_path / "d-away.svs")

    results = {r.slide_id: r for r in session.extract(progress=on_progress)}
    assert results["a"].status == "extracted"
    assert results["b"].status == "error", results["b"]
    assert "b.svs" in results["b"].message and "during extraction" in results["b"].message, results["b"].message
    assert results["c"].status == "extracted"
    assert results["d"].status == "error" and "d.svs" in results["d"].message
    assert "does not exist" in results["d"].message or "missing" in results["d"].message, results["d"].message
    statuses = {s.slide_id: s.features for s in session.statuses()}
    assert statuses["a"] == "done" and statuses["b"] in ("partial", "missing") and statuses["d"] == "missing"

    # The share is back: the next run resumes b from its finished chunks and extracts c.
    b.write_bytes(b_bytes)
    (tmp_path / "d-away.svs").rename(c)
    again = {r.slide_id: r for r in _session(tmp_path / "cohort", None).extract()}
    assert again["a"].status == "skipped"
    assert again["b"].status == "extracted" and again["b"].resumed_from > 0, again["b"]
    assert again["c"].status == "skipped" and again["d"].status == "extracted"
